"""Repositories whose packs live in an S3-compatible bucket (issue 18 part A).

Against a real `rclone serve s3` on 127.0.0.1 (and moto's server where a test
needs conditional writes): init, backup, byte-exact restore, verify and
verify --deep, prune and compaction with their request/byte report, a fresh
directory attached to the bucket and rebuilt from it alone, the read cache's
cap, the guard against two directories writing one bucket, and the typed
errors. Faults (500s, cut uploads, delays, SIGKILL) are in test_s3_faults.py.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid

import pytest

from conftest import MiB, cli, cli_json, list_snaps, make_tree, opened, rand_bytes, restore, tree_digest
from s3helpers import MotoS3, aws_env, client, rclone, s3_env  # noqa: F401  (fixtures)
from store import packs as P
from store.errors import BackendError
from store.repository import Repository
from store.s3backend import S3Backend, S3Location


@pytest.fixture(scope="module")
def moto(aws_env):
    srv = MotoS3()
    yield srv
    srv.stop()


def s3_repo(srv, tmp_path, name="repo", pack_mib=1, extra=()) -> tuple[str, str]:
    """A fresh repository with its packs in a new bucket; returns (path, url)."""
    bucket = srv.make_bucket(f"b{uuid.uuid4().hex[:12]}")
    url = f"s3://{bucket}/pit/{name}"
    path = str(tmp_path / name)
    enc = () if any(str(e).startswith("--encrypt") for e in extra) else ("--no-encrypt",)
    cli(path, "init", "--backend", url, "--s3-endpoint", srv.endpoint, "--pack-size", pack_mib, *enc, *extra)
    return path, url


def bucket_keys(srv, url: str) -> list[str]:
    bucket, _, prefix = url[len("s3://"):].partition("/")
    out = []
    for page in client(srv.endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return sorted(out)


def source(tmp_path, gen: int):
    src = tmp_path / "src"
    make_tree(src, {
        "big.bin": rand_bytes(2_500_000, f"big{gen}"),
        "same.bin": rand_bytes(1_200_000, "same"),
        "d": {f"f{i}": rand_bytes(3000 + i, f"s{gen}-{i}") for i in range(20)},
        "gen.txt": b"generation %d\n" % gen,
    })
    return src


def check_restores(repo, tmp_path, expected: dict[str, dict]) -> None:
    for sid, want in expected.items():
        out = tmp_path / f"out-{sid[:8]}"
        shutil.rmtree(out, ignore_errors=True)
        restore(repo, sid, out)
        assert tree_digest(out / "src") == want, f"snapshot {sid[:12]} does not restore byte-exactly"
        shutil.rmtree(out)


def take(repo, tmp_path, gen: int, expected: dict) -> str:
    src = source(tmp_path, gen)
    sid = cli_json(repo, "snapshot", "--set", "s", str(src))["id"]
    expected[sid] = tree_digest(src)
    shutil.rmtree(src)
    return sid


def test_init_backup_restore_verify(rclone, tmp_path):
    repo, url = s3_repo(rclone, tmp_path)
    cfg = json.load(open(os.path.join(repo, "config")))
    assert cfg["backend"]["url"] == url and cfg["backend"]["endpoint"] == rclone.endpoint
    assert "secret" not in json.dumps(cfg).lower() and os.environ["AWS_SECRET_ACCESS_KEY"] not in json.dumps(cfg)
    expected: dict[str, dict] = {}
    for gen in range(2):
        take(repo, tmp_path, gen, expected)
    keys = bucket_keys(rclone, url)
    packs = [k for k in keys if k.endswith(".pack")]
    assert f"{url.split('/', 3)[3]}/config" in keys
    assert len(packs) >= 5, keys  # 1 MiB packs: several sealed and uploaded per snapshot
    for k in packs:  # <prefix>/packs/<last two hex>/<name>.pack
        name = k.rsplit("/", 1)[1]
        assert k.split("/")[-2] == name.split(".")[0][-2:]
    # nothing of the packs stays in the repository directory once committed
    assert not os.path.exists(os.path.join(repo, "packs"))
    assert not [f for _, _, fs in os.walk(os.path.join(repo, "staging")) for f in fs if f.endswith(".pack")]
    check_restores(repo, tmp_path, expected)
    v = cli_json(repo, "verify")
    assert v["result"] == "good", v
    v = cli_json(repo, "verify", "--deep")
    assert v["result"] == "good", v
    # reads are ranged GETs: 16 bytes asked, 16 bytes fetched (without the cache's block rounding)
    assert os.listdir(os.path.join(repo, "s3cache")), "the restores read nothing through the cache"
    b = S3Backend(repo, S3Location.from_config(cfg["backend"]), cache_bytes=0)
    name = P.pack_name(1)
    P.check_header(lambda o, n: b.read(name, o, n), b.size(name))
    assert b.stats.requests.get("GetObject") == 1 and b.stats.bytes_down == P.PACK_HEADER.size


def test_verify_deep_finds_a_damaged_object(rclone, tmp_path):
    repo, url = s3_repo(rclone, tmp_path)
    take(repo, tmp_path, 0, {})
    bucket, _, prefix = url[len("s3://"):].partition("/")
    key = [k for k in bucket_keys(rclone, url) if k.endswith(".pack")][0]
    path = os.path.join(rclone.root, bucket, key)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 3] ^= 0xFF  # one flipped byte inside a frame
    open(path, "wb").write(bytes(data))
    res = cli(repo, "verify", "--deep", "--json", expect=None)
    assert res.exit_code == 3, res.output
    assert json.loads(res.stdout)["result"] != "good"


def test_prune_and_compact_report_requests_and_bytes(rclone, tmp_path):
    repo, url = s3_repo(rclone, tmp_path)
    expected: dict[str, dict] = {}
    sids = [take(repo, tmp_path, gen, expected) for gen in range(3)]
    packs_before = {k for k in bucket_keys(rclone, url) if k.endswith(".pack")}
    cli(repo, "policy", "--set", "s", "--max", "1")
    out = cli_json(repo, "prune", "--threshold", "0.1")
    assert out["snapshots_dropped"] == 2
    comp = out["compact"]
    assert comp["packs_compacted"] >= 1 and comp["packs_deleted"] >= 1, comp
    cost = comp["backend"]
    print(f"prune: {out['backend']}; compaction alone: {cost}; {comp['packs_compacted']} packs compacted")
    assert cost["requests"].get("DeleteObject", 0) >= comp["packs_deleted"]
    assert cost["requests_total"] == sum(cost["requests"].values()) > 0
    assert cost["bytes_down"] > 0  # the live frames were read back from the bucket
    if comp["bytes_copied"]:
        assert cost["bytes_up"] >= comp["bytes_copied"]
    assert out["backend"]["requests_total"] >= cost["requests_total"]  # prune's own commits count too
    packs_after = {k for k in bucket_keys(rclone, url) if k.endswith(".pack")}
    assert packs_before - packs_after, "compaction deleted no pack from the bucket"
    keep = {sids[-1]: expected[sids[-1]]}
    assert [s.hex for s in list_snaps(repo)] == [sids[-1]]
    check_restores(repo, tmp_path, keep)
    assert cli_json(repo, "verify", "--deep")["result"] == "good"
    # the text report says it too
    res = cli(repo, "compact", "--threshold", "0.0")
    assert "object store:" in res.output and "requests" in res.output


def test_attach_and_repair_from_the_bucket_alone(rclone, tmp_path):
    repo, url = s3_repo(rclone, tmp_path)
    expected: dict[str, dict] = {}
    for gen in range(2):
        take(repo, tmp_path, gen, expected)
    cli(repo, "forget", "--set", "s", "--snapshot", list(expected)[0], expect=None)
    with opened(repo, readonly=True) as r, r.reading() as txn:
        from store.snapshots import list_snapshots

        listed = sorted(s.hex for s in list_snapshots(r, txn))
    other = str(tmp_path / "elsewhere")
    res = cli(other, "init", "--backend", url, "--s3-endpoint", rclone.endpoint, "--attach")
    assert "pit --repo" in res.output and "repair" in res.output
    assert not os.path.exists(os.path.join(other, "index"))
    rep = cli_json(other, "repair")
    assert rep["packs"] >= 5 and not rep["quarantined"] and not rep["damaged_snapshots"]
    assert sorted(s.hex for s in list_snaps(other)) == listed
    check_restores(other, tmp_path, {sid: expected[sid] for sid in listed})
    assert cli_json(other, "verify", "--deep")["result"] == "good"
    # the attached directory can write on (the old one must not: one writer per bucket)
    take(other, tmp_path, 5, expected)
    assert cli_json(other, "verify")["result"] == "good"


def test_attach_refuses_what_is_not_a_repository(rclone, tmp_path):
    bucket = rclone.make_bucket(f"b{uuid.uuid4().hex[:12]}")
    target = tmp_path / "att"
    res = cli(str(target), "init", "--backend", f"s3://{bucket}/nothing", "--s3-endpoint", rclone.endpoint,
              "--attach", expect=10)
    assert "no repository config" in res.output
    assert not target.exists()
    repo, url = s3_repo(rclone, tmp_path)
    res = cli(str(tmp_path / "second"), "init", "--backend", url, "--s3-endpoint", rclone.endpoint, "--no-encrypt",
              expect=11)
    assert "--attach" in res.output and not (tmp_path / "second").exists()


def test_read_cache_respects_its_cap(rclone, tmp_path, monkeypatch):
    repo, url = s3_repo(rclone, tmp_path, extra=("--cache-size", "2"))
    expected: dict[str, dict] = {}
    take(repo, tmp_path, 0, expected)
    cache = os.path.join(repo, "s3cache")
    check_restores(repo, tmp_path, expected)  # ~3.8 MiB of data read through a 2 MiB cache
    held = sum(os.path.getsize(os.path.join(cache, f)) for f in os.listdir(cache))
    assert 0 < held <= 2 * MiB, held
    # a second restore is served partly from the cache; the cap holds across processes' restarts
    with opened(repo, readonly=True) as r:
        assert r.backend.cache.cap == 2 * MiB
        assert r.backend.cache.total == held  # adopted from disk at open
    monkeypatch.setenv("PIT_S3_CACHE_BYTES", str(MiB))  # an override for one run: trims at open
    with opened(repo, readonly=True) as r:
        assert r.backend.cache.disk_bytes() <= MiB
    monkeypatch.setenv("PIT_S3_CACHE_BYTES", "0")  # no cache: reads still work
    check_restores(repo, tmp_path, expected)


def _stage_and_upload(repo_dir: str, loc: S3Location, name: str, payload: bytes) -> S3Backend:
    b = S3Backend(repo_dir, loc)
    h = b.create(name)
    h.write(P.PACK_HEADER.pack(P.PACK_MAGIC, P.PACK_VERSION, 0) + payload)
    h.seal()  # starts the upload
    h.close()
    b.before_commit()  # what a writer does before its commit: waits for it, raises its error
    return b


@pytest.mark.parametrize("server", ["moto", "rclone"])
def test_no_overwrite_of_a_pack_another_directory_wrote(server, request, tmp_path):
    srv = request.getfixturevalue(server)
    bucket = srv.make_bucket(f"b{uuid.uuid4().hex[:12]}")
    loc = S3Location.parse(f"s3://{bucket}/p", srv.endpoint)
    name = P.pack_name(7)
    a = _stage_and_upload(str(tmp_path / "a"), loc, name, b"one content")
    guard = open(os.path.join(tmp_path / "a", "staging", ".conditional-writes")).read().strip()
    # moto honours If-None-Match: * (the guard is used); rclone does not (a HEAD first does the check)
    assert guard == ("yes" if server == "moto" else "no")
    # the same bytes again (a reconcile after a crash) are fine and cost no second PUT of the body
    again = _stage_and_upload(str(tmp_path / "a2"), loc, name, b"one content")
    assert again.stats.bytes_up == 0
    with pytest.raises(BackendError, match="other content"):
        _stage_and_upload(str(tmp_path / "b"), loc, name, b"another content")
    assert a.read(name, 16, 11) == b"one content"


def test_reconcile_uploads_a_committed_pack_left_staged(rclone, tmp_path):
    repo, url = s3_repo(rclone, tmp_path)
    expected: dict[str, dict] = {}
    take(repo, tmp_path, 0, expected)
    with opened(repo, readonly=True) as r:
        names = list(r.backend.list())
        victim = names[-1]
        data = r.backend.read(victim, 0, r.backend.size(victim))
    # as if the process died after the index commit, before the upload was dropped
    # from staging and before it was (fully) in the bucket: the staged copy is the only one
    bucket = url[len("s3://"):].split("/", 1)[0]
    client(rclone.endpoint).delete_object(Bucket=bucket, Key=S3Location.parse(url).pack_key(victim))
    staged = os.path.join(repo, "staging", victim.split(".")[0][-2:], victim)
    os.makedirs(os.path.dirname(staged), exist_ok=True)
    open(staged, "wb").write(data)
    with opened(repo) as r:  # a read-write open reconciles
        assert not os.path.exists(staged)
    assert any(k.endswith(victim) for k in bucket_keys(rclone, url))
    check_restores(repo, tmp_path, expected)


def test_bad_urls_and_unusable_buckets_are_refused_with_nothing_created(rclone, tmp_path, monkeypatch):
    target = tmp_path / "r"
    for url in ("s3://", "s3:///prefix", "s3://UPPER/x", "http://bucket/x", "s3://b/x/../y"):
        res = cli(str(target), "init", "--backend", url, "--s3-endpoint", rclone.endpoint, "--no-encrypt", expect=22)
        assert res.output.count("\n") == 1 and "pit: error:" in res.output
        assert not target.exists()
    res = cli(str(target), "init", "--backend", "s3://no-such-bucket-here/x", "--s3-endpoint", rclone.endpoint,
              "--no-encrypt", expect=39)
    assert "does not exist" in res.output and not target.exists()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-wrong-secret")
    bucket = rclone.make_bucket(f"b{uuid.uuid4().hex[:12]}")
    res = cli(str(target), "init", "--backend", f"s3://{bucket}/x", "--s3-endpoint", rclone.endpoint, "--no-encrypt",
              expect=38)
    assert "denied" in res.output and not target.exists()
    monkeypatch.undo()
    for k, v in s3_env().items():
        monkeypatch.setenv(k, v)
    from s3helpers import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    res = cli(str(target), "init", "--backend", f"s3://{bucket}/x", "--s3-endpoint", dead, "--no-encrypt", expect=37)
    assert "cannot reach" in res.output and not target.exists()
    res = cli(str(target), "init", "--attach", expect=22)
    assert not target.exists()


def test_local_repositories_are_unchanged(tmp_path):
    """A config without `backend` means local packs, opened as before."""
    path = str(tmp_path / "local")
    Repository.init(path).close()
    assert "backend" not in json.load(open(os.path.join(path, "config")))
    with opened(path) as r:
        assert type(r.backend).__name__ == "LocalBackend" and not r.backend.seal_on_commit


def test_ranged_reads_through_the_cache_return_exactly_the_bytes(rclone, tmp_path):
    """Random ranges across block boundaries, cold and warm, match the object; past its end is BlobMissing."""
    import random

    from store.errors import BlobMissing

    bucket = rclone.make_bucket(f"b{uuid.uuid4().hex[:12]}")
    loc = S3Location.parse(f"s3://{bucket}/p", rclone.endpoint)
    name = P.pack_name(3)
    payload = rand_bytes(2 * MiB + 12345, "ranges")
    _stage_and_upload(str(tmp_path / "w"), loc, name, payload)
    whole = P.PACK_HEADER.pack(P.PACK_MAGIC, P.PACK_VERSION, 0) + payload
    rnd = random.Random(7)
    b = S3Backend(str(tmp_path / "r"), loc, cache_bytes=64 * MiB)
    for _ in range(60):
        off = rnd.randrange(0, len(whole))
        n = rnd.randint(1, min(len(whole) - off, 3 * MiB))
        assert b.read(name, off, n) == whole[off:off + n], (off, n)
    assert b.read(name, len(whole) - 5, 5) == whole[-5:]
    for off, n in ((len(whole) - 5, 6), (len(whole) - MiB, MiB + 1), (len(whole), 1)):
        with pytest.raises(BlobMissing):
            b.read(name, off, n)


def test_a_replica_repository_named_with_a_backend_is_made_in_its_bucket(rclone, tmp_path):
    """The agent config's `backend` / `s3_endpoint` (and `pit join --repo DIR --backend URL`)."""
    from replicator.agent import _create_replica_repo
    from replicator.repos import ensure as _ensure_repo
    from replicator.config import check_agent_config
    from replicator.errors import ConfigError
    from replicator.settings import AgentConfig

    from store.keys import KeySource

    bucket = rclone.make_bucket(f"b{uuid.uuid4().hex[:12]}")
    # in a bucket, encryption is said either way: with no key file and no `encrypt = false` nothing is made
    bare = AgentConfig(state=str(tmp_path / "state"), repo=str(tmp_path / "bare"),
                       backend=f"s3://{bucket}/bare", s3_endpoint=rclone.endpoint)
    assert not _create_replica_repo(bare) and not (tmp_path / "bare").exists()
    assert bucket_keys(rclone, f"s3://{bucket}/bare") == []
    key = str(tmp_path / "replica.key")
    cfg = AgentConfig(state=str(tmp_path / "state"), repo=str(tmp_path / "replica"),
                      backend=f"s3://{bucket}/replica", s3_endpoint=rclone.endpoint, key_file=key)
    assert _create_replica_repo(cfg)
    r = Repository(cfg.repo, keys=KeySource(key_file=key))
    try:
        assert isinstance(r.backend, S3Backend) and r.backend.loc.url == f"s3://{bucket}/replica"
        assert r.codec.sealed  # made with the agent file's key file
        slot = r.key_slot
    finally:
        r.close()
    assert _create_replica_repo(cfg)  # there already: kept
    assert bucket_keys(rclone, f"s3://{bucket}/replica") == ["replica/config", f"replica/keys/{slot}"]
    # a second directory cannot silently take the same prefix: the agent logs it and waits
    assert not _create_replica_repo(AgentConfig(state=cfg.state, repo=str(tmp_path / "other"), backend=cfg.backend,
                                                s3_endpoint=rclone.endpoint, key_file=key))
    assert not (tmp_path / "other").exists()
    msg = _ensure_repo(str(tmp_path / "joined"), f"s3://{bucket}/joined", rclone.endpoint, encrypt=False)
    assert msg.startswith("created repository")
    assert json.load(open(tmp_path / "joined" / "config"))["backend"]["url"] == f"s3://{bucket}/joined"
    agent_file = tmp_path / "agent.toml"
    agent_file.write_text(f'state = "{tmp_path}/state"\nrepo = "{tmp_path}/r"\nbackend = "s3://"\n')
    with pytest.raises(ConfigError, match="backend"):
        check_agent_config(__import__("tomllib").loads(agent_file.read_text()), str(agent_file))


