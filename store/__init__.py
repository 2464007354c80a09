"""store: the pitstore storage engine.

Layers, bottom up, each module talking only to the one below it:

- **pack** (`packs.py`, `backend.py`): an append-only file of framed blobs
  with a footer listing them; sealed (immutable) once full. Backends hold
  pack bytes (a local directory today).
- **blob** (`index.py`, `repository.py`): a stored, zstd-compressed piece
  addressed by the BLAKE3-256 of its plain bytes. Kinds: *chunk* (file data
  cut by FastCDC, `chunker.py`), *tree* (a directory listing), *filelist*
  (the ordered chunks of one file) and *snapshot* record.
- **object** (`trees.py`, `files.py`): files as chunk lists with an offset
  table for random reads; directories as sorted, content-addressed trees, so
  unchanged subtrees are shared between snapshots (a Merkle tree).
- **snapshot** (`snapshots.py`, `ingest.py`): an immutable root tree of a
  replication *set* at a point in time.
- **operations**: `restore.py`, `diff.py`, and the CLI in `cli.py`.

The LMDB index (`index.py`) maps blob ids to their place in packs and keeps
reference counts, the snapshot catalogue and the files cache. It is a cache
of what the packs say: `pit repair` can rebuild it from packs alone.
"""
