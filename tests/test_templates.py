"""Application templates (replicator/apps/templates.py) and `pit set add`
(replicator/commands/failover.py): what each template writes, that the cluster file
loads back, one-line errors, the SQLite point hooks against a database being
written, and the image checks of SQLite and web-site images.

MySQL is not installed here: its template is tested on the configuration and
the client commands it generates only. The PostgreSQL hooks and check run
against a real server in test_select.py."""
from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import tomllib

import pytest

from replicator.commands.failover import add_set, load_cluster_sets
from replicator.errors import ConfigError, SetExists, TemplateError
from replicator.apps.hooks import around_point
from test_repl_helpers import set_config
from replicator.apps.templates import (
    build_set, check_image, image_path, mysql_session, parse_options, render_set, sqlite_copy_path, validate_app,
    web_config_test,
)

PIT = os.path.join(os.path.dirname(sys.executable), "pit")


def pit(*args, expect=0) -> subprocess.CompletedProcess:
    p = subprocess.run([PIT, *map(str, args)], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in p.stderr and "internal error" not in p.stderr, p.stderr
    assert p.returncode == expect, f"exit {p.returncode}, wanted {expect}\n{p.stdout}\n{p.stderr}"
    return p


# ------------------------------------------------------------------ set add
def test_set_add_writes_each_template_and_loads_back(tmp_path):
    cluster = tmp_path / "cluster.toml"
    cluster.write_text('[sets.files]\nmaster = "primary"\nreplicas = ["r1"]\npaths = ["/srv/files"]\n')
    www = tmp_path / "www"
    pit("set", "add", "sales-db", "--template", "postgresql", "--path", "/var/lib/postgresql/15/main",
        "--replicas", "r1,r2", "--master", "primary", "--cluster", cluster, "-o", "port=5433", "-o", "amcheck=yes")
    pit("set", "add", "shop", "--template", "sqlite", "--path", "/srv/shop/shop.db", "--path", "/srv/shop/users.db",
        "--replicas", "r1", "--master", "primary", "--cluster", cluster, "-o", f"side_dir={tmp_path / 'side'}")
    pit("set", "add", "erp", "--template", "mysql", "--replicas", "r2", "--master", "primary", "--cluster", cluster)
    pit("set", "add", "web", "--template", "website", "--path", "/etc/nginx", "--path", www,
        "--replicas", "r1", "--master", "primary", "--cluster", cluster)
    sets = {n: s.to_wire() for n, s in load_cluster_sets(str(cluster)).items()}  # the tables as pushed
    assert set(sets) == {"files", "sales-db", "shop", "erp", "web"}
    assert "app" not in sets["files"] and sets["files"]["paths"] == ["/srv/files"]

    pg = sets["sales-db"]
    assert pg["replicas"] == ["r1", "r2"] and pg["paths"] == ["/var/lib/postgresql/15/main"]
    assert pg["app"]["template"] == "postgresql" and pg["app"]["port"] == 5433 and pg["app"]["amcheck"] is True
    assert pg["app"]["pre"] == ["builtin:postgresql.backup_start"]
    assert pg["app"]["post"] == ["builtin:postgresql.backup_stop"]
    assert pg["schedule"] == {"every": 900.0} and pg["point_quiet"] == 0 and pg["point_every"] == 0

    sq = sets["shop"]
    assert sq["paths"] == [str(tmp_path / "side")], "only the consistent copies are replicated"
    assert sq["app"]["databases"] == ["/srv/shop/shop.db", "/srv/shop/users.db"]
    assert sq["app"]["pre"] == ["builtin:sqlite.backup"]

    my = sets["erp"]
    assert my["paths"] == ["/var/lib/mysql"] and my["app"]["pre"] == ["builtin:mysql.lock"]
    assert my["app"]["post"] == ["builtin:mysql.unlock"]

    web = sets["web"]
    assert web["paths"] == ["/etc/nginx", str(www)]
    assert web["app"] == {"template": "website", "server": "nginx", "config": "/etc/nginx/nginx.conf",
                          "docroot": str(www), "pre": [], "post": []}
    # the file stays hand-editable TOML, every set under its own table
    raw = tomllib.loads(cluster.read_text())
    assert raw["sets"]["sales-db"]["app"]["point"] == "backup"


def test_set_add_refuses_an_existing_name_and_leaves_the_file_alone(tmp_path):
    cluster = tmp_path / "cluster.toml"
    pit("set", "add", "db", "-t", "sqlite", "--path", "/srv/a.db", "--replicas", "r1", "--master", "m",
        "--cluster", cluster)
    before = cluster.read_bytes()
    p = pit("set", "add", "db", "-t", "postgresql", "--path", "/var/lib/pg", "--replicas", "r1", "--master", "m",
            "--cluster", cluster, expect=58)
    assert p.stderr.count("\n") == 1 and "already in" in p.stderr
    with pytest.raises(SetExists):
        add_set(str(cluster), "db", "sqlite", ["/srv/b.db"], ["r1"], "m")
    assert cluster.read_bytes() == before


@pytest.mark.parametrize("args, code, words", [
    (["-t", "oracle", "--path", "/x"], 57, "unknown template 'oracle'"),
    (["-t", "postgresql", "--path", "/x", "-o", "port=abc"], 57, "'port'"),
    (["-t", "postgresql", "--path", "/x", "-o", "point=snapshot"], 57, "point must be one of"),
    (["-t", "sqlite", "--path", "relative.db"], 57, "must be absolute"),
    (["-t", "sqlite", "--path", "/a/x.db", "--path", "/b/x.db"], 57, "distinct base names"),
    (["-t", "website", "--path", "/srv/site"], 57, "cannot tell"),
    (["-t", "sqlite", "--path", "/x.db", "--replicas", "m"], 53, "own replica"),
    (["-t", "sqlite", "--path", "/x.db", "--replicas", ","], 53, "at least one"),
])
def test_set_add_errors_are_one_line(tmp_path, args, code, words):
    cluster = tmp_path / "cluster.toml"
    argv = ["set", "add", "s1", *args, "--master", "m", "--cluster", cluster]
    if "--replicas" not in args:
        argv += ["--replicas", "r1"]
    p = pit(*argv, expect=code)
    assert p.stderr.startswith("pit: error: ") and p.stderr.count("\n") == 1
    assert words in p.stderr
    assert not cluster.exists(), "a refused set must not create or change the cluster file"


def test_set_add_dry_run_prints_and_changes_nothing(tmp_path):
    cluster = tmp_path / "cluster.toml"
    p = pit("set", "add", "db", "-t", "mysql", "--replicas", "r1", "--master", "m", "--cluster", cluster,
            "--dry-run")
    assert "[sets.db.app]" in p.stdout and "builtin:mysql.lock" in p.stdout
    assert not cluster.exists()


def test_app_table_is_validated_when_loading(tmp_path):
    cluster = tmp_path / "c.toml"
    base = '[sets.db]\nmaster = "m"\nreplicas = ["r1"]\npaths = ["/var/lib/pg"]\n\n[sets.db.app]\n'
    cluster.write_text(base + 'template = "postgresql"\ndata = "/var/lib/pg"\nos_user = "postgres"\n'
                       'superuser = "postgres"\nport = 5432\nsocket_dir = "/run/postgresql"\nnonsense = 1\n')
    with pytest.raises(TemplateError, match="set 'db'.*unknown key 'nonsense'"):
        load_cluster_sets(str(cluster))
    cluster.write_text(base + 'template = "postgresql"\ndata = "/elsewhere"\n')
    with pytest.raises(TemplateError, match="not under any of the set's paths"):
        load_cluster_sets(str(cluster))
    cluster.write_text(base + 'template = "sqlite"\ndatabases = ["/var/lib/pg/a.db"]\nside_dir = "/var/lib/pg"\n'
                       'pre = [42]\n')
    with pytest.raises(TemplateError, match=r"pre\[0\]"):
        load_cluster_sets(str(cluster))
    cluster.write_text('[sets.db]\nmaster = "m"\nreplicas = ["m"]\npaths = ["/x"]\n')
    with pytest.raises(ConfigError, match="own replica"):
        load_cluster_sets(str(cluster))


def test_render_round_trips_odd_values():
    table = build_set("website", "w", ["/etc/apache2", '/srv/we"b \\ site'], ["r1"], "m")
    assert table["app"]["server"] == "apache" and table["app"]["config"] == "/etc/apache2/apache2.conf"
    text = render_set("w", table)
    assert tomllib.loads(text)["sets"]["w"] == table


def test_parse_options_types():
    assert parse_options("postgresql", ["port=6000", "amcheck=off", "hook_timeout=2.5"]) == \
        {"port": 6000, "amcheck": False, "hook_timeout": 2.5}
    with pytest.raises(TemplateError, match="needs a value"):
        parse_options("postgresql", ["port"])
    with pytest.raises(TemplateError, match="not a bool"):
        parse_options("postgresql", ["amcheck=maybe"])


def test_image_path_maps_live_paths_into_an_image():
    paths = ["/var/lib/postgresql/15/main", "/srv/www"]
    assert image_path(paths, "/img", "/var/lib/postgresql/15/main") == "/img/main"
    assert image_path(paths, "/img", "/srv/www/a/b.html") == "/img/www/a/b.html"
    with pytest.raises(TemplateError):
        image_path(paths, "/img", "/srv/wwwx")


# ------------------------------------------------------------------ MySQL
def test_mysql_template_generates_lock_session_commands():
    table = build_set("mysql", "erp", ["/data/mysql"], ["r1"], "m",
                      ["client=mysql -h db.local -u backup --password=s3cret"])
    app = table["app"]
    assert table["paths"] == ["/data/mysql"] and app["data"] == "/data/mysql"
    s = mysql_session(app)
    assert s["argv"] == ["mysql", "-h", "db.local", "-u", "backup", "--password=s3cret", "--batch",
                         "--skip-column-names", "--unbuffered"]
    assert s["pre"] == ["FLUSH TABLES WITH READ LOCK"] and s["post"] == ["UNLOCK TABLES"]
    default = mysql_session(build_set("mysql", "e", [], ["r1"], "m")["app"])
    assert default["argv"][:2] == ["mysql", "--defaults-file=/etc/mysql/debian.cnf"]


def test_mysql_check_looks_at_the_files(tmp_path):
    cfg = set_config({"paths": ["/var/lib/mysql"], "app": build_set("mysql", "e", [], ["r1"], "m")["app"]})
    img = tmp_path / "img"
    (img / "mysql" / "mysql").mkdir(parents=True)
    (img / "mysql" / "ibdata1").write_bytes(b"x" * 100)
    res = check_image(cfg, str(img))
    assert res.ok and any("files only" in n for n in res.notes)
    shutil.rmtree(img / "mysql" / "mysql")
    (img / "mysql" / "ibdata1").unlink()
    (img / "mysql" / "stray").write_text("x")
    res = check_image(cfg, str(img))
    assert not res.ok and "system schema" in res.message


# ------------------------------------------------------------------ SQLite
def _writer(db: str, stop: threading.Event, batches: list) -> None:
    con = sqlite3.connect(db, timeout=30)
    n = 0
    while not stop.is_set():
        with con:  # one transaction of 10 rows
            con.executemany("INSERT INTO t (batch, pad) VALUES (?, ?)", [(n, os.urandom(200)) for _ in range(10)])
        n += 1
        batches.append(n)
    con.close()


@pytest.mark.parametrize("point", ["backup", "vacuum"])
def test_sqlite_point_copies_a_consistent_database_while_it_is_written(tmp_path, point):
    db = str(tmp_path / "live" / "shop.db")
    os.makedirs(os.path.dirname(db))
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, batch INTEGER, pad BLOB)")
    con.commit()
    con.close()
    side = str(tmp_path / "side" / "shop")
    table = build_set("sqlite", "shop", [db], ["r1"], "m", {"side_dir": side, "point": point})
    cfg = set_config({"name": "shop", **table})
    stop, batches = threading.Event(), []
    th = threading.Thread(target=_writer, args=(db, stop, batches))
    th.start()
    try:
        while len(batches) < 20:
            th.join(0.01)
        counts = []
        for pid in range(3):
            with around_point(cfg, pid) as ph:
                copy = sqlite_copy_path(cfg.app, db)
                c = sqlite3.connect(f"file:{copy}?mode=ro", uri=True)
                rows, = c.execute("SELECT count(*) FROM t").fetchone()
                assert c.execute("PRAGMA integrity_check").fetchone() == ("ok",)
                assert c.execute("PRAGMA journal_mode").fetchone()[0] in ("delete", "memory")
                c.close()
                counts.append(rows)
            assert ph.ok and "shop.db" in ph.pre.runs[0].output
    finally:
        stop.set()
        th.join()
    assert all(n % 10 == 0 and n > 0 for n in counts), f"a copy holds half a transaction: {counts}"
    assert counts == sorted(counts)
    assert not [f for f in os.listdir(side) if f.startswith(".")], "no temporary file left behind"

    # the image check on an image laid out like a restored snapshot: <base name of the set path>/...
    img = tmp_path / "img"
    shutil.copytree(side, img / "shop")
    res = check_image(cfg, str(img))
    assert res.ok, res.message
    assert res.details == ["shop.db: integrity_check ok"]


