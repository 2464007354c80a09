"""`pit config check FILE [--kind ...]`: good files of each kind pass; a bad key gives one line on stderr
naming the key and its line in the file, with the loader's exit code (ConfigError 53 for the agent and
cluster files, InvalidArgument 22 for pit serve's); a TOML syntax error gives its line. Real `pit`
processes (the exit code and the single line are the point)."""
from __future__ import annotations

import re

import pytest

from conftest import run_pit
from replicator.commands.ops import key_lines, locate
from replicator.errors import ConfigError
from store.errors import InvalidArgument

AGENT = """\
# this node
state = "/var/lib/pit/state"
repo = "/var/lib/pit/repo"

listen = "0.0.0.0:7400"
live = {web = ["/srv/www"]}
metrics = "127.0.0.1:9474"

[alerts]
command = "/usr/local/bin/page-me"
smtp = {host = "mail.example.com", port = 587, starttls = true, from = "pit@example.com", to = ["it@example.com"]}
lag_seconds = 300

[app."sales-db"]
port=5433
socket_dir = "/run/postgresql"
"""

CLUSTER = """\
# the primary's cluster file
[sets.web]
master = "primary"
replicas = ["r1", "r2"]
paths = ["/srv/www"]
mode = "mirror"
schedule = {every = "15m"}

[sets."sales-db"]
master = "primary"
replicas = ["r1"]
paths = ["/var/lib/db"]
point_quiet = 0

[failover]
secondary = "r1"
etcd = ["http://10.0.0.1:2379", "http://10.0.0.2:2379", "http://10.0.0.3:2379"]
ttl = 5
checks = [
  {tcp = "10.0.0.1:5432"},
  {http = "http://10.0.0.1/", status = 200, text = '''Welcome'''},
]
takeover = ["/etc/pit/hooks/start-services"]
"""

SERVE = """\
[server]
listen = "0.0.0.0"
port = 8080

[users.alice]
password = "scrypt$16384$8$1$c2FsdA==$aGFzaA=="
sets = ["web"]

[users.bob]
password = "scrypt$16384$8$1$c2FsdA==$aGFzaA=="
[users.bob.scope]
web = ["www/uploads"]
"""


