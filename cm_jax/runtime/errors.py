"""Errors about input the user can fix (a flag, a config field, a file, the data, the disk).

The command-line tools print such an error as one line on stderr, without a traceback (unless --verbose), and
exit with its `exit_code`: 2 for a usage error (a bad flag or config value), 1 for a failure (a missing or
damaged file, a diverged run, a busy workdir, a full disk). Anything else is a program bug and keeps its
traceback. The classes also derive from the built-in type a caller would expect (ValueError, ...), so code
that catches those keeps working.
"""

from __future__ import annotations

USAGE = 2
FAILURE = 1


class UserError(Exception):
  """Input the user can fix; the message says what is wrong, where, and how to fix it."""
  exit_code = FAILURE


class UsageError(UserError, ValueError):
  """A bad command-line flag or config value."""
  exit_code = USAGE


class ConfigError(UsageError):
  """A config field that is missing, unknown or has a bad value (the message starts with `config.FIELD`)."""


class InputFileError(UserError, ValueError):
  """A file given as input (images, masks, npz files, data) that is missing, unreadable or malformed."""


class OutputPathError(UserError, OSError):
  """An output path (workdir, --out, --output) that cannot be written."""


class ResourceLimitError(UsageError):
  """A request whose size would exhaust memory or disk (e.g. --num far beyond what fits)."""
