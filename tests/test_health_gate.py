"""The health gate's rules, directly (daemon/health_gate.py is pure: readings in, verdict out)."""

from __future__ import annotations

from pitstop.daemon.health_gate import Gate, GatePolicy, LoopReading, Verdict, recent_rate

POLICY = GatePolicy(required_units=("app.service",), fraction=0.8, deadline_s=60, hold_s=10)
UP = {"app.service": "active"}


def run(n: int, t: float, fps: float = 30.0) -> LoopReading:
    """A running loop that delivered `n` results in `t` s of its run."""
    return LoopReading("running", frames_out=n, elapsed_s=t, throughput_fps=fps)


def test_passes_once_every_check_held_for_the_hold_time() -> None:
    g = Gate(POLICY, {"det": 30.0}, ("det",))
    assert g.step(0, UP, {"det": run(100, 4)}).verdict is Verdict.WAIT
    assert g.step(5, UP, {"det": run(250, 9)}).verdict is Verdict.WAIT  # 37.5/s, held 5 s
    r = g.step(10, UP, {"det": run(400, 14)})
    assert r.verdict is Verdict.PASS and r.reason == "every check held for 10 s"
    assert r.rates == {"det": 30.0}
    assert "loop det: 30.0/s, needs 24.0/s (80% of 30.0/s before)" in r.details


def test_a_break_restarts_the_hold() -> None:
    g = Gate(POLICY, {"det": 30.0}, ("det",))
    g.step(0, UP, {"det": run(100, 4)})
    r = g.step(8, {"app.service": "activating"}, {"det": run(340, 12)})
    assert r.verdict is Verdict.WAIT and r.reason == "unit app.service is activating"
    assert g.step(9, UP, {"det": run(370, 13)}).verdict is Verdict.WAIT
    assert g.step(18, UP, {"det": run(640, 22)}).verdict is Verdict.WAIT  # held 9 s of 10
    assert g.step(19, UP, {"det": run(670, 23)}).verdict is Verdict.PASS


def test_slow_loop_fails_at_the_deadline_with_its_figures() -> None:
    g = Gate(POLICY, {"det": 30.0}, ("det",))
    assert g.step(0, UP, {"det": run(10, 1)}).verdict is Verdict.WAIT
    r = g.step(59, UP, {"det": run(590, 59)})
    assert r.verdict is Verdict.WAIT
    r = g.step(60, UP, {"det": run(600, 60)})
    assert r.verdict is Verdict.FAIL
    assert r.reason == "not healthy after 60 s: loop det: 10.0/s, needs 24.0/s (80% of 30.0/s before)"


def test_failed_unit_fails_at_once() -> None:
    r = Gate(POLICY, {}, ()).step(1, {"app.service": "failed"}, {})
    assert r.verdict is Verdict.FAIL and r.reason == "unit app.service is failed"


def test_loop_that_is_not_running_is_named_with_its_cause() -> None:
    g = Gate(POLICY, {"det": 30.0}, ("det",))
    r = g.step(1, UP, {"det": LoopReading("backoff", cause="killed by SIGSEGV")})
    assert r.verdict is Verdict.WAIT and r.reason == "loop det is backoff (killed by SIGSEGV)"
    r = g.step(2, UP, {})
    assert r.reason == "loop det is not supervised"


def test_loop_without_a_baseline_must_produce_something() -> None:
    g = Gate(GatePolicy(hold_s=0), {}, ("new",))
    assert g.step(0, {}, {"new": run(0, 3, fps=0)}).verdict is Verdict.WAIT
    r = g.step(1, {}, {"new": run(3, 4, fps=1)})
    assert r.verdict is Verdict.PASS
    assert "(no figure from before the update)" in r.details[0]


def test_loop_no_longer_configured_is_not_gated() -> None:
    r = Gate(GatePolicy(hold_s=0), {"gone": 30.0}, ()).step(0, {}, {})
    assert r.verdict is Verdict.PASS and r.details == ("loop gone is no longer configured (not gated)",)


def test_rate_is_recent_and_not_across_runs() -> None:
    assert recent_rate(run(100, 10), run(160, 12)) == 30.0
    assert recent_rate(None, run(160, 12, fps=13.3)) == 13.3
    g = Gate(GatePolicy(fraction=0.5, hold_s=0), {"det": 20.0}, ("det",))
    g.step(0, {}, {"det": run(1000, 50)})
    r = g.step(1, {}, {"det": run(40, 2, fps=20.0)})  # a restarted child: counters from zero again
    assert r.rates == {"det": 20.0} and r.verdict is Verdict.PASS


def test_hold_not_complete_by_the_deadline_fails() -> None:
    g = Gate(GatePolicy(deadline_s=10, hold_s=5), {}, ())
    assert g.step(7, {}, {}).verdict is Verdict.WAIT
    r = g.step(10, {}, {})
    assert r.verdict is Verdict.FAIL and r.reason == "the checks held only 3 s of 5 s by the deadline"


def test_a_slow_loop_is_measured_over_the_hold_window_not_one_interval() -> None:
    """At 1 result/s, figures every 5 s hold 3 or 7 results by the luck of timing: one interval alone says
    0.6/s (below 80%) every other time; over the hold window (here 10 s) the rate stays near 1/s and passes.
    A loop at a quarter of its baseline still fails, over any window."""
    g = Gate(POLICY, {"det": 1.0}, ("det",))
    frames, t = 10, 10.0
    verdicts = []
    for n, step in enumerate((3, 7, 3, 7, 3, 7)):
        frames, t = frames + step, t + 5
        r = g.step(5.0 * (n + 1), UP, {"det": run(frames, t, fps=1.0)})
        verdicts.append(r.verdict)
        if n >= 2:  # from the third reading on, the window spans 10 s: 10 results
            assert r.rates["det"] == 1.0, r
    assert verdicts[-1] is Verdict.PASS, verdicts
    slow = Gate(POLICY, {"det": 1.0}, ("det",))
    frames, t = 10, 10.0
    for n in range(12):
        frames, t = frames + (2 if n % 2 else 1), t + 5  # 0.3/s
        r = slow.step(5.0 * (n + 1), UP, {"det": run(frames, t, fps=0.3)})
    assert r.verdict is Verdict.FAIL and "loop det: 0.3/s, needs 0.8/s" in r.reason, r
