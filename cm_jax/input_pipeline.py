"""Stateless input pipeline for small image datasets (MNIST, Fashion-MNIST).

A whole split is held in host memory as uint8 (N, H, W, C). The batch of
training step k is a pure function of (seed, k) (see `batch_indices`), so a
restarted run resumes exactly where it stopped and there is no iterator state
to checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import zlib
from typing import Any

from absl import logging
import numpy as np

STANDARD_LOCAL_ROOT = '/usr/share/datasets'

_IDX_FILES = {'train': 'train-images-idx3-ubyte',
              'test': 't10k-images-idx3-ubyte'}
_IDX_LABEL_FILES = {'train': 'train-labels-idx1-ubyte',
                    'test': 't10k-labels-idx1-ubyte'}


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Static facts about a supported dataset."""
  tfds_name: str
  image_shape: tuple[int, int, int]
  local_dirs: tuple[str, ...]  # Directory names under STANDARD_LOCAL_ROOT.
  idx_files: dict[str, str]  # Split -> IDX image file name (without .gz).
  install_hint: str  # How to get the IDX files locally.


SUPPORTED: dict[str, DatasetSpec] = {
    'mnist': DatasetSpec(
        'mnist', (28, 28, 1), ('mnist',), _IDX_FILES,
        'no Debian package ships the MNIST IDX files (`apt-cache search mnist`'
        ' only finds dataset-fashion-mnist)'),
    'fashion_mnist': DatasetSpec(
        'fashion_mnist', (28, 28, 1), ('fashion-mnist',), _IDX_FILES,
        'install the Debian package: `apt-get install dataset-fashion-mnist`'),
}


class DataUnavailableError(RuntimeError):
  """No configured or fallback source could provide the dataset."""


# ----------------------------------------------------------------- IDX files.
_IDX_DTYPES = {0x08: '>u1', 0x09: '>i1', 0x0B: '>i2', 0x0C: '>i4',
               0x0D: '>f4', 0x0E: '>f8'}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
  """Parses an IDX file (gzipped or raw, detected from its bytes).

  Returns an array in native byte order. Raises ValueError naming the file if
  it is corrupt (bad gzip stream, magic number, dtype code, or size).
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
  if code not in _IDX_DTYPES:
    raise ValueError(f'{path}: unknown IDX dtype code {code:#04x}')
  if ndim == 0:
    raise ValueError(f'{path}: IDX file with 0 dimensions')
  header = 4 + 4 * ndim
  if len(data) < header:
    raise ValueError(f'{path}: truncated IDX header')
  dims = tuple(int(d) for d in np.frombuffer(data, '>u4', ndim, offset=4))
  dtype = np.dtype(_IDX_DTYPES[code])
  expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
  if len(data) - header != expected:
    raise ValueError(f'{path}: IDX payload has {len(data) - header} bytes, '
                     f'expected {expected} for shape {dims} of {dtype}')
  arr = np.frombuffer(data, dtype, offset=header).reshape(dims)
  return arr.astype(dtype.newbyteorder('='))


def _find_idx(directory: str, base: str) -> str | None:
  for name in (base + '.gz', base):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  return None


def _local_images(spec: DatasetSpec, directory: str, split: str,
                  with_labels: bool = False):
  """Reads the images of `split` (and its labels) from the IDX files in `directory`.

  Returns images, or (images, labels) with labels int32 (N,) when with_labels.
  """
  if split not in spec.idx_files:
    raise ValueError(f'Local IDX files exist for splits '
                     f'{sorted(spec.idx_files)}, not {split!r}.')
  path = _find_idx(directory, spec.idx_files[split])
  if path is None:
    raise FileNotFoundError(f'no {spec.idx_files[split]}[.gz] in {directory}')
  images = read_idx(path)
  if images.dtype != np.uint8 or images.shape[1:] != spec.image_shape[:2]:
    raise ValueError(f'{path}: expected uint8 images of shape (N, '
                     f'{spec.image_shape[0]}, {spec.image_shape[1]}), got '
                     f'{images.dtype} {images.shape}')
  logging.info('Read %d %s images from local IDX file %s.', len(images),
               split, path)
  if not with_labels:
    return images[..., None]
  label_path = _find_idx(directory, _IDX_LABEL_FILES[split])
  if label_path is None:
    raise FileNotFoundError(f'no {_IDX_LABEL_FILES[split]}[.gz] in {directory}')
  labels = read_idx(label_path)
  if labels.shape != (len(images),):
    raise ValueError(f'{label_path}: expected {len(images)} labels, got an '
                     f'array of shape {labels.shape}')
  return images[..., None], labels.astype(np.int32)


def _standard_dir(spec: DatasetSpec) -> str | None:
  """First standard local directory holding the IDX image files, if any."""
  for d in spec.local_dirs:
    directory = os.path.join(STANDARD_LOCAL_ROOT, d)
    if all(_find_idx(directory, f) for f in spec.idx_files.values()):
      return directory
  return None


# ----------------------------------------------------------------------- TFDS.
def _tfds():
  """Imports tensorflow_datasets lazily, keeping TensorFlow off the GPUs."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # Devices already initialised; nothing to do.
    pass
  return tfds