@pytest.mark.parametrize("server", ["moto", "rclone"])
def test_multipart_upload_is_checked_and_reads_back(server, request, tmp_path, monkeypatch):
    """Packs past the multipart threshold (64 MiB by default; 5 MiB here) go up in parts; their ETag is
    no MD5, so the upload is checked by size and SHA-256 metadata or a ranged re-read."""
    from store import s3backend

    srv = request.getfixturevalue(server)
    monkeypatch.setattr(s3backend, "MULTIPART_THRESHOLD", 5 * MiB)
    monkeypatch.setattr(s3backend, "MULTIPART_PART", 5 * MiB)
    bucket = srv.make_bucket(f"b{uuid.uuid4().hex[:12]}")
    loc = S3Location.parse(f"s3://{bucket}/p", srv.endpoint)
    name = P.pack_name(9)
    payload = rand_bytes(11 * MiB + 3, "multipart")
    b = _stage_and_upload(str(tmp_path / "w"), loc, name, payload)
    assert b.stats.requests.get("CreateMultipartUpload") == 1 and b.stats.requests.get("UploadPart") == 3
    head = client(srv.endpoint).head_object(Bucket=bucket, Key=loc.pack_key(name))
    import hashlib

    whole_md5 = hashlib.md5(P.PACK_HEADER.pack(P.PACK_MAGIC, P.PACK_VERSION, 0) + payload).hexdigest()
    # S3 and moto: "<md5 of the parts' md5s>-3"; rclone: the MD5 of the whole object (checked as such)
    assert head["ETag"].strip('"').endswith("-3") or head["ETag"].strip('"') == whole_md5, head["ETag"]
    assert head["ContentLength"] == len(payload) + P.PACK_HEADER.size
    # no MD5 to compare: the trailer and one random range were read back (ranged GETs)
    assert b.stats.requests.get("GetObject", 0) == (0 if head["ETag"].strip('"') == whole_md5 else 2)
    r = S3Backend(str(tmp_path / "r"), loc, cache_bytes=0)
    assert r.read(name, P.PACK_HEADER.size, len(payload)) == payload


