"""What the command line does with an error: one sentence and an exit code, or a traceback for a bug.

megasae states every refusal as one sentence in a ValueError, TypeError, LookupError, OSError or
SettingError raised by its own code; those are bad input (exit 2). Any other exception raised by
megasae's code is a failure at run time (exit 1). An exception raised inside another library is either
a bug or a raw error megasae failed to turn into a sentence: its traceback is shown. MEGASAE_DEBUG=1
(or --debug) always shows it.
"""

from __future__ import annotations

import signal
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
BAD_INPUT_EXIT, FAILURE_EXIT = 2, 1


class SettingError(Exception):
    """A config field of the wrong type or outside its valid range. Not a ValueError on purpose: tyro would
    catch that while parsing flags and draw its own box around the sentence."""


class Interrupted(Exception):
    """A run stopped by a signal after checkpointing; the exit code a shell gives that signal (130, 143)."""

    def __init__(self, signum: int, detail: str):
        super().__init__(f"interrupted by {signal.Signals(signum).name}; {detail}")
        self.exit_code = 128 + signum


_BAD_INPUT = (ValueError, TypeError, LookupError, OSError, SettingError)


def raised_by_megasae(err: BaseException) -> bool:
    """Whether the innermost frame of `err`'s traceback is megasae's own code."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)


def exit_code(err: BaseException) -> int | None:
    """The exit code for an error megasae can state in one line, or None when its traceback must show."""
    if isinstance(err, Interrupted):
        return err.exit_code
    if not isinstance(err, Exception) or not raised_by_megasae(err):
        return None
    return BAD_INPUT_EXIT if isinstance(err, _BAD_INPUT) else FAILURE_EXIT
