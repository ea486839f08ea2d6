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
install their own SIGINT handler; while it is in place, the watchdog only says at once that the
command will stop after the current step, and a second Ctrl-C ends the process within `GRACE`
seconds (without saving; the newest checkpoint is kept). A command that reports the interrupt
itself calls `reporting()` first: the watchdog then prints nothing more and only ends the
process (status 130) if it has not exited `GRACE` seconds after a further Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

__all__ = ["install", "set_message", "reporting", "GRACE"]

#: seconds the main thread gets to reach Python's handler before the watchdog ends the process.
GRACE = 0.5

_message = "interrupted (Ctrl-C)"
_handled = threading.Event()


def set_message(text: str) -> None:
    """What an interrupt says, e.g. ``"interrupted: 4 of 5 pairs written to eval.csv; ..."``."""
    global _message
    _message = text


def reporting() -> None:
    """The main thread is reporting an interrupt itself (its own lines, then exit 130): the
    watchdog adds no message of its own."""
    _handled.set()


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


def _say(text: str) -> None:
    try:
        sys.stderr.write(("\n" if sys.stderr.isatty() else "") + text + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _watch(receive: socket.socket, send: socket.socket) -> None:
    foreign = 0  # Ctrl-C received while a command's own handler was in charge
    while True:
        try:
            data = receive.recv(64)
        except OSError:
            return
        if not data:
            return
        if signal.SIGINT not in data:
            continue
        if signal.getsignal(signal.SIGINT) is not _handler:
            # a command that stops gracefully (training: finish the step, save a checkpoint);
            # the first Ctrl-C is its to handle, a second one ends the process at once
            foreign += 1
            if foreign == 1:
                _say("stopping after the current step (Ctrl-C again to stop at once)")
                continue
            if _handled.wait(GRACE):
                time.sleep(GRACE)
            else:
                _say("interrupted twice: stopped at once without saving (the newest checkpoint "
                     "is kept)")
            _exit()
        handled = _handled.wait(GRACE)
        if handled:  # the main thread is reporting it; give it as long again, then end anyway
            time.sleep(GRACE)
        else:
            _say(_message)
        _exit()


def _exit() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(130)
