"""Workdir and output paths that may be local or remote (gs://, s3://, ...), through etils.epath."""

from __future__ import annotations

import errno
import io
import os
import re
import tempfile
from typing import BinaryIO, Callable

from etils import epath

from cm_jax.runtime import errors

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
  """Calls write(f) on a new binary file at `path`, creating its directory; returns the path. The file is
  written whole or not at all: readers never see part of it, and a file already at `path` is replaced only
  by a complete new one.

  A local file is written to a temporary file beside it, then renamed over `path`; on any error the temporary
  is removed. A remote one is built in memory and uploaded in one request (object stores make that atomic).
  An error of the file system (a full disk, a file-size limit, no permission) raises errors.OutputPathError,
  one line naming `path` and saying that nothing there changed; other errors pass through.
  """
  path = os.fspath(path)
  try:
    makedirs(epath.Path(path).parent)
    if is_remote(path):
      buffer = io.BytesIO()
      write(buffer)
      epath.Path(path).write_bytes(buffer.getvalue())
      return path
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=os.path.basename(path) + '.',
                               suffix='.tmp')
    try:
      with os.fdopen(fd, 'wb') as f:
        write(f)
      os.replace(tmp, path)
    except BaseException:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise
  except OSError as e:
    if isinstance(e, errors.UserError) or e.errno is None:
      raise
    raise errors.OutputPathError(_write_failure(path, e)) from e
  return path


def _write_failure(path: str, e: OSError) -> str:
  reason = e.strerror or str(e)
  if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
    fix = 'free space there (or choose another path) and run again'
  elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
    fix = 'make the folder writable, or choose another path'
  else:
    fix = 'choose another path'
  state = 'the file there is unchanged' if exists(path) else 'nothing was written'
  return f'{path}: could not write it ({reason}); {state}. To fix: {fix}.'


def exists(path: str | os.PathLike[str]) -> bool:
  """Whether a local file or a remote object exists."""
  return epath.Path(os.fspath(path)).exists()


def read_bytes(path: str | os.PathLike[str]) -> bytes:
  """The contents of a local file or a remote object."""
  return epath.Path(os.fspath(path)).read_bytes()
