"""Pieces shared by the package's command lines (``jem_ext.train``, ``jem_ext.eval``,
``jem_ext.bench``).

Every command reports a bad flag as one line and exit status 2, shows each default once in
``--help``, and refuses non-finite numbers and more ``--threads`` than the machine has cores
before anything runs. SIGTERM (what ``timeout``, schedulers and torchrun send) stops a command
as Ctrl-C does: :func:`terminate_as_interrupt` turns it into :class:`Terminated`, a
KeyboardInterrupt, so the writes in progress are abandoned (their temporary files removed) and
the command exits with 143 (128 + SIGTERM) after its one-line message.
"""

from __future__ import annotations

import argparse
import math
import os
import select
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "DefaultsHelpFormatter",
    "RaisingParser",
    "Terminated",
    "check_threads",
    "finite_float",
    "interrupt_status",
    "machine_cores",
    "terminate_as_interrupt",
    "terminated",
]

SIGINT_STATUS = 128 + signal.SIGINT  # 130, as a shell reports Ctrl-C
SIGTERM_STATUS = 128 + signal.SIGTERM  # 143


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM; handled wherever Ctrl-C is."""


_received: list[int] = []  # the signals turned into exceptions, for interrupt_status


def terminated() -> bool:
    """Whether this process has received SIGTERM (inside :func:`terminate_as_interrupt`)."""
    return signal.SIGTERM in _received


def interrupt_status(err: BaseException | None = None) -> int:
    """The exit status after an interruption: 143 after SIGTERM, 130 after Ctrl-C."""
    return SIGTERM_STATUS if isinstance(err, Terminated) or terminated() else SIGINT_STATUS


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread (once: a second
    SIGTERM during the clean-up is ignored; SIGKILL still ends the process)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if _received:
            return
        _received.append(signum)
        raise Terminated()

    _received.clear()
    previous = signal.signal(signal.SIGTERM, handler)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    watchdog = threading.Thread(target=_watchdog, args=(read_fd,), daemon=True)
    watchdog.start()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.set_wakeup_fd(previous_fd)
        os.close(write_fd)  # ends the watchdog
        watchdog.join()
        os.close(read_fd)


TERMINATE_GRACE_S = 20.0  # torchrun and most schedulers send SIGKILL 30 s after SIGTERM


def _watchdog(read_fd: int) -> None:
    """Exit with 143 when the main thread has not stopped ``TERMINATE_GRACE_S`` after SIGTERM.

    Python runs a signal handler only between two bytecodes of the main thread; a main thread
    blocked inside one call (a collective waiting for a peer, joining a job) would otherwise
    not see SIGTERM at all. The C-level handler writes the signal's number to the wake-up fd
    even then, and this thread reads it.
    """
    while True:
        data = os.read(read_fd, 64)
        if not data:
            return  # the block ended
        if signal.SIGTERM in data:
            break
    ready, _, _ = select.select([read_fd], [], [], TERMINATE_GRACE_S)
    if ready and not os.read(read_fd, 64):
        return  # the block ended in time
    sys.stderr.write("terminated (SIGTERM): stopped\n")
    sys.stderr.flush()
    os._exit(SIGTERM_STATUS)


def machine_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_threads(threads: int, flag: str = "--threads") -> str | None:
    """Why ``threads`` cannot be used on this machine, or None (0 means torch's default).

    More threads than cores only adds contention (the load grows with the thread count and
    every thread runs slower), so a count above the machine's cores is refused.
    """
    cores = machine_cores()
    if threads > cores:
        return (
            f"{flag} {threads}: this machine has {cores} core{'s' if cores != 1 else ''}; "
            f"expected 0 (torch's default) to {cores}"
        )
    return None


def check_device(device: str, flag: str = "--device") -> str | None:
    """Why ``device`` cannot be used here (not a torch device, or CUDA without a GPU), or None."""
    import torch

    try:
        torch.device(device)
    except RuntimeError:
        return f"{flag}: unknown device {device!r}"
    if device.startswith("cuda") and not torch.cuda.is_available():
        return f"{flag} {device}: CUDA is not available"
    return None


def finite_float(text: str) -> float:
    """argparse type of a float flag: a finite number (``nan`` and ``inf`` are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to a flag's help, unless the help already speaks of its default
    or there is none to show (None, False, an empty list); lists show comma-separated."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        hidden = default is None or default is False or default is argparse.SUPPRESS
        if "default" in text or hidden or default == [] or not action.option_strings:
            return text
        if isinstance(default, (list, tuple)):
            default = ",".join(str(v) for v in default)
        return f"{text} (default: {str(default).replace('%', '%%')})"


class RaisingParser(argparse.ArgumentParser):
    """An argument parser whose errors raise ``error_type(message)`` instead of exiting, so the
    command reports them as one line (exit status 2) together with its other input errors."""

    error_type: type[Exception] = ValueError
    error_suffix: str = ""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise self.error_type(message + self.error_suffix)
