"""The command line of ``python -m jem_ext.eval``: flags, their checks, the entry point.

Every flag is checked before anything is loaded or written: a bad value is reported as one
line on stderr (``jem_ext.eval: error: ...``) with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .._cli import (
    SIGTERM_STATUS,
    DefaultsHelpFormatter,
    RaisingParser,
    interrupt_status,
    terminate_as_interrupt,
)
from .._io import remove_temporaries, write_failure
from ..settings import Spec, add_flags
from .report import run
from .settings import EvalError, EvalSettings, all_specs, groups
from .writers import render_markdown

__all__ = ["build_parser", "main", "parse_settings"]


class _Parser(RaisingParser):
    """An argument parser whose errors become :class:`EvalError` (one line, exit status 2)."""

    error_type = EvalError
    error_suffix = " (see --help)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m jem_ext.eval``, generated from the settings' groups
    (:class:`~jem_ext.eval.settings.EvalSettings`: every flag has help text)."""
    p = _Parser(
        prog="python -m jem_ext.eval",
        description="Evaluate a JEM checkpoint (accuracy, calibration, OOD detection, "
        "generation, IS/FID, adversarial robustness) and write report.json, report.md and "
        "PNG figures to --out. With --compare, a second checkpoint (e.g. the cross-entropy "
        "twin) is evaluated on the same data and shown beside the first.",
        formatter_class=DefaultsHelpFormatter,
    )
    for g in groups():
        add_flags(p, g, suppress_defaults=False)
    return p


def value_error(s: Spec, value: object) -> str | None:
    """The error line of a flag's value (its type already checked by the parser): out of its
    range (``--batch-size: expected >= 1, got 0``), or its own check's line; None if valid."""
    if value is None:
        return None
    if s.range is not None and not s.range.contains(value):  # type: ignore[arg-type]
        return f"{s.option_strings()[0]}: expected {s.range}, got {value}"
    return s.check(value) if s.check is not None else None


def parse_settings(argv: Sequence[str] | None = None) -> EvalSettings:
    """Parse and check the flags (raises :class:`EvalError` on bad input)."""
    values = vars(build_parser().parse_args(argv))
    for key, s in all_specs().items():
        error = value_error(s, values[key])
        if error is not None:
            raise EvalError(error)
    return EvalSettings.from_flat(values)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m jem_ext.eval``; returns the exit status: 0, 1 when the report
    cannot be written (no space, a read-only file system: the output folder is left as it
    was), 2 on bad input, 130 after Ctrl-C and 143 after SIGTERM (nothing written either)."""
    settings, existed = None, False
    try:
        with terminate_as_interrupt():
            settings = parse_settings(argv)
            out = settings.job.out
            existed = Path(out).exists()
            if Path(out).is_dir():  # what an evaluation killed outright left behind
                remove_temporaries(out)
            report = run(settings)
    except EvalError as err:
        print(f"jem_ext.eval: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        out = settings.job.out if settings is not None else None
        state = "is as it was" if existed else "was not created"
        print(
            f"jem_ext.eval: error: {write_failure(err, out)}; no report was written "
            f"(--out {out} {state})",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt as err:
        status = interrupt_status(err)
        what = "terminated (SIGTERM)" if status == SIGTERM_STATUS else "interrupted"
        where = f" to --out {settings.job.out}" if settings is not None else ""
        print(f"\njem_ext.eval: {what}; no report was written{where}", file=sys.stderr)
        return status
    print(render_markdown(report, images=False))
    print(
        f"\nwrote {Path(settings.job.out) / 'report.json'}, report.md and "
        f"{len(report['files']) - 2} PNGs in {report['seconds']} s"
    )
    return 0