def test_compaction_merges_the_small_packs_of_many_commits(rclone, tmp_path):
    """Every commit seals its pack (an object store cannot append): many small snapshots make many small
    packs, which compaction merges (restic's "repack small packs"); a local repository is not touched."""
    repo, url = s3_repo(rclone, tmp_path, pack_mib=4)
    expected: dict[str, dict] = {}
    src = tmp_path / "src"
    for t in range(5):
        make_tree(src, {f"f{t}.bin": rand_bytes(60_000, f"small{t}"), "gen.txt": b"%d\n" % t})
        expected[cli_json(repo, "snapshot", "--set", "s", str(src))["id"]] = tree_digest(src)
    before = [k for k in bucket_keys(rclone, url) if k.endswith(".pack")]
    assert len(before) == 5
    st = cli_json(repo, "compact")
    assert st["packs_compacted"] == 5 and st["packs_deleted"] == 5, st
    after = [k for k in bucket_keys(rclone, url) if k.endswith(".pack")]
    assert len(after) == 1 and after[0] not in before
    assert cli_json(repo, "compact")["packs_compacted"] == 0  # the merged pack is not rewritten again
    for sid, want in expected.items():
        out = tmp_path / "out"
        shutil.rmtree(out, ignore_errors=True)
        restore(repo, sid, out)
        assert tree_digest(out / "src") == want
    assert cli_json(repo, "verify", "--deep")["result"] == "good"
    local = str(tmp_path / "local")
    Repository.init(local, pack_size=4 * MiB).close()
    for t in range(3):
        make_tree(src, {f"l{t}.bin": rand_bytes(60_000, f"l{t}")})
        cli_json(local, "snapshot", "--set", "s", str(src))
    assert cli_json(local, "compact")["packs_compacted"] == 0


