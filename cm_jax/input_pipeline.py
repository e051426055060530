"""The input pipeline of cm_jax: datasets by name, step-indexed batches, and pixel scaling.

This is the one module the rest of cm_jax calls; the per-source readers live in cm_jax/data/. A split is a
`Dataset` (load_dataset): rows addressed by index, either decoded once into host memory (data.storage =
'memory') or read on demand (data.storage = 'stream': TFDS ArrayRecord random access, or the image files). The
batch of training step k is a pure function of (seed, k) (see `batch_indices`), and each process reads only its
rows of it (`local_batch`, `BatchStream`), so a restarted run resumes exactly where it stopped and there is no
iterator state to checkpoint.

Datasets: 'mnist', 'fashion_mnist' (28x28 gray; IDX files or TFDS); 'cifar10' (TFDS, 32x32); 'imagenette'
(TFDS 'imagenette/<data.tfds_config or 160px-v2>'); 'imagenet64' (TFDS 'imagenet_resized/64x64', prepared by
hand: it cannot be downloaded automatically); 'image_folder' (data.manual_dir, 'train' split only). For
imagenette and imagenet64 cm_jax's split 'test' is TFDS's 'validation'. RGB images of another size than
data.image_size are centre-cropped to a square and resized (cm_jax/data/transforms.py).
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from typing import Any, Optional

from absl import logging
import numpy as np

from cm_jax.data import idx
from cm_jax.data import image_folder
from cm_jax.data import tfds_source
# Re-exported: the names callers and tests use stay on this one interface module.
from cm_jax.data.dataset import (array_fingerprint, ArrayDataset, Dataset,  # pylint: disable=unused-import
                                 DataUnavailableError)
from cm_jax.data.idx import read_idx  # pylint: disable=unused-import
# The dataset table, image shapes and pixel scaling live in light modules (no TFDS, PIL or absl) that the train
# step and benchmarks import; re-exported here.
from cm_jax.data.catalog import DatasetSpec, image_shape, SUPPORTED
from cm_jax.data.catalog import dataset_spec as _spec, image_size as _size
from cm_jax.core.pixels import to_model_range, to_uint8  # pylint: disable=unused-import

STANDARD_LOCAL_ROOT = '/usr/share/datasets'
MNIST_FAMILY = ('mnist', 'fashion_mnist')


def _source(data_config: Any) -> str:
  source = data_config.get('source', 'auto')
  if source not in ('auto', 'tfds', 'local'):
    raise ValueError(f"data.source must be 'auto', 'tfds' or 'local', got {source!r}.")
  return source


# ----------------------------------------------------------------------- TFDS (hooks tests replace).
def _tfds_builder(full_name: str, data_dir: Optional[str]) -> Any:
  return tfds_source.make_builder(full_name, data_dir)


def _tfds_download(builder: Any, **kwargs) -> None:
  """Downloads and prepares `builder`'s data, failing fast offline (a separate hook for tests)."""
  tfds_source.download_and_prepare(builder, **kwargs)


def _tfds_full_name(spec: DatasetSpec, data_config: Any) -> str:
  config = data_config.get('tfds_config', None) or spec.tfds_config
  return f'{spec.tfds_name}/{config}' if config else spec.tfds_name


def _tfds_split(spec: DatasetSpec, split: str) -> str:
  return spec.test_split if split == 'test' else split


def _rgb_builder(name: str, spec: DatasetSpec, data_config: Any) -> Any:
  """The prepared TFDS builder of an RGB dataset: prepared data in data.data_dir, else a download."""
  if _source(data_config) == 'local':
    raise ValueError(f"data.source = 'local' reads the MNIST family's IDX files and image folders; {name!r} comes "
                     "from TFDS: set --config.data.source=auto (or tfds).")
  full_name = _tfds_full_name(spec, data_config)
  hint = spec.install_hint or tfds_source.prepare_hint(full_name, array_record=True)
  try:
    builder = _tfds_builder(full_name, data_config.get('data_dir', None))
  except Exception as e:  # pylint: disable=broad-except
    raise DataUnavailableError(f'Dataset {name!r}: no TFDS builder {full_name!r} ({type(e).__name__}: {e}). '
                               'Check data.tfds_config.') from e
  if builder.is_prepared():
    logging.info('Dataset %s: using prepared TFDS data in %s.', name, builder.data_dir)
    return builder
  if not spec.downloadable:
    raise DataUnavailableError(f'Dataset {name!r} ({full_name}) is not prepared in {builder.data_dir}, and {hint}.')
  logging.info('Dataset %s: no prepared TFDS data in %s; downloading and preparing it (ArrayRecord).', name,
               builder.data_dir)
  try:
    _tfds_download(builder, file_format='array_record')
  except Exception as e:  # pylint: disable=broad-except
    why = str(e)[:300] if isinstance(e, DataUnavailableError) else f'{type(e).__name__}: {str(e)[:300]}'
    raise DataUnavailableError(f'Dataset {name!r} ({full_name}) is not prepared in {builder.data_dir}, and the TFDS '
                               f'download failed: {why}.\nTo fix: {hint}.') from e
  return builder


