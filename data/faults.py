"""Fault injection for the crash harness: `DISTIL_CRASH_AT=point:n` kills the process with
SIGKILL the n-th time it reaches `point` (no cleanup, no flush: a real kill -9).
Unset (always, outside the harness) it costs one dictionary lookup."""
from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def crash_point(point: str) -> None:
    spec = os.environ.get("DISTIL_CRASH_AT")
    if not spec:
        return
    name, _, count = spec.partition(":")
    if name != point:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
