"""Regression (issue 12): a snapshot whose source paths are not given in
sorted order must verify clean. The root tree's children record in the index
once followed the command line's order while the tree itself is sorted, so
`pit verify --deep` reported damage on the README's own example."""
from __future__ import annotations

import os

from store.ingest import create_snapshot
from store.repository import Repository
from store.verify import verify


def test_unsorted_multi_path_set_verifies_clean(tmp_path):
    src = tmp_path / "src"
    for name in ("www", "nginx", "aaa"):
        (src / name).mkdir(parents=True)
        (src / name / "f").write_bytes(os.urandom(70_000) + name.encode())
    repo = Repository.init(str(tmp_path / "repo"))
    paths = [str(src / "www"), str(src / "nginx"), str(src / "aaa")]
    create_snapshot(repo, "web", paths)
    (src / "www" / "g").write_bytes(b"new")
    create_snapshot(repo, "web", paths)  # and the next snapshot keeps it clean
    rep = verify(repo, depth="deep")
    assert rep.clean, (rep.problems, rep.damage)
