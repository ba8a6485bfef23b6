"""Signals, for the command line: Ctrl-C and SIGTERM stop a command cleanly, and a model file that
another process starts to change stops it with one line instead of a SIGBUS.

Ctrl-C and SIGTERM both raise KeyboardInterrupt in the main thread, the one way a command is
stopped: generation keeps the text it has and reports "interrupted", output files are not left
half-written (refengine.files), and the command exits 128 + the signal's number (130, 143).

A KeyboardInterrupt raised while Python code runs inside a C callback is lost: ctypes prints
"Exception ignored on calling ctypes callback function" and returns to C as if nothing happened.
numba compiles through llvmlite, which calls back into Python (ExecutionEngine's object cache
notify hook), so a Ctrl-C that arrives while a kernel compiles (the first decoded token of a run
with a cold numba cache) vanished: generation ran on to its end, or numba, whose hook never stored
the object code, failed later with "RuntimeError: no compiled object yet". Every such lost
exception goes to sys.unraisablehook; ours delivers the signal again a moment later, from a timer
thread, so that it lands once the callback has returned (delivered from the hook itself, it would
be raised inside the hook and lost again). And once a stop signal has arrived, main() reports any
error as the interruption it is a consequence of.

A model file stays memory-mapped while it is used, and a mapping whose file is truncated kills
the process with SIGBUS when it touches the missing pages. While a guard is active, refengine.gguf
takes a read lease (fcntl F_SETLEASE) on each file it maps: the kernel then holds back any process
that opens the file for writing or truncates it (up to /proc/sys/fs/lease-break-time, 45 s by
default) and tells us with SIGIO, and the command stops naming the file before anything changes.
"""

from __future__ import annotations

import _thread
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

from refengine import gguf
from refengine.errors import RefengineError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
REDELIVER_SECONDS = 0.01


class ModelFileChanged(RefengineError):
    """Another process opened a mapped model file for writing, or truncated it."""


class _Guard:
    def __init__(self):
        self.received: int | None = None  # the stop signal that arrived, if any
        self.pending: BaseException | None = None  # raised by a handler; re-raised if it was swallowed

    def on_stop(self, signum, frame) -> None:
        self.received = signum
        self.pending = KeyboardInterrupt()
        raise self.pending

    def on_lease_break(self, signum, frame) -> None:
        changed = gguf.broken_leases()
        if not changed:  # SIGIO for something else
            return
        names = ", ".join(str(p) for p in changed)
        self.pending = ModelFileChanged(
            f"{names} is being changed by another process (opened for writing or truncated) while in use; stopped"
        )
        raise self.pending

    def on_unraisable(self, unraisable, previous) -> None:
        if self.pending is not None and unraisable.exc_value is self.pending:
            # Lost inside a C callback: deliver the signal again once that callback has returned.
            signum = self.received if isinstance(self.pending, KeyboardInterrupt) else signal.SIGIO
            timer = threading.Timer(REDELIVER_SECONDS, _thread.interrupt_main, [signum])
            timer.daemon = True
            timer.start()
            return
        previous(unraisable)


@contextlib.contextmanager
def guard() -> Iterator[_Guard]:
    """Install the handlers for the length of one command; the previous ones come back afterwards.

    An inherited SIG_IGN is kept: a non-interactive shell starts background jobs with SIGINT ignored,
    so that a Ctrl-C meant for the foreground does not reach them. Outside the main thread (where
    Python cannot set handlers) nothing is installed."""
    state = _Guard()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    previous = {}
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, state.on_stop)
    previous[signal.SIGIO] = signal.signal(signal.SIGIO, state.on_lease_break)
    previous_hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: state.on_unraisable(unraisable, previous_hook)
    gguf.start_leases()
    try:
        yield state
    finally:
        gguf.stop_leases()
        sys.unraisablehook = previous_hook
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
