"""The serving thread's fair shares: the least served user first, even between another call's denoising steps;
each user's calls in order."""
import threading
import time

import pytest

from big.errors import QuotaExceeded
from big.generation import steps
from big.scheduling import FairScheduler


def test_a_polite_user_waits_behind_at_most_one_call_of_a_flooding_user():
    order, gate = [], threading.Event()
    sched = FairScheduler(max_queued=16)
    sched.submit("flood", gate.wait)  # holds the thread while the queues fill
    def slow(name):
        time.sleep(0.05)
        order.append(name)

    flood = [sched.submit("flood", slow, f"flood{i}") for i in range(8)]
    polite = [sched.submit("polite", order.append, "polite0")]
    gate.set()
    polite[0].result(timeout=5)
    polite.append(sched.submit("polite", order.append, "polite1"))
    for f in flood + polite:
        f.result(timeout=5)
    sched.close()
    assert order.index("polite0") <= 1  # behind at most the one flood call already picked
    assert [o for o in order if o.startswith("flood")] == [f"flood{i}" for i in range(8)]  # each user's in order
    assert order.index("polite1") - order.index("polite0") <= 2


def test_a_users_queue_is_bounded_and_errors_reach_the_caller():
    gate = threading.Event()
    sched = FairScheduler(max_queued=2)
    sched.submit("a", gate.wait)
    time.sleep(0.05)  # the first call is running, not waiting
    sched.submit("a", lambda: 1)
    sched.submit("a", lambda: 2)
    with pytest.raises(QuotaExceeded, match="2 generation requests waiting; at most 2"):
        sched.submit("a", lambda: 3)
    other = sched.submit("b", lambda: "b's own share")  # one user's full queue does not refuse another
    gate.set()
    assert other.result(timeout=5) == "b's own share"
    with pytest.raises(ZeroDivisionError):
        sched.submit("c", lambda: 1 / 0).result(timeout=5)
    sched.close()


def test_calls_of_one_batch_key_run_together_and_each_gets_its_own_result():
    gate, groups = threading.Event(), []

    def together(calls):
        groups.append([c[0] for c in calls])
        return [ValueError("bad") if c[0] == "bad" else c[0].upper() for c in calls]

    sched = FairScheduler(max_queued=16, window=0)
    sched.submit("x", gate.wait)
    same = [sched.submit(u, lambda name: name.upper(), u, batch=("k", together)) for u in ("a", "b", "bad")]
    other = sched.submit("c", lambda name: name.upper(), "c", batch=("other", together))
    later = sched.submit("a", lambda name: name.upper(), "a2", batch=("k", together))  # a's next call: after a's first
    gate.set()
    assert [f.result(timeout=5) for f in same[:2]] == ["A", "B"]
    with pytest.raises(ValueError):
        same[2].result(timeout=5)
    assert other.result(timeout=5) == "C" and later.result(timeout=5) == "A2"
    sched.close()
    assert groups[0] == ["a", "b", "bad"]  # one call of the batch function for the three heads of key k
    assert ["c"] not in groups and ["a2"] not in groups  # alone, they ran as plain calls


def test_a_lone_batchable_call_waits_the_window_for_company():
    groups = []
    sched = FairScheduler(max_queued=16, window=0.3)
    first = sched.submit("a", lambda n: n, "a", batch=("k", lambda calls: groups.append(calls) or [c[0] for c in calls]))
    time.sleep(0.05)
    second = sched.submit("b", lambda n: n, "b", batch=("k", lambda calls: groups.append(calls) or [c[0] for c in calls]))
    assert (first.result(timeout=5), second.result(timeout=5)) == ("a", "b")
    sched.close()
    assert len(groups) == 1 and len(groups[0]) == 2


def test_closing_cancels_what_still_waits():
    gate = threading.Event()
    sched = FairScheduler(max_queued=4)
    running = sched.submit("a", gate.wait)
    time.sleep(0.05)
    waiting = sched.submit("b", lambda: 1)
    sched.close()
    gate.set()
    assert running.result(timeout=5) is True and waiting.cancelled()


