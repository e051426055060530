"""The input pipeline of cm_jax: datasets by name, step-indexed batches, and pixel scaling.

This is the data interface the rest of cm_jax calls (image shapes aside: cm_jax.data.catalog.image_shape); the
per-source readers live in cm_jax/data/. A split is a `Dataset` (load_dataset): rows addressed by index, either
decoded once into host memory (data.storage = 'memory'), read on demand (data.storage = 'stream': TFDS
ArrayRecord random access, or the image files), or memory-mapped from a folder decoded once (data.storage =
'prepared', cm_jax/data/prepared.py). The batch of training step k is a pure function of (seed, k) (see
`batch_indices`), and each process reads only its rows of it (`local_batch`, `BatchStream`), so a restarted run
resumes exactly where it stopped and there is no iterator state to checkpoint.

Datasets: 'mnist', 'fashion_mnist' (28x28 gray; IDX files or TFDS); 'cifar10' (TFDS, 32x32); 'imagenette'
(TFDS 'imagenette/<data.tfds_config or 160px-v2>'); 'imagenet64' (TFDS 'imagenet_resized/64x64', prepared by
hand: it cannot be downloaded automatically); 'image_folder' (data.manual_dir, 'train' split only). For
imagenette and imagenet64 cm_jax's split 'test' is TFDS's 'validation'. RGB images of another size than
data.image_size are centre-cropped to a square and resized (cm_jax/data/transforms.py).
"""

from __future__ import annotations

import concurrent.futures
import functools
from typing import Any, Optional

from absl import logging
import numpy as np

from cm_jax.data import image_folder
from cm_jax.data import mnist_family
from cm_jax.data import prepared
from cm_jax.data import tfds_source
# Re-exported: the names callers and tests use stay on this one interface module.
from cm_jax.data.dataset import (array_fingerprint, ArrayDataset, Dataset,  # pylint: disable=unused-import
                                 DataUnavailableError)
from cm_jax.data.idx import read_idx  # pylint: disable=unused-import
# The dataset table and pixel scaling live in light modules (no TFDS, PIL or absl) that the train step and
# benchmarks import; re-exported here (image shapes: cm_jax.data.catalog.image_shape, the one door).
from cm_jax.core.pixels import to_model_range, to_uint8  # pylint: disable=unused-import
from cm_jax.data.catalog import data_source as _source, dataset_spec as _spec, image_size as _size
from cm_jax.data.catalog import SUPPORTED  # pylint: disable=unused-import

MNIST_FAMILY = ('mnist', 'fashion_mnist')


# --------------------------------------------------------------------------------- Whole splits.
def _load(data_config: Any, split: str, with_labels: bool) -> tuple[np.ndarray, Optional[np.ndarray]]:
  name, spec = _spec(data_config)
  if spec.kind == 'idx':
    images, labels = mnist_family.read_split(spec, name, data_config, split, with_labels)
  elif spec.kind == 'tfds':
    builder = tfds_source.prepared_builder(name, spec, data_config)
    images, labels = tfds_source.read_split(builder, tfds_source.tfds_split(spec, split), with_labels,
                                            _size(spec, data_config))
  else:
    image_folder.check_split(split)
    if _source(data_config) == 'tfds':
      raise ValueError("data.source = 'tfds' cannot read an image folder: set --config.data.source=auto (or local).")
    if data_config.get('storage', 'memory') == 'prepared':
      rows = prepared.PreparedDataset(data_config.prepared_dir, _size(spec, data_config), with_labels)
      images, labels = rows.get(np.arange(rows.num_examples))
    else:
      listing = image_folder.list_folder(data_config.get('manual_dir', None), data_config.get('class_map', None))
      images, labels = image_folder.load_arrays(listing, _size(spec, data_config), with_labels,
                                                _decode_workers(data_config), data_config.get('jpeg_draft', False))
  expected = spec.image_shape if spec.kind == 'idx' else (_size(spec, data_config),) * 2 + (3,)
  if images.ndim != 4 or images.shape[1:] != expected:
    raise ValueError(f'{name} ({split}): expected images of shape (N, {", ".join(map(str, expected))}), got '
                     f'{images.shape}.')
  if spec.kind == 'idx' and data_config.get('pad_to', 0):
    images = mnist_family.pad(images, data_config.pad_to)
  logging.info('Dataset %s (%s): %d images of shape %s.', name, split, len(images), images.shape[1:])
  return images, labels


