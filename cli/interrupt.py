"""Ctrl-C ends a command within about a second, even inside a long TensorFlow call.

Python runs a signal handler only when the main thread returns to the interpreter; inside one
long TensorFlow or XLA call (a compilation, a large convolution) that can take many seconds.
`install()` (called by `tfreg_cli.main.main`) keeps Python's normal behaviour (the handler raises
`KeyboardInterrupt`, and `tfreg_cli.common.user_errors` turns it into a message and exit 130) and
adds a watchdog thread woken through `signal.set_wakeup_fd` at the moment the signal arrives: if
the main thread has not reached the handler within `GRACE` seconds, the watchdog prints the
message (`set_message`, default "interrupted (Ctrl-C)") on its own line and ends the process
with status 130. Outputs are written atomically, so an interrupted write leaves no partial file.

Commands that handle Ctrl-C themselves (training saves a checkpoint at the end of the step)
install their own SIGINT handler; while it is in place the watchdog stays out of the way.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

__all__ = ["install", "set_message", "GRACE"]

#: seconds the main thread gets to reach Python's handler before the watchdog ends the process.
GRACE = 1.0

_message = "interrupted (Ctrl-C)"
_handled = threading.Event()


def set_message(text: str) -> None:
    """What an interrupt says, e.g. ``"interrupted: 4 of 5 pairs written to eval.csv; ..."``."""
    global _message
    _message = text


def _handler(signum: int, frame) -> None:
    _handled.set()
    raise KeyboardInterrupt


def install() -> None:
    """Install the handler and the watchdog (main thread only; no-op where SIGINT is ignored,
    e.g. a background job of a non-interactive shell)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return
    receive, send = socket.socketpair()
    send.setblocking(False)
    try:
        signal.set_wakeup_fd(send.fileno(), warn_on_full_buffer=False)
    except (ValueError, OSError):
        return
    signal.signal(signal.SIGINT, _handler)
    threading.Thread(target=_watch, args=(receive, send), daemon=True,
                     name="tfreg-interrupt").start()


def _watch(receive: socket.socket, send: socket.socket) -> None:
    while True:
        try:
            data = receive.recv(64)
        except OSError:
            return
        if not data:
            return
        if signal.SIGINT not in data or signal.getsignal(signal.SIGINT) is not _handler:
            continue  # another signal, or a command that handles Ctrl-C itself
        handled = _handled.wait(GRACE)
        if handled:  # the main thread is reporting it; give it as long again, then end anyway
            time.sleep(GRACE)
        try:
            if not handled:
                sys.stderr.write(("\n" if sys.stderr.isatty() else "") + _message + "\n")
            sys.stderr.flush()
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        os._exit(130)
