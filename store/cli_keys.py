"""`pit key`: the key slots of an encrypted repository (store/keys.py).

Every slot wraps the same master key, so adding or removing one rewrites no
pack. Removal follows restic: the last slot, and the slot this command was
unlocked with, are refused (the first would lock everyone out for good, the
second is usually a mistake made with the only passphrase one remembers)."""
from __future__ import annotations

import json

import click

from .cli_support import open_repo
from .errors import InvalidArgument


def _encrypted(ctx):
    repo = open_repo(ctx, readonly=True)
    if not repo.codec.sealed:
        raise InvalidArgument(f"{repo.path} is not encrypted: it has no keys (see `pit init --encrypt`)")
    return repo


@click.group("key")
def key_group():
    """List, add and remove the key slots of an encrypted repository."""


@key_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the slots as JSON.")
@click.pass_context
def key_list(ctx, as_json):
    """The key slots: id, type (passphrase or keyfile), creation time; * marks the one used now."""
    from .keys import list_slots

    repo = _encrypted(ctx)
    rows = []
    for s in list_slots(repo.path):
        d = s.describe()
        d["in_use"] = s.id == repo.key_slot
        rows.append(d)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for d in rows:
        what = f"kdf {d['kdf']}" if d["type"] == "passphrase" else f"fingerprint {d.get('fingerprint')}"
        click.echo(f"{'*' if d['in_use'] else ' '} {d['id']}  {d['type']:10}  {d['created']}  {what}")


@key_group.command("add")
@click.option("--new-key-file", metavar="PATH", default=None,
              help="Make a new key file at PATH (mode 0600) and a slot it opens, instead of a passphrase slot.")
@click.option("--new-password-file", metavar="PATH", default=None,
              help="The new passphrase is the first line of PATH (else PIT_NEW_PASSWORD, else asked twice).")
@click.pass_context
def key_add(ctx, new_key_file, new_password_file):
    """Add a key slot: a new passphrase, or a new key file."""
    import os
    import sys

    from .keys import add_keyfile_slot, add_passphrase_slot, new_key_file as make_key_file, read_password_file
    from .repository import _acquire_lock, _release_lock, mirror_keys

    repo = _encrypted(ctx)
    if new_key_file and new_password_file:
        raise InvalidArgument("give --new-key-file or --new-password-file, not both")
    master = repo.codec.master_key()
    if new_key_file:
        key = make_key_file(new_key_file)
        add, what = (lambda: add_keyfile_slot(repo.path, repo.id, master, key)), f"key file {new_key_file}"
    else:
        if new_password_file:
            pw = read_password_file(new_password_file)
        elif os.environ.get("PIT_NEW_PASSWORD") is not None:
            pw = os.environ["PIT_NEW_PASSWORD"]
        elif sys.stdin.isatty():
            pw = click.prompt("new passphrase", hide_input=True, confirmation_prompt=True, err=True)
        else:
            raise InvalidArgument("no new passphrase: give --new-password-file, PIT_NEW_PASSWORD or --new-key-file")
        add, what = (lambda: add_passphrase_slot(repo.path, repo.id, master, pw)), "passphrase"
    fd = _acquire_lock(os.path.join(repo.path, "lock"), 10.0)
    try:
        slot = add()
        mirror_keys(repo.path, repo.backend)  # a repository in a bucket keeps its slots there too
    finally:
        _release_lock(fd)
    click.echo(f"added key slot {slot} ({what})")


@key_group.command("remove")
@click.argument("slot")
@click.pass_context
def key_remove(ctx, slot):
    """Remove key slot SLOT (an id or a prefix of 4+ digits). Not the last one, nor the one used now."""
    import os

    from .keys import remove_slot
    from .repository import _acquire_lock, _release_lock, mirror_keys

    repo = _encrypted(ctx)
    fd = _acquire_lock(os.path.join(repo.path, "lock"), 10.0)
    try:
        remove_slot(repo.path, slot, repo.key_slot)
        mirror_keys(repo.path, repo.backend)
    finally:
        _release_lock(fd)
    click.echo(f"removed key slot {slot}")
