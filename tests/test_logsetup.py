"""store/logsetup.py: one line per event; under systemd (JOURNAL_STREAM naming stderr) a `<N>`
syslog priority prefix per line and no timestamp, else timestamped lines. Each mode in a real
subprocess whose stderr is a file, with and without JOURNAL_STREAM."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

PROGRAM = r"""
import logging, sys
from store.logsetup import setup_logging
from wsgidav import util
util.init_logging({"verbose": 4, "logging": {"enable": True}})   # wsgidav's own stdout handler
journal = setup_logging(sys.argv[1])
log = logging.getLogger("pit.agent")
log.debug("debug detail")
log.info("set web: point %d made", 7)
log.warning("replica r2 disconnected:\nconnection reset")
log.error("takeover hook failed")
logging.getLogger("pit.alerts").critical("ALERT critical failover")
try:
    raise RuntimeError("boom")
except RuntimeError:
    log.exception("sender crashed")
logging.getLogger("wsgidav.request").info("GET /web/ 200")
print("journal" if journal else "plain")
"""

EVENTS = [("DEBUG", 7, "pit.agent", "debug detail"), ("INFO", 6, "pit.agent", "set web: point 7 made"),
          ("WARNING", 4, "pit.agent", r"replica r2 disconnected:\nconnection reset"),
          ("ERROR", 3, "pit.agent", "takeover hook failed"), ("CRITICAL", 2, "pit.alerts", "ALERT critical failover"),
          ("ERROR", 3, "pit.agent", "sender crashed"), ("INFO", 6, "wsgidav.request", "GET /web/ 200")]


def run(tmp_path, level: str, journal_stream: str | None = "match"):
    err = tmp_path / "stderr"
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    env["PYTHONPATH"] = ROOT
    with open(err, "wb") as f:
        if journal_stream == "match":
            st = os.fstat(f.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        elif journal_stream is not None:
            env["JOURNAL_STREAM"] = journal_stream
        p = subprocess.run([sys.executable, "-c", PROGRAM, level], stdout=subprocess.PIPE, stderr=f, env=env,
                           timeout=60)
    assert p.returncode == 0, err.read_text()
    return p.stdout.decode(), err.read_text().splitlines()


def test_journal_mode_has_priority_prefixes_and_no_timestamps(tmp_path):
    out, lines = run(tmp_path, "DEBUG", "match")
    assert out == "journal\n"  # wsgidav's request line came here, not to stdout
    assert len(lines) == len(EVENTS), lines  # one line per event, the traceback included
    for line, (_, prio, name, msg) in zip(lines, EVENTS):
        assert line.startswith(f"<{prio}>{name}: {msg}"), (line, prio, msg)
        assert not re.search(r"\d{4}-\d\d-\d\d", line), line
    assert "Traceback (most recent call last):" in lines[5] and r"\n" in lines[5] and "RuntimeError: boom" in lines[5]


@pytest.mark.parametrize("journal_stream", [None, "0:0", "garbage"])
def test_plain_mode_keeps_timestamps_without_prefixes(tmp_path, journal_stream):
    """No JOURNAL_STREAM, or one naming another stream than stderr (a redirected child): plain lines."""
    out, lines = run(tmp_path, "INFO", journal_stream)
    assert out == "plain\n"
    want = [e for e in EVENTS if e[0] != "DEBUG"]  # the level is applied
    assert len(lines) == len(want), lines
    for line, (level, _, name, msg) in zip(lines, want):
        assert re.match(rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}} {re.escape(name)} {level} ", line), line
        assert line.endswith(msg) or level == "ERROR" and "Traceback" in line, line
        assert not line.startswith("<")


def test_priorities_and_bad_levels():
    import logging

    from store.logsetup import priority, setup_logging

    assert [priority(lv) for lv in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR,
                                    logging.CRITICAL, 5, 25, 35, 45)] == [7, 6, 4, 3, 2, 7, 6, 4, 3]
    with pytest.raises(ValueError, match="LOUD"):
        setup_logging("LOUD")
