"""davserver: the restore views, over `store.view` and nothing else of the store.

- `config.py`: the server's TOML (listen address, TLS, users with scrypt
  password hashes, each user's scope of sets and path prefixes).
- `provider.py`: a read-only wsgidav DAVProvider; also serves the HTML
  listing, folder downloads as streamed `.zip`, and refuses Depth: infinity.
- `server.py`: the WSGI app on cheroot, TLS, `--self-signed` certificates.
- `fuse.py`: the same view as a FUSE mount (mfusepy, libfuse3).
- `cli.py`: `pit serve`, `pit mount`, `pit versions`, `pit passwd`, added
  to `pit` through the `pit.commands` entry-point group.
"""
