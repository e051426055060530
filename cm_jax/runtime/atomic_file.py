"""Cache files that concurrent processes can share: written whole or not at all."""

from __future__ import annotations

import os
import tempfile
from typing import BinaryIO, Callable

from cm_jax.runtime import paths


def write_atomic(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> str:
  """Calls write(f) on a temporary file beside `path`, then renames it to `path` (readers never see half a
  file); on an error the temporary file is removed and nothing is written. Returns the path.

  A remote path (gs://...) is written in one upload instead, which object stores make atomic.
  """
  path = os.fspath(path)
  if paths.is_remote(path):
    return paths.write_file(path, write)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + '.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path