def denoise(log, name, n=20, step_s=0.01):
    """A call shaped like a denoising loop: `n` steps, each offered to the scheduler when done."""
    for i in range(n):
        time.sleep(step_s)
        log.append((name, i))
        steps.step_done()
    return name


def test_a_light_users_call_runs_between_the_steps_of_a_heavy_users_call():
    log = []
    sched = FairScheduler(max_queued=16)
    flood = [sched.submit("flood", denoise, log, f"flood{i}") for i in range(3)]
    flood[0].result(timeout=5)
    time.sleep(0.1)  # flood1 is a few steps in; flood has had the thread, polite never
    polite = sched.submit("polite", denoise, log, "polite", 3)
    assert polite.result(timeout=5) == "polite"
    assert not flood[1].done()  # it was paused at a step, not finished first
    assert [f.result(timeout=5) for f in flood] == ["flood0", "flood1", "flood2"]
    sched.close()
    at = log.index(("polite", 0))
    assert log[at - 1][0] == "flood1" and log[at:at + 3] == [("polite", i) for i in range(3)]
    assert [e for e in log if e[0] == "flood1"] == [("flood1", i) for i in range(20)]  # flood1 resumed where it was


def test_a_call_of_a_user_as_busy_as_the_running_one_waits_for_it_to_end():
    """Service is compared with the running call's users' service when it began: equals never cut into each
    other's calls (each would wait for the other's whole call and then some)."""
    log = []
    sched = FairScheduler(max_queued=16)
    a0 = sched.submit("a", denoise, log, "a0", 5)
    a0.result(timeout=5)
    b0 = sched.submit("b", denoise, log, "b0", 10)
    time.sleep(0.03)  # b0 has begun with less service than a: a's next call, arriving now, has more
    a1 = sched.submit("a", denoise, log, "a1", 5)
    a1.result(timeout=5), b0.result(timeout=5)
    sched.close()
    names = [n for n, _ in log]
    assert names == ["a0"] * 5 + ["b0"] * 10 + ["a1"] * 5


def test_a_users_own_calls_never_nest_and_equal_users_take_turns_call_by_call():
    log = []
    sched = FairScheduler(max_queued=16)
    calls = [sched.submit(u, denoise, log, f"{u}{i}", 5) for i in range(3) for u in ("a", "b")]
    for c in calls:
        c.result(timeout=5)
    sched.close()
    names = [n for n, _ in log]
    for u in ("a", "b"):  # each user's calls ran whole and in order
        mine = [n for n in names if n.startswith(u)]
        assert mine == [f"{u}{i}" for i in range(3) for _ in range(5)]
    assert {n for n in names[:10]} >= {"a0", "b0"}  # b did not wait for all of a's calls


def test_no_call_runs_inside_an_uninterrupted_one_and_nesting_is_bounded():
    log = []
    sched = FairScheduler(max_queued=16, max_depth=2)

    def held():
        with steps.uninterrupted():
            return denoise(log, "held", 10)

    sched.submit("a", denoise, [], "a's history", 3).result(timeout=5)
    first = sched.submit("a", held)
    time.sleep(0.03)
    other = sched.submit("b", denoise, log, "b", 2)
    first.result(timeout=5), other.result(timeout=5)
    assert [n for n, _ in log] == ["held"] * 10 + ["b"] * 2
    # Depth 2: a call nested in another is not itself interrupted.
    log.clear()
    sched.submit("c", denoise, [], "c's history", 3).result(timeout=5)
    outer = sched.submit("c", denoise, log, "c", 10)
    time.sleep(0.03)
    inner = sched.submit("d", denoise, log, "d", 10)
    time.sleep(0.03)
    third = sched.submit("e", denoise, log, "e", 2)
    for f in (outer, inner, third):
        f.result(timeout=5)
    sched.close()
    names = [n for n, _ in log]
    d = [i for i, n in enumerate(names) if n == "d"]
    assert d == list(range(d[0], d[0] + 10))  # d ran whole once it started, e did not cut into it
    assert names.index("e") < len(names) - 1 and names[-1] == "c"
