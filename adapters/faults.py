"""Fail points: named places where a test may have the process killed outright.

`HOTPEFT_FAILPOINT=<name>` makes the process SIGKILL itself when it reaches `<name>`, so the
crash-consistency tests can stop a registration exactly between two of its writes. Unset (the
normal case) it costs one dictionary look-up.
"""
from __future__ import annotations

import os
import signal


def failpoint(name: str) -> None:
    if os.environ.get("HOTPEFT_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
