"""The serving thread's fair shares: the least recently served user first, each user's calls in order."""
import threading
import time

import pytest

from big.errors import QuotaExceeded
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
