"""Snapshots built from received changes (store/apply.py, what a replica commits) pass `verify --deep`.

Found by tests/test_s3_replica.py: a name added to a directory before names it already held was written to the
tree in sorted order but its children record in the index in arrival order, so a deep check of every replica that
received such a file reported the tree damaged (and the scrub timer raised `verify_damaged`)."""
from __future__ import annotations

import random

import pytest

from conftest import cli_json
from meta_support import CF, craft


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_names_added_in_any_order_keep_the_children_record_in_tree_order(repo_path, seed):
    rnd = random.Random(seed)
    names = [f"{c}{i}" for i, c in enumerate(rnd.sample("abcdefghijklmnopqrstuvwxyz", 12))]
    have: dict = {}
    for k in range(4):  # each snapshot adds names that sort anywhere among the ones already there
        for n in rnd.sample([n for n in names if n not in have], 3):
            have[n] = CF(rnd.randbytes(rnd.randint(10, 200_000)))
        craft(repo_path, "s", dict(have))
    rep = cli_json(repo_path, "verify", "--deep", "--recheck-after", "0")
    assert rep["result"] == "good", rep
