"""Errors that end a command with exit code 2 and a one-line message (bad usage or bad input)."""

from __future__ import annotations

import argparse
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
        raise UsageError(f"{message} (see --help)")
