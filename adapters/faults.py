"""Fail points: named places where a test may have the process killed outright, or stalled.

`HOTPEFT_FAILPOINT=<name>` makes the process SIGKILL itself when it reaches `<name>`, so the
crash-consistency tests can stop a registration exactly between two of its writes.
`HOTPEFT_FAILPOINT=<name>=sleep:<seconds>` stalls there instead (the stalled-engine and drain
tests). Unset (the normal case) it costs one dictionary look-up.
"""
from __future__ import annotations

import os
import signal
import time


def failpoint(name: str) -> None:
    spec = os.environ.get("HOTPEFT_FAILPOINT")
    if spec is None:
        return
    point, _, action = spec.partition("=")
    if point != name:
        return
    if action.startswith("sleep:"):
        time.sleep(float(action.removeprefix("sleep:")))
    else:
        os.kill(os.getpid(), signal.SIGKILL)
