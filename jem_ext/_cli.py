"""Pieces shared by the package's command lines (``jem_ext.train``, ``jem_ext.eval``).

Both commands report a bad flag as one line and exit status 2, show each default once in
``--help``, and refuse non-finite numbers before anything runs.
"""

from __future__ import annotations

import argparse
import math

__all__ = ["DefaultsHelpFormatter", "RaisingParser", "finite_float"]


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
