"""Errors that end a command with exit code 2 and a one-line message (bad usage or bad input)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import NoReturn


class UsageError(Exception):
    """Bad flags or bad input, found before training starts.

    The message is one line that names the bad value and says how to fix it; the command-line
    entry points print it as the last line of stderr and exit with code 2, without a traceback.
    """

    exit_code = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors become a UsageError (one line, exit 2) instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def run_cli(main: Callable[[], int]) -> int:
    """Run a command's main(); output piped into a reader that quits early (`| head`) ends it
    quietly instead of with a BrokenPipeError traceback."""
    try:
        code = main()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush cannot fail
        return 0
