"""Named points of a job's life at which a fault test freezes the worker process that reaches them.

`BIG_FAILPOINTS="published=stop"` (several comma-separated) makes a worker stop itself with SIGSTOP at that point,
as `kill -STOP`, a stalled VM or a long pause would, so a test can freeze it exactly there, let the lease pass to
another worker, then wake it (SIGCONT) or kill it. Read once at import; unset (always, outside tests), `reached`
is a dictionary lookup. The points, in a job's order:

- `claimed`: the worker holds the job, nothing is loaded yet;
- `half_trained`: training is at half its steps;
- `trained`: the weights are learned, nothing is written;
- `published`: the version's files are written, the commit's transaction is not made;
- `committed`: the version is committed (its job ended with it), the worker has not moved on.
"""
from __future__ import annotations

import logging
import os
import signal
import threading

POINTS = ("claimed", "half_trained", "trained", "published", "committed")
ACTIONS = ("stop",)
log = logging.getLogger("big.failpoints")


def parse(text: str) -> dict[str, str]:
    """`point=action,...` as {point: action}; a ValueError naming a point or action that does not exist."""
    active = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        point, _, action = item.partition("=")
        if point not in POINTS or action not in ACTIONS:
            raise ValueError(f"BIG_FAILPOINTS: {item!r} is not point=action with a point of {', '.join(POINTS)} "
                             f"and an action of {', '.join(ACTIONS)}")
        active[point] = action
    return active


_ACTIVE = parse(os.environ.get("BIG_FAILPOINTS", ""))


def reached(point: str, job_id: str = "") -> None:
    if _ACTIVE.get(point) == "stop":
        log.warning("failpoint %s reached (job %s): process %d stops itself", point, job_id, os.getpid())
        for handler in logging.getLogger().handlers:  # the test reads the log to know where it stopped
            handler.flush()
        # Sent to this thread, not the process: a process-directed SIGSTOP is taken by whichever thread the kernel
        # picks (the main one, waiting in a join), and on busy cores this one ran on for a while, writing files.
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