def test_sqlite_check_fails_on_a_damaged_or_missing_copy(tmp_path):
    side = tmp_path / "side"
    side.mkdir()
    db = side / "app.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE t (a INTEGER PRIMARY KEY, b TEXT)")
    con.execute("CREATE INDEX tb ON t (b)")
    con.executemany("INSERT INTO t (b) VALUES (?)", [(f"row {i} " + "x" * 300,) for i in range(2000)])
    con.commit()
    con.close()
    cfg = set_config({"paths": [str(side)], "app": {"template": "sqlite", "databases": ["/srv/app.db"],
                                         "side_dir": str(side), "pre": [], "post": []}})
    img = tmp_path / "img"
    shutil.copytree(side, img / "side")
    assert check_image(cfg, str(img)).ok
    # damage an index page in the middle of the file
    path = img / "side" / "app.db"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        for off in range(size // 2, size // 2 + 4096 * 4, 4096):
            f.seek(off + 100)
            f.write(os.urandom(800))
    res = check_image(cfg, str(img))
    assert not res.ok and res.message.startswith("app.db: ")
    # header destroyed: not a database at all
    with open(path, "r+b") as f:
        f.write(b"\0" * 100)
    res = check_image(cfg, str(img))
    assert not res.ok and "app.db" in res.message
    path.unlink()
    res = check_image(cfg, str(img))
    assert not res.ok and "not in the image" in res.message


def test_sqlite_hook_fails_on_a_missing_database(tmp_path):
    cfg = set_config({"name": "s", **build_set("sqlite", "s", [str(tmp_path / "none.db")], ["r1"], "m",
                                    {"side_dir": str(tmp_path / "side")})})
    from replicator.errors import HookFailed

    with pytest.raises(HookFailed, match="does not exist"):
        with around_point(cfg, 1):
            pass


# ------------------------------------------------------------------ web site
def test_website_check(tmp_path):
    table = build_set("website", "web", ["/etc/nginx", "/var/www/html"], ["r1"], "m")
    cfg = set_config({"name": "web", **table})
    img = tmp_path / "img"
    (img / "nginx").mkdir(parents=True)
    (img / "nginx" / "nginx.conf").write_text(
        "events {}\nhttp { server { listen 127.0.0.1:8080; root /var/www/html; } }\n")
    (img / "html" / "img").mkdir(parents=True)
    (img / "html" / "index.html").write_text("<h1>shop</h1>")
    res = check_image(cfg, str(img))
    assert res.ok, res.message
    assert res.details[0] == "document root holds 1 files"
    if web_config_test(table["app"], "/x") is None:
        assert res.notes == ["nginx is not installed on this node: configuration not parsed"]
    else:
        assert "nginx configuration parses" in res.details
    (img / "html" / "index.html").unlink()
    res = check_image(cfg, str(img))
    assert not res.ok and res.message == "the document root /var/www/html is empty"
    shutil.rmtree(img / "html")
    assert "not in the image" in check_image(cfg, str(img)).message
    (img / "html").mkdir()
    (img / "html" / "a").write_text("a")
    (img / "nginx" / "nginx.conf").unlink()
    assert "configuration /etc/nginx/nginx.conf is not in the image" in check_image(cfg, str(img)).message


def test_no_app_table_means_no_check(tmp_path):
    res = check_image(set_config({"paths": ["/x"]}), str(tmp_path))
    assert res.ok and res.notes == ["no application check"]
    app = {"template": "website", "server": "nginx", "config": "/x/n.conf", "docroot": "/x/www", "check": False}
    assert validate_app(app, ["/x"]) is app
    res = check_image(set_config({"paths": ["/x"], "app": app}), str(tmp_path))
    assert res.message == "no application check configured"


def test_postgresql_check_fails_without_a_data_directory(tmp_path):
    table = build_set("postgresql", "db", ["/var/lib/postgresql/15/main"], ["r1"], "m")
    img = tmp_path / "img"
    (img / "main" / "global").mkdir(parents=True)
    res = check_image(set_config(table), str(img))
    assert not res.ok and res.message == "PG_VERSION is missing from the data directory"
    res = check_image(set_config(table), str(tmp_path / "empty"))
    assert not res.ok and "not in the image" in res.message


def test_postgresql_check_unavailable_without_the_image_version(tmp_path):
    from replicator.errors import CheckUnavailable

    table = build_set("postgresql", "db", ["/var/lib/postgresql/99/main"], ["r1"], "m")
    data = tmp_path / "img" / "main"
    (data / "global").mkdir(parents=True)
    (data / "PG_VERSION").write_text("99\n")
    (data / "global" / "pg_control").write_bytes(b"\0" * 8192)
    with pytest.raises(CheckUnavailable, match="PostgreSQL 99 binaries are not installed") as ei:
        check_image(set_config(table), str(tmp_path / "img"))
    assert ei.value.exit_code == 64


def _fake_basebackup_app(tmp_path):
    """The basebackup point hook with a stand-in pg_basebackup that writes a data directory."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "pg_basebackup"
    fake.write_text('#!/bin/sh\nwhile [ "$1" != "-D" ]; do shift; done\nmkdir -p "$2" && echo new > "$2/PG_VERSION"\n')
    fake.chmod(0o755)
    side = tmp_path / "side"
    table = build_set("postgresql", "sales", [str(tmp_path / "data")], ["b"], "a",
                      {"point": "basebackup", "side_dir": str(side), "bindir": str(bindir), "os_user": "root"})
    return table["app"], side


def test_basebackup_point_replaces_the_copy_but_never_a_running_servers_directory(tmp_path):
    app, side = _fake_basebackup_app(tmp_path)
    (side / "base").mkdir(parents=True)
    (side / "base" / "PG_VERSION").write_text("old\n")
    run = lambda: subprocess.run(["sh", "-c", app["pre"][0]], capture_output=True, text=True)  # noqa: E731
    r = run()
    assert r.returncode == 0, r.stderr
    assert (side / "base" / "PG_VERSION").read_text() == "new\n" and not (side / "base.new").exists()
    # a promoted node started its server on the image's own directory: the next point must not delete it
    (side / "base" / "postmaster.pid").write_text("4242\n")
    r = run()
    assert r.returncode == 1 and "postmaster.pid" in r.stderr, r.stderr
    assert (side / "base" / "postmaster.pid").exists() and (side / "base" / "PG_VERSION").read_text() == "new\n"