def test_an_encrypted_repository_in_a_bucket_round_trips_and_attaches_with_its_key_slots(rclone, tmp_path,
                                                                                          monkeypatch):
    """`pit init --backend ... --encrypt`: the key slots go into the bucket with the config (and follow `pit key
    add/remove`), so a directory attached to the bucket opens it with the same key file; the bucket holds no
    plain chunk id and no plain bytes. Without --encrypt or --no-encrypt a bucket is refused."""
    import blake3

    bucket = rclone.make_bucket(f"b{uuid.uuid4().hex[:12]}")
    url = f"s3://{bucket}/enc"

    def meta() -> list[str]:  # what is in the bucket beside the packs
        return [k for k in bucket_keys(rclone, url) if not k.endswith(".pack")]

    res = cli(str(tmp_path / "undecided"), "init", "--backend", url, "--s3-endpoint", rclone.endpoint, expect=22)
    assert "--no-encrypt" in res.output and not (tmp_path / "undecided").exists()
    assert bucket_keys(rclone, url) == []
    key = str(tmp_path / "repo.key")
    monkeypatch.setenv("PIT_KEY_FILE", key)
    repo = str(tmp_path / "repo")
    cli(repo, "init", "--backend", url, "--s3-endpoint", rclone.endpoint, "--pack-size", "1", "--encrypt")
    (slot,) = [s["id"] for s in cli_json(repo, "key", "list")]
    assert bucket_keys(rclone, url) == ["enc/config", f"enc/keys/{slot}"]
    expected: dict[str, dict] = {}
    src = source(tmp_path, 0)
    marker = b"PLAIN-MARKER-" * 400
    (src / "marker.txt").write_bytes(marker)
    plain_ids = {blake3.blake3(p.read_bytes()).digest() for p in src.rglob("*") if p.is_file()}
    sid = cli_json(repo, "snapshot", "--set", "s", str(src))["id"]
    expected[sid] = tree_digest(src)
    shutil.rmtree(src)
    s3 = client(rclone.endpoint)
    blobs = b"".join(s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in bucket_keys(rclone, url)
                     if k.endswith(".pack"))
    assert blobs and b"PLAIN-MARKER-" not in blobs and not any(i in blobs for i in plain_ids)
    # a second key file: mirrored into the bucket, then removed there too
    cli(repo, "key", "add", "--new-key-file", str(tmp_path / "second.key"))
    slots = {s["id"] for s in cli_json(repo, "key", "list")}
    assert len(slots) == 2 and meta() == ["enc/config"] + sorted(f"enc/keys/{s}" for s in slots)
    (other_slot,) = slots - {slot}
    cli(repo, "key", "remove", other_slot)
    assert meta() == ["enc/config", f"enc/keys/{slot}"]
    # attached elsewhere: the bucket alone, with the key file
    other = str(tmp_path / "elsewhere")
    cli(other, "init", "--backend", url, "--s3-endpoint", rclone.endpoint, "--attach")
    assert os.listdir(os.path.join(other, "keys")) == [slot]
    cli(other, "repair")
    check_restores(other, tmp_path, expected)
    assert cli_json(other, "verify", "--deep")["result"] == "good"
    monkeypatch.setenv("PIT_KEY_FILE", str(tmp_path / "second.key"))  # its slot was removed: opens nothing
    assert cli(other, "snapshots", expect=34).output.count("\n") == 1


