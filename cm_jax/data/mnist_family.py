"""The MNIST family ('mnist', 'fashion_mnist'): which source serves a split (IDX files or TFDS), and padding.

data.source 'local' reads IDX files from data.manual_dir, else from STANDARD_LOCAL_ROOT; 'tfds' uses TFDS
(downloading if not prepared); 'auto' uses manual_dir if set, else prepared TFDS data, else the standard local
directory, else a TFDS download, and raises DataUnavailableError listing every attempt if all fail.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from absl import logging
import numpy as np

from cm_jax.data import idx
from cm_jax.data import tfds_source
from cm_jax.data.catalog import data_source, DatasetSpec
from cm_jax.data.dataset import DataUnavailableError

STANDARD_LOCAL_ROOT = '/usr/share/datasets'  # Holds DatasetSpec.local_dirs (Debian's dataset-fashion-mnist).


def read_split(spec: DatasetSpec, name: str, data_config: Any, split: str,
               with_labels: bool) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """(images, labels or None) of the MNIST family from the source named by data.source."""
  source, manual_dir = data_source(data_config), data_config.get('manual_dir', None)
  tried: list[str] = []

  def unavailable() -> DataUnavailableError:
    files = ', '.join(f'{v}[.gz]' for v in idx.IMAGE_FILES.values())
    return DataUnavailableError(
        f'Dataset {name!r} ({split}) is not available. Sources tried:\n' + ''.join(f'  - {t}\n' for t in tried) +
        f'To fix: {spec.install_hint}; or set --config.data.manual_dir=DIR to a directory holding the four IDX '
        f'files ({files} and the matching *-labels-idx1-ubyte files); or go online so TFDS can download it '
        f'({tfds_source.prepare_hint(spec.tfds_name)}).')

  hw = spec.image_shape[:2]
  if source == 'local' or (source == 'auto' and manual_dir):
    directory = (manual_dir or idx.standard_dir(STANDARD_LOCAL_ROOT, spec.local_dirs)
                 or os.path.join(STANDARD_LOCAL_ROOT, spec.local_dirs[0]))
    logging.info('Dataset %s: using local IDX files in %s (data.source=%s).', name, directory, source)
    try:
      return idx.read_split(directory, split, hw, with_labels)
    except FileNotFoundError as e:
      tried.append(f'local IDX: {e}')
      raise unavailable() from e

  builder = None
  try:
    builder = tfds_source.make_builder(spec.tfds_name, data_config.get('data_dir', None))
    prepared, why = builder.is_prepared(), f'none in {builder.data_dir}'
  except Exception as e:  # pylint: disable=broad-except
    prepared, why = False, f'{type(e).__name__}: {str(e)[:200]}'
  if prepared:
    logging.info('Dataset %s: using prepared TFDS data in %s.', name, builder.data_dir)
    return tfds_source.read_split(builder, split, with_labels)
  tried.append(f'TFDS prepared data: {why}')
  if source == 'auto':
    logging.info('Dataset %s: no prepared TFDS data (%s); trying the standard local directories.', name, why)
    directory = idx.standard_dir(STANDARD_LOCAL_ROOT, spec.local_dirs)
    if directory is not None:
      logging.info('Dataset %s: using local IDX files in %s.', name, directory)
      return idx.read_split(directory, split, hw, with_labels)
    tried.append('local IDX: no IDX image files in ' + ', '.join(
        os.path.join(STANDARD_LOCAL_ROOT, d) for d in spec.local_dirs))
  if builder is None:
    raise unavailable()
  logging.info('Dataset %s: downloading and preparing with TFDS into %s.', name, builder.data_dir)
  try:
    tfds_source.download_and_prepare(builder)
  except Exception as e:  # pylint: disable=broad-except
    tried.append(f'TFDS download: {type(e).__name__}: {str(e)[:300]}')
    raise unavailable() from e
  return tfds_source.read_split(builder, split, with_labels)


def pad(images: np.ndarray, pad_to: int) -> np.ndarray:
  """Zero-pads (N, H, W, C) images to pad_to x pad_to, centred (data.pad_to)."""
  h, w = images.shape[1:3]
  if pad_to < max(h, w):
    raise ValueError(f'data.pad_to={pad_to} is smaller than the image size {h}x{w}.')
  ph, pw = pad_to - h, pad_to - w
  return np.pad(images, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
