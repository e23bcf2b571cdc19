# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""The project's own errors, and how they reach the user of a bundle.

MONAI's bundle runner wraps every exception raised while a config item is built in
``RuntimeError: Failed to evaluate ConfigExpression`` and prints a traceback of some 60 lines, so a
data error's message (the file and what is wrong with it) ends up in the middle of it. Importing
:mod:`qtunet_monai.bundle` (every bundle config does, in its ``imports``) installs a ``sys.excepthook``
that, for an uncaught exception caused by a :class:`ReportedError`, prints only that error's message
as the last line(s); the full traceback comes back with the environment variable
``QTUNET_MONAI_DEBUG=1``. Any other exception is printed as Python always does.
"""

from __future__ import annotations

import os
import sys

__all__ = ["ReportedError", "DataError", "CheckpointError", "OutputError", "SettingError", "NonFiniteError", "DEBUG_ENV",
           "find_cause", "install_excepthook", "reported_cause"]

DEBUG_ENV = "QTUNET_MONAI_DEBUG"


class ReportedError(Exception):
    """An error whose message tells the user everything needed: the file and what is wrong with it."""


class DataError(ReportedError, ValueError):
    """Bad input data: the message names each file and what is wrong with it."""


class CheckpointError(ReportedError, ValueError):
    """A checkpoint that cannot be read, does not fit the network, or must not be written."""


class OutputError(ReportedError, OSError):
    """A checkpoint or output folder that cannot be written (read-only, not a folder, full disk)."""


class SettingError(ReportedError, ValueError):
    """A bundle setting (command-line override or config value) that names nothing that exists."""


class NonFiniteError(ReportedError, FloatingPointError):
    """Training produced a NaN or infinite loss or weights."""


def find_cause(error: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """The first exception of type ``kind`` in ``error``'s chain of causes and contexts, or None (MONAI's
    config parser and transforms wrap the errors raised inside them)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kind):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def reported_cause(error: BaseException | None) -> ReportedError | None:
    """The first :class:`ReportedError` in ``error``'s chain of causes and contexts, or None."""
    return find_cause(error, ReportedError)


def _brief_hook(previous):
    def hook(kind, value, traceback):
        reported = reported_cause(value)
        if reported is None:
            return previous(kind, value, traceback)
        if os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
            previous(kind, value, traceback)
        else:
            print(f"qtunet_monai stopped; set {DEBUG_ENV}=1 to see the full traceback.", file=sys.stderr)
        print(f"{type(reported).__name__}: {reported}", file=sys.stderr, flush=True)

    hook.qtunet_monai = True
    return hook


def install_excepthook() -> None:
    """Print an uncaught :class:`ReportedError` (however deeply MONAI wrapped it) as its own message,
    last; keep the full traceback for ``QTUNET_MONAI_DEBUG=1``. Installing twice is harmless."""
    if not getattr(sys.excepthook, "qtunet_monai", False):
        sys.excepthook = _brief_hook(sys.excepthook)
