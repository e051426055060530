"""Workdir and output paths that may be local or remote (gs://, s3://, ...), through etils.epath."""

from __future__ import annotations

import io
import os
import re
from typing import BinaryIO, Callable

from etils import epath

_URI = re.compile(r'^[A-Za-z][A-Za-z0-9+.-]*://')


def is_remote(path: str | os.PathLike[str]) -> bool:
  """True for a URI such as gs://bucket/run; False for a local path."""
  return bool(_URI.match(os.fspath(path)))


def absolute(path: str | os.PathLike[str]) -> str:
  """A local path made absolute (as os.path.abspath); a URI unchanged."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(path)


def makedirs(path: str | os.PathLike[str]) -> None:
  """Creates the directory `path` and its parents (no error if it exists)."""
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def write_file(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> str:
  """Calls write(f) on a new binary file at `path`, creating its directory; returns the path.

  A local file is written in place. A remote one is built in memory and uploaded in one request, so an error
  in `write` leaves nothing behind and readers never see part of an object.
  """
  path = os.fspath(path)
  makedirs(epath.Path(path).parent)
  if not is_remote(path):
    with open(path, 'wb') as f:
      write(f)
    return path
  buffer = io.BytesIO()
  write(buffer)
  epath.Path(path).write_bytes(buffer.getvalue())
  return path


def exists(path: str | os.PathLike[str]) -> bool:
  """Whether a local file or a remote object exists."""
  return epath.Path(os.fspath(path)).exists()


def read_bytes(path: str | os.PathLike[str]) -> bytes:
  """The contents of a local file or a remote object."""
  return epath.Path(os.fspath(path)).read_bytes()