# --------------------------------------------------------------------- MNIST family resolution.
def _resolve_mnist(spec: DatasetSpec, name: str, data_config: Any, split: str, with_labels: bool):
  """(images, labels or None) of the MNIST family from the source named by data.source."""
  source, manual_dir = _source(data_config), data_config.get('manual_dir', None)
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
    builder = _tfds_builder(spec.tfds_name, data_config.get('data_dir', None))
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
    _tfds_download(builder)
  except Exception as e:  # pylint: disable=broad-except
    tried.append(f'TFDS download: {type(e).__name__}: {str(e)[:300]}')
    raise unavailable() from e
  return tfds_source.read_split(builder, split, with_labels)


def _pad(images: np.ndarray, pad_to: int) -> np.ndarray:
  h, w = images.shape[1:3]
  if pad_to < max(h, w):
    raise ValueError(f'data.pad_to={pad_to} is smaller than the image size {h}x{w}.')
  ph, pw = pad_to - h, pad_to - w
  return np.pad(images, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))


# --------------------------------------------------------------------------------- Whole splits.
def _load(data_config: Any, split: str, with_labels: bool) -> tuple[np.ndarray, Optional[np.ndarray]]:
  name, spec = _spec(data_config)
  if spec.kind == 'idx':
    images, labels = _resolve_mnist(spec, name, data_config, split, with_labels)
  elif spec.kind == 'tfds':
    builder = _rgb_builder(name, spec, data_config)
    images, labels = tfds_source.read_split(builder, _tfds_split(spec, split), with_labels, _size(spec, data_config))
  else:
    image_folder.check_split(split)
    if _source(data_config) == 'tfds':
      raise ValueError("data.source = 'tfds' cannot read an image folder: set --config.data.source=auto (or local).")
    listing = image_folder.list_folder(data_config.get('manual_dir', None), data_config.get('class_map', None))
    images, labels = image_folder.load_arrays(listing, _size(spec, data_config), with_labels)
  expected = spec.image_shape if spec.kind == 'idx' else (_size(spec, data_config),) * 2 + (3,)
  if images.ndim != 4 or images.shape[1:] != expected:
    raise ValueError(f'{name} ({split}): expected images of shape (N, {", ".join(map(str, expected))}), got '
                     f'{images.shape}.')
  if spec.kind == 'idx' and data_config.get('pad_to', 0):
    images = _pad(images, data_config.pad_to)
  logging.info('Dataset %s (%s): %d images of shape %s.', name, split, len(images), images.shape[1:])
  return images, labels


def load_images(data_config: Any, split: str) -> np.ndarray:
  """All images of a split in memory as uint8 (N, H, W, C) (MNIST family: padded if data.pad_to > 0).

  MNIST family, data.source: 'local' reads IDX files from data.manual_dir, else from STANDARD_LOCAL_ROOT; 'tfds'
  uses TFDS (downloading if not prepared); 'auto' uses manual_dir if set, else prepared TFDS data, else the
  standard local directory, else a TFDS download, and raises DataUnavailableError listing every attempt if all
  fail. RGB TFDS datasets: prepared data, else a download (failing within seconds offline). Each step is logged.
  """
  return _load(data_config, split, with_labels=False)[0]


