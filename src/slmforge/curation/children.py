"""Processes a stage forks (datatrove's multiprocessing manager and pool workers in curate) die with it.

A SIGKILL gives the parent no chance to clean up, and a forked multiprocessing manager then lives on as
an orphan (before commit 1081a25, one was still alive minutes after curate was killed). Linux's parent-death signal fixes that at
the right depth: every process forked while `die_with_parent()` is active asks the kernel for SIGKILL
when its parent goes (prctl PR_SET_PDEATHSIG), and exits at once if the parent is already gone. The
signal follows the thread that forked the child, so only forks made from a thread that lives as long as
the work (datatrove forks its manager and its pool from the calling thread) belong inside the block.
Elsewhere than Linux it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
_state = {"active": 0, "registered": False, "parent": 0}


def _in_child() -> None:
    if not _state["active"]:
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != _state["parent"]:  # the parent died before the request took effect
        os._exit(1)


@contextlib.contextmanager
def die_with_parent():
    """Children forked inside this block are killed by the kernel when this process dies."""
    if not sys.platform.startswith("linux"):
        yield
        return
    if not _state["registered"]:
        os.register_at_fork(after_in_child=_in_child)
        _state["registered"] = True
    _state["active"] += 1
    _state["parent"] = os.getpid()
    try:
        yield
    finally:
        _state["active"] -= 1