def write(tmp_path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def line_of(text: str, needle: str) -> int:
    hits = [i for i, ln in enumerate(text.splitlines(), 1) if needle in ln]
    assert len(hits) == 1, (needle, hits)
    return hits[0]


def check_fails(path: str, *args, cls: type) -> tuple[int, str]:
    p = run_pit(None, "config", "check", path, *args, expect=cls.exit_code)
    err = p.stderr.decode()
    assert err.count("\n") == 1 and err.startswith("pit: error: "), repr(err)
    assert "internal error" not in err and not p.stdout
    m = re.match(r"pit: error: (.+?):(\d+): (.*)\n\Z", err)
    assert m and m.group(1) == path, err
    return int(m.group(2)), m.group(3)


@pytest.mark.parametrize("kind,text,word", [("agent", AGENT, "agent configuration"),
                                            ("cluster", CLUSTER, "2 set(s)"),
                                            ("serve", SERVE, "2 user(s)")])
def test_good_files_pass_and_kind_is_told_by_the_keys(tmp_path, kind, text, word):
    path = write(tmp_path, f"{kind}.toml", text)
    for extra in ([], ["--kind", kind]):
        out = run_pit(None, "config", "check", path, *extra).stdout.decode()
        assert out.startswith(f"{path}: ok: ") and word in out, out


# (kind, text, replace this, with this, the key named, the line holding it (a needle), exit)
BAD = [
    ("agent", AGENT, 'repo = "', 'rpeo = "', "rpeo", "rpeo =", ConfigError),
    ("agent", AGENT, '"0.0.0.0:7400"', '"nowhere"', "listen", "listen =", ConfigError),
    ("agent", AGENT, '"0.0.0.0:7400"', "7400", "listen", "listen =", ConfigError),
    ("agent", AGENT, '["/srv/www"]', '["srv/www"]', "live", "live =", ConfigError),
    ("agent", AGENT, '"127.0.0.1:9474"', '"everywhere"', "metrics", "metrics =", ConfigError),
    ("agent", AGENT, "port = 587", 'port = "smtp"', "alerts.smtp.port", "port =", ConfigError),
    ("agent", AGENT, "lag_seconds = 300", "lag_secs = 300", "alerts.lag_secs", "lag_secs", ConfigError),
    ("agent", AGENT, "port=5433", 'port="5433"', "app.sales-db.port", 'port="5433"', ConfigError),
    ("agent", AGENT, 'socket_dir = "/run/postgresql"', 'data = "/srv/pg"', "app.sales-db.data", "data =", ConfigError),
    ("agent", AGENT, 'socket_dir = "/run/postgresql"', 'sockdir = "/run"', "app.sales-db.sockdir", "sockdir =",
     ConfigError),
    ("cluster", CLUSTER, 'mode = "mirror"', 'mode = "mirorr"', "sets.web.mode", "mode =", ConfigError),
    ("cluster", CLUSTER, "point_quiet = 0", "point_qiuet = 0", "sets.sales-db.point_qiuet", "point_qiuet",
     ConfigError),
    ("cluster", CLUSTER, 'replicas = ["r1"]', 'replicas = ["R1!"]', "sets.sales-db.replicas[0]", '"R1!"',
     ConfigError),
    ("cluster", CLUSTER, '{every = "15m"}', '{every = "15 fortnights"}', "sets.web.schedule.every", "schedule =",
     ConfigError),
    ("cluster", CLUSTER, "ttl = 5", "ttl = 1", "failover.ttl", "ttl =", ConfigError),
    ("cluster", CLUSTER, "ttl = 5", 'ttl = "soon"', "failover.ttl", "ttl =", ConfigError),
    ("cluster", CLUSTER, "status = 200", "stauts = 200", "failover.checks[1]", "stauts", ConfigError),
    ("cluster", CLUSTER, 'secondary = "r1"', 'secondary = "r2"', "failover.secondary", "secondary =", ConfigError),
    ("cluster", CLUSTER, "takeover = [", "take_over = [", "failover.take_over", "take_over", ConfigError),
    ("serve", SERVE, "port = 8080", "prot = 8080", "server.prot", "prot =", InvalidArgument),
    ("serve", SERVE, "port = 8080", 'port = "http"', "server.port", "port =", InvalidArgument),
    ("serve", SERVE, "[users.alice]\npassword = \"scrypt", "[users.alice]\npassword = \"plain",
     "users.alice.password", '"plain', InvalidArgument),
    ("serve", SERVE, 'sets = ["web"]', 'sets = "web"', "users.alice.sets", 'sets = "web"', InvalidArgument),
    ("serve", SERVE, 'port = 8080', 'port = 8080\ncertificate = "cert.pem"', "server.certificate", "certificate",
     InvalidArgument),
    ("serve", SERVE, 'port = 8080', 'port = 8080\nself_signed = "yes"', "server.self_signed", "self_signed",
     InvalidArgument),
]


@pytest.mark.parametrize("kind,text,old,new,key,needle,cls", BAD,
                         ids=[f"{b[0]}-{b[4]}-{i}" for i, b in enumerate(BAD)])
def test_a_bad_key_is_one_line_with_the_key_and_its_line(tmp_path, kind, text, old, new, key, needle, cls):
    assert text.count(old) == 1
    bad = text.replace(old, new)
    path = write(tmp_path, f"{kind}.toml", bad)
    for extra in ([], ["--kind", kind]):
        line, rest = check_fails(path, *extra, cls=cls)
        assert line == line_of(bad, needle), rest
        assert rest.startswith(f"{key}: "), rest


def test_a_missing_required_key_names_it_at_its_table(tmp_path):
    bad = AGENT.replace('state = "/var/lib/pit/state"\n', "")
    line, rest = check_fails(write(tmp_path, "agent.toml", bad), "--kind", "agent", cls=ConfigError)
    assert line == 1 and rest.startswith("state: ") and "required" in rest
    bad = CLUSTER.replace('master = "primary"\nreplicas = ["r1"]\n', 'replicas = ["r1"]\n')
    line, rest = check_fails(write(tmp_path, "cluster.toml", bad), cls=ConfigError)
    assert line == line_of(bad, '[sets."sales-db"]') and rest.startswith("sets.sales-db: ")


@pytest.mark.parametrize("kind,text,cls", [("agent", AGENT, ConfigError), ("cluster", CLUSTER, ConfigError),
                                           ("serve", SERVE, InvalidArgument)])
def test_a_toml_syntax_error_gives_its_line(tmp_path, kind, text, cls):
    lines = text.splitlines()
    n = len(lines) - 1 if kind != "cluster" else line_of(text, "ttl = 5") - 1
    lines[n] = lines[n].replace(" = ", " = = ", 1)
    path = write(tmp_path, f"{kind}.toml", "\n".join(lines) + "\n")
    line, rest = check_fails(path, "--kind", kind, cls=cls)
    assert line == n + 1 and "TOML syntax" in rest and f"line {n + 1}" in rest, rest
    # without --kind nothing tells the kind: the configuration error's code
    line, rest = check_fails(path, cls=ConfigError)
    assert line == n + 1


def test_what_cannot_be_told_apart_or_read(tmp_path):
    line, rest = check_fails(write(tmp_path, "x.toml", "# nothing\ncolour = 1\n"), cls=ConfigError)
    assert line == 1 and "--kind" in rest
    p = run_pit(None, "config", "check", str(tmp_path / "absent.toml"), expect=ConfigError.exit_code)
    assert p.stderr.decode().count("\n") == 1 and "absent.toml" in p.stderr.decode()
    # an agent file checked as pit serve's: the agent's first key is the unknown one
    path = write(tmp_path, "agent.toml", AGENT)
    line, rest = check_fails(path, "--kind", "serve", cls=InvalidArgument)
    assert line == line_of(AGENT, "state =") and rest.startswith("state: ")


def test_key_lines_of_tables_arrays_and_multiline_values():
    text = ('a = """x\n[not.a.table]\ny"""\n'
            "b = [\n  1,\n  # c\n  {k = 'v', 'q.r' = 2},\n]\n"
            '[t."u.v"]\nw = 1\n'
            "[[arr]]\nn = 1\n[[arr]]\nn = 2\n")
    lines = key_lines(text)
    assert lines[("a",)] == 1 and ("not", "a", "table") not in lines
    assert lines[("b",)] == 4 and lines[("b", 0)] == 5 and lines[("b", 1)] == 7
    assert lines[("b", 1, "k")] == 7 and lines[("b", 1, "q.r")] == 7
    assert lines[("t", "u.v")] == 9 and lines[("t", "u.v", "w")] == 10
    assert lines[("arr", 0)] == 11 and lines[("arr", 1, "n")] == 14


def test_locate_picks_the_bad_one_of_several_named_keys():
    text = "[failover]\nttl = 5\nconfirm = 0\nheartbeat = 0.5\n"
    import tomllib

    raw = tomllib.loads(text)
    path, line = locate("failover: confirm >= 1, heartbeat > 0 and hook_timeout > 0", raw, key_lines(text))
    assert path == ("failover", "confirm") and line == 3