def load_labeled_images(data_config: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images, labels) of a split: images as `load_images`, labels int32 (N,).

  Local IDX sources need the *-labels-idx1-ubyte[.gz] file next to the images.
  """
  return _load(data_config, split, with_labels=True)


def load_dataset(data_config: Any, split: str, with_labels: bool = False) -> Dataset:
  """The split as a Dataset: in host memory (data.storage = 'memory') or read by index ('stream').

  The fingerprint hashes the image array for the MNIST family (as checkpoints have always recorded); for TFDS
  and folder data it records the TFDS name/version/split or the sha256 of the image files' (path, size, label)
  list, in either storage, so a run may switch storage when resumed. The MNIST family is always held in memory
  (it is small).
  """
  name, spec = _spec(data_config)
  storage = data_config.get('storage', 'memory')
  if storage not in ('memory', 'stream'):
    raise ValueError(f"data.storage must be 'memory' or 'stream', got {storage!r}.")
  if storage == 'stream' and spec.kind == 'tfds':
    builder = _rgb_builder(name, spec, data_config)
    size = _size(spec, data_config)
    return tfds_source.TfdsStreamDataset(builder, _tfds_split(spec, split), (size, size, 3), spec.num_classes,
                                         with_labels)
  if storage == 'stream' and spec.kind == 'folder':
    image_folder.check_split(split)
    listing = image_folder.list_folder(data_config.get('manual_dir', None), data_config.get('class_map', None))
    return image_folder.FolderStreamDataset(listing, _size(spec, data_config), with_labels)
  if storage == 'stream':
    logging.info("Dataset %s: data.storage = 'stream', but the MNIST family is small: held in memory.", name)
  if with_labels:  # Through the module-level loaders, so that tests can substitute them.
    images, labels = load_labeled_images(data_config, split)
  else:
    images, labels = load_images(data_config, split), None
  fingerprint = None  # MNIST family: the sha256 of the image array, as checkpoints have always recorded.
  if spec.kind == 'tfds':  # Otherwise the source, as when streamed: switching data.storage keeps a run resumable.
    builder = _rgb_builder(name, spec, data_config)
    fingerprint = tfds_source.source_fingerprint(builder.info.full_name, _tfds_split(spec, split), len(images),
                                                 images.shape[1:])
  elif spec.kind == 'folder':
    listing = image_folder.list_folder(data_config.get('manual_dir', None), data_config.get('class_map', None))
    fingerprint = image_folder.source_fingerprint(listing, images.shape[1:])
  return ArrayDataset(images, labels, num_classes(data_config), _fingerprint=fingerprint)


def num_classes(data_config: Any) -> int:
  """Number of classes (labels lie in [0, num_classes)); for an image folder from its class map or subdirectories,
  decoding nothing."""
  _, spec = _spec(data_config)
  if spec.num_classes is not None:
    return spec.num_classes
  return image_folder.num_classes(data_config.get('manual_dir', None), data_config.get('class_map', None))


# ------------------------------------------------------------------------------------ Batching.
@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  perm = np.random.default_rng((seed, epoch)).permutation(num_examples)
  perm.flags.writeable = False  # Cached: never mutate.
  return perm


def batch_indices(seed: int, step: int, global_batch_size: int, num_examples: int) -> np.ndarray:
  """int64 indices (global_batch_size,) of the examples of training `step`.

  Epoch e is `default_rng((seed, e)).permutation(num_examples)`; the stream of all epochs concatenated is cut
  into consecutive batches, so a batch may straddle an epoch boundary and each example is used once per epoch.
  """
  if seed < 0 or step < 0:
    raise ValueError(f'seed and step must be >= 0, got {seed}, {step}.')
  if global_batch_size < 1 or num_examples < 1:
    raise ValueError(f'global_batch_size ({global_batch_size}) and num_examples ({num_examples}) must be >= 1.')
  seed, step = int(seed), int(step)
  b, n = int(global_batch_size), int(num_examples)
  start, end = step * b, (step + 1) * b
  parts = []
  for epoch in range(start // n, (end - 1) // n + 1):
    lo, hi = max(start, epoch * n), min(end, (epoch + 1) * n)
    perm = _epoch_permutation(seed, epoch, n)
    parts.append(perm[lo - epoch * n:hi - epoch * n])
  return np.concatenate(parts).astype(np.int64)


def _rows_per_process(global_batch_size: int, process_index: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(f'global_batch_size={global_batch_size} is not divisible by process_count={process_count}.')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, {process_count}).')
  return global_batch_size // process_count


def local_batch(dataset: Dataset, seed: int, step: int, global_batch_size: int, process_index: int = 0,
                process_count: int = 1) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """This process's rows [p*b, (p+1)*b) of the global batch of `step`: (images, labels or None), reading only
  those rows."""
  b = _rows_per_process(global_batch_size, process_index, process_count)
  rows = batch_indices(seed, step, global_batch_size, dataset.num_examples)
  return dataset.get(rows[process_index * b:(process_index + 1) * b])


class BatchStream:
  """local_batch of consecutive steps, reading step + 1 in one background thread while step k computes.

  get(step) returns exactly local_batch(dataset, seed, step, ...); a step other than the prefetched one is read
  directly. close() (or a `with` block) stops the thread.
  """

  def __init__(self, dataset: Dataset, seed: int, global_batch_size: int, process_index: int = 0,
               process_count: int = 1):
    self._read = functools.partial(local_batch, dataset, seed, global_batch_size=global_batch_size,
                                   process_index=process_index, process_count=process_count)
    _rows_per_process(global_batch_size, process_index, process_count)  # Fails here, not in the thread.
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='batch_stream')
    self._next: Optional[tuple[int, concurrent.futures.Future]] = None

  def get(self, step: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
    pending, self._next = self._next, None
    if pending is not None and pending[0] == step:
      batch = pending[1].result()
    else:  # Read in the same thread, after any pending read: never two reads at once.
      if pending is not None:
        pending[1].cancel()
      batch = self._pool.submit(self._read, step=step).result()
    self._next = (step + 1, self._pool.submit(self._read, step=step + 1))
    return batch

  def close(self) -> None:
    if self._next is not None:
      self._next[1].cancel()
      self._next = None
    self._pool.shutdown(wait=True)

  def __enter__(self) -> 'BatchStream':
    return self

  def __exit__(self, *exc) -> None:
    self.close()