def _tfds_builder(spec: DatasetSpec, data_dir: str | None) -> Any:
  return _tfds().builder(spec.tfds_name, data_dir=data_dir)


def _tfds_download(builder: Any) -> None:
  """Downloads and prepares `builder`'s data (a separate hook for tests)."""
  builder.download_and_prepare()


def _tfds_images(builder: Any, split: str, with_labels: bool = False,
                 chunk: int = 10_000):
  """Reads a prepared TFDS split fully into memory: images, or (images, labels).

  Reads in chunks rather than `batch_size=-1`: with unknown split sizes (as
  under `tfds.testing.mock_data`) TFDS batches by sys.maxsize, which aborts
  the process in recent TensorFlow.
  """
  ds = builder.as_dataset(split=split, batch_size=chunk, shuffle_files=False)
  parts, label_parts = [], []
  for ex in _tfds().as_numpy(ds):
    parts.append(np.asarray(ex['image'], np.uint8))
    if with_labels:
      label_parts.append(np.asarray(ex['label'], np.int32))
  images = np.concatenate(parts) if parts else np.zeros((0,), np.uint8)
  logging.info('Read %d %s images of %s from TFDS (%s).', len(images), split,
               builder.name, builder.data_dir)
  if not with_labels:
    return images
  return images, (np.concatenate(label_parts) if label_parts
                  else np.zeros((0,), np.int32))


# ---------------------------------------------------------------- Resolution.
def _resolve(spec: DatasetSpec, name: str, data_config: Any, split: str,
             with_labels: bool = False):
  """Loads the split from the source named by data.source."""
  source = data_config.get('source', 'auto')
  manual_dir = data_config.get('manual_dir', None)
  if source not in ('auto', 'tfds', 'local'):
    raise ValueError(f"data.source must be 'auto', 'tfds' or 'local', got "
                     f'{source!r}.')
  tried: list[str] = []

  def unavailable() -> DataUnavailableError:
    idx = ', '.join(f'{v}[.gz]' for v in spec.idx_files.values())
    return DataUnavailableError(
        f'Dataset {name!r} ({split}) is not available. Sources tried:\n'
        + ''.join(f'  - {t}\n' for t in tried) +
        f'To fix: {spec.install_hint}; or set --config.data.manual_dir=DIR to '
        f'a directory holding the four IDX files ({idx} and the matching '
        '*-labels-idx1-ubyte files); or go online so TFDS can download it.')

  if source == 'local' or (source == 'auto' and manual_dir):
    directory = manual_dir or _standard_dir(spec) or os.path.join(
        STANDARD_LOCAL_ROOT, spec.local_dirs[0])
    logging.info('Dataset %s: using local IDX files in %s (data.source=%s).',
                 name, directory, source)
    try:
      return _local_images(spec, directory, split, with_labels)
    except FileNotFoundError as e:
      tried.append(f'local IDX: {e}')
      raise unavailable() from e

  builder = None
  try:
    builder = _tfds_builder(spec, data_config.get('data_dir', None))
    prepared, why = builder.is_prepared(), f'none in {builder.data_dir}'
  except Exception as e:  # pylint: disable=broad-except
    prepared, why = False, f'{type(e).__name__}: {str(e)[:200]}'
  if prepared:
    logging.info('Dataset %s: using prepared TFDS data in %s.', name,
                 builder.data_dir)
    return _tfds_images(builder, split, with_labels)
  tried.append(f'TFDS prepared data: {why}')
  if source == 'auto':
    logging.info('Dataset %s: no prepared TFDS data (%s); trying the standard '
                 'local directories.', name, why)
    directory = _standard_dir(spec)
    if directory is not None:
      logging.info('Dataset %s: using local IDX files in %s.', name, directory)
      return _local_images(spec, directory, split, with_labels)
    tried.append('local IDX: no IDX image files in ' + ', '.join(
        os.path.join(STANDARD_LOCAL_ROOT, d) for d in spec.local_dirs))
  if builder is None:
    raise unavailable()
  logging.info('Dataset %s: downloading and preparing with TFDS into %s.',
               name, builder.data_dir)
  try:
    _tfds_download(builder)
  except Exception as e:  # pylint: disable=broad-except
    tried.append(f'TFDS download: {type(e).__name__}: {str(e)[:200]}')
    raise unavailable() from e
  return _tfds_images(builder, split, with_labels)


