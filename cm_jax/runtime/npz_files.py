"""Images in .npz files (numpy.savez), as cm_jax.sample writes them and the edit and evaluate CLIs read them."""

from __future__ import annotations

import io
import math
import zipfile
from typing import Optional

import numpy as np

from cm_jax.runtime import errors
from cm_jax.runtime import paths

IMAGE_KEYS = ('arr_0', 'samples')
ZIP_MAGIC, EMPTY_ZIP_MAGIC = b'PK\x03\x04', b'PK\x05\x06'  # The array to read among several (numpy.savez's first, cm_jax.sample's).


def read_images(path: str, flag: str) -> np.ndarray:
  """uint8 images (N, H, W, C) from the .npz at `path` (local or remote): its only array, else the one named
  'arr_0' or 'samples'; (N, H, W) arrays get a channel axis. Never unpickles (allow_pickle=False).

  Raises errors.InputFileError, one line naming `flag` (the option that gave the path, e.g. '--input') and the
  file, for a missing, unreadable or empty file or an array that is not uint8 images.
  """
  where = f'{flag}={path}'
  if not paths.exists(path):
    raise errors.InputFileError(f'{where}: no such file.')
  data = paths.read_bytes(path)
  if not data.startswith((ZIP_MAGIC, EMPTY_ZIP_MAGIC)):
    what = 'a single .npy array' if data.startswith(b'\x93NUMPY') else f'its first bytes are {data[:12]!r}'
    raise errors.InputFileError(f'{where}: not an .npz file ({what}; an .npz is a zip archive); write it with '
                                'numpy.savez (uint8 images, as cm_jax.sample does).')
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as f:
      names = list(f.keys())
      key = names[0] if len(names) == 1 else next((k for k in IMAGE_KEYS if k in names), None)
      if key is None:
        raise errors.InputFileError(f'{where}: holds arrays {names}; expected one array, or one named '
                                    f"{' or '.join(repr(k) for k in IMAGE_KEYS)}.")
      _check_declared_size(f.zip, key, where)  # Before numpy allocates what the header declares.
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


def _check_declared_size(archive: zipfile.ZipFile, key: str, where: str) -> None:
  """Raises errors.InputFileError when the header of array `key` declares more bytes than the archive member
  holds (a damaged or forged header would otherwise make numpy allocate, say, terabytes first)."""
  info = archive.getinfo(key + '.npy')
  with archive.open(info) as member:
    version = np.lib.format.read_magic(member)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(member, max_header_size=10000)
  declared = math.prod(shape) * dtype.itemsize
  if declared > info.file_size:
    raise errors.InputFileError(f"{where}: array '{key}' declares shape {shape} of {dtype} ({declared:,} bytes), "
                                f'but the file holds {info.file_size:,}: it is damaged. Write it again with '
                                'numpy.savez.')


def read_labels(path: str, flag: str, num: int) -> Optional[np.ndarray]:
  """int32 class labels (num,) from the .npz's 'arr_1' (cm_jax.sample saves a class-conditional model's labels
  there, beside the images in 'arr_0'), or None when it has none. Raises errors.InputFileError for labels that
  are not integers or fewer than `num`."""
  with np.load(io.BytesIO(paths.read_bytes(path)), allow_pickle=False) as f:
    if 'arr_1' not in f:
      return None
    labels = f['arr_1']
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) < num:
    raise errors.InputFileError(f"{flag}={path}: 'arr_1' is {labels.dtype} {labels.shape}; expected one integer "
                                f'class label per image ({num}).')
  return labels[:num].astype(np.int32)
