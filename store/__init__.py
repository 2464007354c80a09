"""store: the pitstore storage engine.

Floors, bottom up; a module imports only its own floor and those below,
never round a circle (docs/store.md, "Floors", places every module):

- **base** (`errors.py`, `cache.py`, `logsetup.py`, `workers.py`).
- **packs** (`packs.py`, `backend.py`, `backends.py`, `s3backend.py`,
  `s3cache.py`): an append-only file of framed blobs with a footer listing
  them; sealed (immutable) once full. Backends hold pack bytes: a local
  directory, or an S3-compatible bucket (the open pack staged locally,
  sealed packs uploaded, ranged reads through a capped local cache).
- **index** (`index.py`, `refcounts.py`): the LMDB index and the reference
  counts that free what nothing references any more.
- **content** (`chunker.py`, `repository.py`, `files.py`, `segments.py`): a
  stored, zstd-compressed blob addressed by the BLAKE3-256 of its plain
  bytes. Kinds: *chunk* (file data cut by FastCDC), *tree* (a directory
  listing), *filelist* (the ordered chunks of one file) and *snapshot*
  record.
- **objects/trees** (`trees.py`, `objects.py`, `diff.py`): directories as
  sorted, content-addressed trees, so unchanged subtrees are shared between
  snapshots (a Merkle tree); files read through their chunk lists.
- **snapshots** (`catalogue.py`, `history.py`, `snapshots.py`, `prune.py`,
  `ingest.py`, `apply.py`, `retention.py`, `restore.py`, `verify.py`,
  `repair.py`, ...): an immutable root tree of a replication *set* at a
  point in time, the previous-versions index kept with it, and the
  operations on snapshots.
- **views** (`versions.py`, `view.py`): the read-only view model.
- **cli** (`cli.py` composes `cli_maintenance.py` and `demo.py`; what they
  share is in `cli_support.py`).

The LMDB index (`index.py`) maps blob ids to their place in packs and keeps
reference counts, the snapshot catalogue and the files cache. It is a cache
of what the packs say: `pit repair` can rebuild it from packs alone.
"""