def load_images(data_config: Any, split: str) -> np.ndarray:
  """All images of a split in memory as uint8 (N, H, W, C) (MNIST family: padded if data.pad_to > 0).

  MNIST family: the source data.source names (cm_jax/data/mnist_family.py: IDX files or TFDS, with fallbacks,
  raising DataUnavailableError listing every attempt if all fail). RGB TFDS datasets: prepared data, else a
  download (failing within seconds offline). Each step is logged.
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
  if storage not in ('memory', 'stream', 'prepared'):
    raise ValueError(f"data.storage must be 'memory', 'stream' or 'prepared', got {storage!r}.")
  if storage == 'prepared':
    if spec.kind != 'folder':
      raise ValueError(f"data.storage = 'prepared' is for image folders, not {name!r}.")
    image_folder.check_split(split)
    return prepared.PreparedDataset(data_config.prepared_dir, _size(spec, data_config), with_labels)
  if storage == 'stream' and spec.kind == 'tfds':
    builder = tfds_source.prepared_builder(name, spec, data_config)
    size = _size(spec, data_config)
    return tfds_source.TfdsStreamDataset(builder, tfds_source.tfds_split(spec, split), (size, size, 3),
                                         spec.num_classes, with_labels)
  if storage == 'stream' and spec.kind == 'folder':
    image_folder.check_split(split)
    listing = image_folder.list_folder(data_config.get('manual_dir', None), data_config.get('class_map', None))
    listing = image_folder.preflight(listing, data_config.get('skip_unreadable', False))
    return image_folder.FolderStreamDataset(listing, _size(spec, data_config), with_labels,
                                            workers=_decode_workers(data_config),
                                            draft=data_config.get('jpeg_draft', False))
  if storage == 'stream':
    logging.info("Dataset %s: data.storage = 'stream', but the MNIST family is small: held in memory.", name)
  if with_labels:  # Through the module-level loaders, so that tests can substitute them.
    images, labels = load_labeled_images(data_config, split)
  else:
    images, labels = load_images(data_config, split), None
  fingerprint = None  # MNIST family: the sha256 of the image array, as checkpoints have always recorded.
  if spec.kind == 'tfds':  # Otherwise the source, as when streamed: switching data.storage keeps a run resumable.
    builder = tfds_source.prepared_builder(name, spec, data_config)
    fingerprint = tfds_source.source_fingerprint(builder.info.full_name, tfds_source.tfds_split(spec, split),
                                                 len(images), images.shape[1:])
  elif spec.kind == 'folder':
    listing = image_folder.list_folder(data_config.get('manual_dir', None), data_config.get('class_map', None))
    fingerprint = image_folder.source_fingerprint(listing, images.shape[1:], data_config.get('jpeg_draft', False))
  return ArrayDataset(images, labels, num_classes(data_config), _fingerprint=fingerprint)


def num_classes(data_config: Any) -> int:
  """Number of classes (labels lie in [0, num_classes)); for an image folder from its class map or subdirectories,
  decoding nothing."""
  _, spec = _spec(data_config)
  if spec.num_classes is not None:
    return spec.num_classes
  if data_config.get('storage', 'memory') == 'prepared':
    return int(prepared.read_meta(data_config.prepared_dir)['num_classes'])
  return image_folder.num_classes(data_config.get('manual_dir', None), data_config.get('class_map', None))


def _decode_workers(data_config: Any) -> int:
  return image_folder.worker_count(data_config.get('decode_workers', 0))


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