def test_join_options_for_a_replica_repository_in_a_bucket(tmp_path):
    """`pit join/cluster init --repo DIR --backend URL` must say --key-file or --no-encrypt (checked before the
    join spends its token); what they write into the agent file loads back as the agent reads it."""
    import click

    from replicator.commands.cluster import _backend_needs_repo
    from replicator.config import plan_agent_config
    from store.errors import InvalidArgument

    repo = str(tmp_path / "r")
    with pytest.raises(InvalidArgument, match="--no-encrypt"):
        _backend_needs_repo(repo, "s3://bucket/x", None, None, False)
    assert _backend_needs_repo(repo, "s3://bucket/x", None, None, True) is False
    assert _backend_needs_repo(repo, "s3://bucket/x", None, "/etc/pit/r.key", False) is None
    with pytest.raises(InvalidArgument, match="contradict"):
        _backend_needs_repo(repo, "s3://bucket/x", None, "/etc/pit/r.key", True)
    with pytest.raises(click.UsageError):
        _backend_needs_repo(None, None, None, "/etc/pit/r.key", False)
    assert not os.path.exists(repo)
    for extra, line in (({"key_file": "/etc/pit/r.key", "encrypt": None}, 'key_file = "/etc/pit/r.key"'),
                        ({"encrypt": False}, "encrypt = false")):
        plan = plan_agent_config(str(tmp_path / "agent.toml"), {"state": str(tmp_path / "st"), "repo": repo,
                                                                "backend": "s3://bucket/x", **extra}, "pit join")
        assert line in plan["text"], plan["text"]
