"""``libremote status`` for operators (issue 22), torch-free: health in the text view, several
daemons at once (the pool), ``--watch`` redrawing; and the front's spill-storm log."""

from __future__ import annotations

import json
import logging
import types

from ops_support import MetricsDaemon, cli


def test_status_watches_one_daemon_or_several(tmp_path):
    with MetricsDaemon() as server:
        watched = cli("status", "--server", server.address, "--watch", "0.3", "--count", "2")
        assert watched.returncode == 0, watched.stderr
        assert watched.stdout.count("libremote daemon tcp://") == 2 and "every 0.3 s" in watched.stdout
        assert "HEALTH" in watched.stdout and "dev 0: healthy" in watched.stdout
        missing = "tcp://127.0.0.1:1"
        pool = cli("status", "--server", f"{server.address},{missing}", "--timeout", "2")
        assert pool.returncode == 0, pool.stderr
        assert pool.stdout.startswith("pool of 2 daemons: 1 devices (0 unhealthy)")
        assert f"== {missing}: libremote: no daemon answered" in pool.stdout
        reports = json.loads(cli("status", "--server", f"{server.address},{missing}", "--timeout", "2", "--json").stdout)
        assert [r["daemon"]["address"] for r in reports] == [server.address, missing]
        assert reports[0]["daemon"]["metrics"] == server.url and reports[0]["devices"][0]["health"]["healthy"]


def test_a_spill_storm_is_logged_once_with_the_sessions_that_spill_most(caplog):
    from libremote_server.telemetry.collect import STORM_WINDOW_S, Telemetry

    session = types.SimpleNamespace(id="abc123", tenant=types.SimpleNamespace(name="research"),
                                    stats={"memory_spilled": 300 << 20}, devices=[types.SimpleNamespace(index=0)])
    telemetry = Telemetry.__new__(Telemetry)
    telemetry.front = types.SimpleNamespace(sessions={b"client-identity": session})
    from libremote_server.telemetry.collect import FrontCounters

    telemetry.counters, telemetry._spill_marks, telemetry._storming = FrontCounters(), {}, set()
    budget = 100 << 20

    def report(moved):
        return {"devices": [{"index": 0, "residency": {"device_budget": budget, "bytes_evicted": moved // 2,
                                                       "bytes_restored": moved - moved // 2}}]}

    with caplog.at_level(logging.INFO, logger="libremote.server"):
        for second in range(0, 30):  # 10 MiB/s: no storm
            telemetry._watch_spills(report(second * (10 << 20)), float(second))
        assert not telemetry.counters.spill_storms
        moved = 30 * (10 << 20)
        for second in range(30, 30 + int(STORM_WINDOW_S) + 2):  # 40 MiB/s: 4 budgets in 10 s
            moved += 40 << 20
            telemetry._watch_spills(report(moved), float(second))
        assert telemetry.counters.spill_storms == {0: 1}
        for second in range(45, 70):  # it calms down
            telemetry._watch_spills(report(moved), float(second))
    storms = [record for record in caplog.records if getattr(record, "event", None) == "spill_storm"]
    assert len(storms) == 1 and "abc123 (research, 300 MiB)" in storms[0].getMessage()
    assert [r for r in caplog.records if getattr(r, "event", None) == "spill_storm_over"]