def load_images(data_config: Any, split: str) -> np.ndarray:
  """All images of a split as uint8 (N, H, W, C), padded if data.pad_to > 0.

  data.source: 'local' reads IDX files from data.manual_dir, else from
  STANDARD_LOCAL_ROOT; 'tfds' uses TFDS (downloading if not prepared);
  'auto' uses manual_dir if set, else prepared TFDS data, else the standard
  local directory, else a TFDS download, and raises DataUnavailableError
  listing every attempt if all fail. Each step is logged.
  """
  return _load(data_config, split, with_labels=False)


def load_labeled_images(data_config: Any,
                        split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images, labels) of a split: images as `load_images`, labels int32 (N,).

  Local IDX sources need the *-labels-idx1-ubyte[.gz] file next to the images.
  """
  return _load(data_config, split, with_labels=True)


def _load(data_config: Any, split: str, with_labels: bool):
  name = data_config.get('name')
  if name not in SUPPORTED:
    raise ValueError(f'Unknown dataset data.name={name!r}; supported: '
                     f'{sorted(SUPPORTED)}.')
  spec = SUPPORTED[name]
  loaded = _resolve(spec, name, data_config, split, with_labels)
  images, labels = loaded if with_labels else (loaded, None)
  if images.ndim != 4 or images.shape[1:] != spec.image_shape:
    raise ValueError(f'{name} ({split}): expected images of shape '
                     f'(N, {", ".join(map(str, spec.image_shape))}), got '
                     f'{images.shape}.')
  pad_to = data_config.get('pad_to', 0) or 0
  if pad_to:
    h, w = spec.image_shape[:2]
    if pad_to < max(h, w):
      raise ValueError(f'data.pad_to={pad_to} is smaller than the image size '
                       f'{h}x{w}.')
    ph, pw = pad_to - h, pad_to - w
    images = np.pad(images, ((0, 0), (ph // 2, ph - ph // 2),
                             (pw // 2, pw - pw // 2), (0, 0)))
  logging.info('Dataset %s (%s): %d images of shape %s.', name, split,
               len(images), images.shape[1:])
  return (images, labels) if with_labels else images


def image_shape(data_config: Any) -> tuple[int, int, int]:
  """(H, W, C) of the training images that data_config describes, after padding; reads no data."""
  h, w, c = SUPPORTED[data_config.name].image_shape
  if data_config.get('pad_to', 0):
    h = w = data_config.pad_to
  return h, w, c


# ------------------------------------------------------------------ Batching.
@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  perm = np.random.default_rng((seed, epoch)).permutation(num_examples)
  perm.flags.writeable = False  # Cached: never mutate.
  return perm


def batch_indices(seed: int, step: int, global_batch_size: int,
                  num_examples: int) -> np.ndarray:
  """int64 indices (global_batch_size,) of the examples of training `step`.

  Epoch e is `default_rng((seed, e)).permutation(num_examples)`; the stream of
  all epochs concatenated is cut into consecutive batches, so a batch may
  straddle an epoch boundary and each example is used once per epoch.
  """
  if seed < 0 or step < 0:
    raise ValueError(f'seed and step must be >= 0, got {seed}, {step}.')
  if global_batch_size < 1 or num_examples < 1:
    raise ValueError(f'global_batch_size ({global_batch_size}) and '
                     f'num_examples ({num_examples}) must be >= 1.')
  seed, step = int(seed), int(step)
  b, n = int(global_batch_size), int(num_examples)
  start, end = step * b, (step + 1) * b
  parts = []
  for epoch in range(start // n, (end - 1) // n + 1):
    lo, hi = max(start, epoch * n), min(end, (epoch + 1) * n)
    perm = _epoch_permutation(seed, epoch, n)
    parts.append(perm[lo - epoch * n:hi - epoch * n])
  return np.concatenate(parts).astype(np.int64)


def local_batch(images: np.ndarray, seed: int, step: int,
                global_batch_size: int, process_index: int = 0,
                process_count: int = 1) -> np.ndarray:
  """This process's rows [p*b, (p+1)*b) of the global batch of `step`."""
  if global_batch_size % process_count:
    raise ValueError(f'global_batch_size={global_batch_size} is not divisible '
                     f'by process_count={process_count}.')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in '
                     f'[0, {process_count}).')
  b = global_batch_size // process_count
  idx = batch_indices(seed, step, global_batch_size, len(images))
  return images[idx[process_index * b:(process_index + 1) * b]]


# ----------------------------------------------------------------- Scaling.
def to_model_range(x_uint8: Any) -> Any:
  """uint8 [0, 255] -> float32 [-1, 1]; works on numpy and jax arrays."""
  if not hasattr(x_uint8, 'astype'):
    x_uint8 = np.asarray(x_uint8)
  return x_uint8.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def to_uint8(x: Any) -> np.ndarray:
  """float [-1, 1] -> uint8 [0, 255] with rounding and clipping (numpy)."""
  x = np.nan_to_num(np.asarray(x, np.float32), nan=-1.0)
  return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
