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
