"""MNIST-family IDX files (the format of the MNIST and Fashion-MNIST distributions), gzipped or raw."""

from __future__ import annotations

import gzip
import os
import zlib
from typing import Optional, Sequence

from absl import logging
import numpy as np

from cm_jax.data.dataset import DataUnavailableError

IMAGE_FILES = {'train': 'train-images-idx3-ubyte', 'test': 't10k-images-idx3-ubyte'}
LABEL_FILES = {'train': 'train-labels-idx1-ubyte', 'test': 't10k-labels-idx1-ubyte'}
_DTYPES = {0x08: '>u1', 0x09: '>i1', 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4', 0x0E: '>f8'}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
  """Parses an IDX file (gzipped or raw, detected from its bytes).

  Returns an array in native byte order. Raises ValueError naming the file if it is corrupt (bad gzip stream,
  magic number, dtype code, or size).
  """
  path = os.fspath(path)
  with open(path, 'rb') as f:
    data = f.read()
  if data[:2] == b'\x1f\x8b':
    try:
      data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
      raise ValueError(f'{path}: corrupt gzip stream ({e})') from e
  if len(data) < 4 or data[:2] != b'\x00\x00':
    raise ValueError(f'{path}: not an IDX file (bad magic number {data[:4]!r})')
  code, ndim = data[2], data[3]
  if code not in _DTYPES:
    raise ValueError(f'{path}: unknown IDX dtype code {code:#04x}')
  if ndim == 0:
    raise ValueError(f'{path}: IDX file with 0 dimensions')
  header = 4 + 4 * ndim
  if len(data) < header:
    raise ValueError(f'{path}: truncated IDX header')
  dims = tuple(int(d) for d in np.frombuffer(data, '>u4', ndim, offset=4))
  dtype = np.dtype(_DTYPES[code])
  expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
  if len(data) - header != expected:
    raise ValueError(f'{path}: IDX payload has {len(data) - header} bytes, expected {expected} for shape {dims} '
                     f'of {dtype}')
  arr = np.frombuffer(data, dtype, offset=header).reshape(dims)
  return arr.astype(dtype.newbyteorder('='))


def find_idx(directory: str, base: str) -> Optional[str]:
  """directory/base.gz or directory/base, whichever exists first; None if neither."""
  for name in (base + '.gz', base):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  return None


def read_split(directory: str, split: str, image_hw: tuple[int, int],
               with_labels: bool = False) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """(images uint8 (N, H, W, 1), labels int32 (N,) or None) of `split` from the IDX files in `directory`.

  Raises FileNotFoundError when the image file is missing (the caller may try another source), and
  DataUnavailableError when only the label file is missing while labels are asked for.
  """
  if split not in IMAGE_FILES:
    raise ValueError(f'Local IDX files exist for splits {sorted(IMAGE_FILES)}, not {split!r}.')
  path = find_idx(directory, IMAGE_FILES[split])
  if path is None:
    raise FileNotFoundError(f'no {IMAGE_FILES[split]}[.gz] in {directory}')
  images = read_idx(path)
  if images.dtype != np.uint8 or images.shape[1:] != tuple(image_hw):
    raise ValueError(f'{path}: expected uint8 images of shape (N, {image_hw[0]}, {image_hw[1]}), got '
                     f'{images.dtype} {images.shape}')
  logging.info('Read %d %s images from local IDX file %s.', len(images), split, path)
  if not with_labels:
    return images[..., None], None
  label_path = find_idx(directory, LABEL_FILES[split])
  if label_path is None:
    raise DataUnavailableError(
        f'No {LABEL_FILES[split]}[.gz] next to {path}: labels are needed here (a class-conditional model, '
        f'model.class_conditional = True, or the feature classifier). Copy the label file into {directory} '
        '(from the same MNIST mirror), or train an unconditional model.')
  labels = read_idx(label_path)
  if labels.shape != (len(images),):
    raise ValueError(f'{label_path}: expected {len(images)} labels, got an array of shape {labels.shape}')
  return images[..., None], labels.astype(np.int32)


def standard_dir(root: str, dir_names: Sequence[str]) -> Optional[str]:
  """First root/<name> holding the IDX image files of both splits, if any."""
  for name in dir_names:
    directory = os.path.join(root, name)
    if all(find_idx(directory, f) for f in IMAGE_FILES.values()):
      return directory
  return None
