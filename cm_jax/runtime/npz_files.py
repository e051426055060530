"""Images in .npz files (numpy.savez), as cm_jax.sample writes them and the edit and evaluate CLIs read them."""

from __future__ import annotations

import io

import numpy as np

from cm_jax.runtime import errors
from cm_jax.runtime import paths

IMAGE_KEYS = ('arr_0', 'samples')  # The array to read among several (numpy.savez's first, cm_jax.sample's).


def read_images(path: str, flag: str) -> np.ndarray:
  """uint8 images (N, H, W, C) from the .npz at `path` (local or remote): its only array, else the one named
  'arr_0' or 'samples'; (N, H, W) arrays get a channel axis. Never unpickles (allow_pickle=False).

  Raises errors.InputFileError, one line naming `flag` (the option that gave the path, e.g. '--input') and the
  file, for a missing, unreadable or empty file or an array that is not uint8 images.
  """
  where = f'{flag}={path}'
  if not paths.exists(path):
    raise errors.InputFileError(f'{where}: no such file.')
  try:
    with np.load(io.BytesIO(paths.read_bytes(path)), allow_pickle=False) as f:
      names = list(f.keys())
      key = names[0] if len(names) == 1 else next((k for k in IMAGE_KEYS if k in names), None)
      if key is None:
        raise errors.InputFileError(f'{where}: holds arrays {names}; expected one array, or one named '
                                    f"{' or '.join(repr(k) for k in IMAGE_KEYS)}.")
      images = f[key]
  except errors.UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (not a zip, truncated, object arrays, a directory, ...)
    reason = ' '.join(str(e).split()) or type(e).__name__
    raise errors.InputFileError(f'{where}: not a readable .npz file ({reason}); write it with numpy.savez (uint8 '
                                'images, as cm_jax.sample does).') from None
  if images.dtype != np.uint8 or images.ndim not in (3, 4):
    raise errors.InputFileError(f"{where}: array '{key}' is {images.dtype} {images.shape}; expected uint8 images "
                                '(N, H, W, C) or (N, H, W).')
  if 0 in images.shape:
    raise errors.InputFileError(f"{where}: array '{key}' has shape {images.shape}: no images in it.")
  return images[..., None] if images.ndim == 3 else images
