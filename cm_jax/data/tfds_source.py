"""TFDS datasets: prepared-data checks, downloads that fail fast offline, whole splits, and random access.

Streaming (data.storage = 'stream') reads rows through TFDS's random-access data source
(`builder.as_data_source`, ArrayRecord files) rather than a tf.data iterator: the batch of step k stays a pure
function of (seed, k) through input_pipeline.batch_indices, each process reads only its own rows of the global
batch, and nothing but the step needs checkpointing (no iterator state; resuming is exact). The prepared data
must be in the array_record format (`tfds build NAME --file_format=array_record`).

Downloads first probe the hosts of the builder's download URLs with a short TCP connect, so a machine without
network fails within seconds instead of minutes of TFDS retries, and a failed download removes the directories
it created under the data_dir.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import socket
import time
import urllib.parse
import urllib.request
from typing import Any, Optional

from absl import logging
import numpy as np

from cm_jax.data import transforms
from cm_jax.data.catalog import data_source, DatasetSpec
from cm_jax.data.dataset import DataUnavailableError

PROBE_TIMEOUT_S = 3.0  # TCP connect timeout of the network probe before a download.
_SNAPSHOT_DEPTH = 4  # data_dir/name/config/version (and downloads/extracted/x): the levels a download creates.


def import_tfds():
  """Imports tensorflow_datasets lazily, keeping TensorFlow off the GPUs."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # Devices already initialised; nothing to do.
    pass
  return tfds


def make_builder(full_name: str, data_dir: Optional[str]) -> Any:
  """The TFDS builder of 'name' or 'name/config' (creates no directory)."""
  return import_tfds().builder(full_name, data_dir=data_dir)


def prepare_hint(full_name: str, array_record: bool = False) -> str:
  """How to prepare `full_name` on a machine with internet and use it here."""
  fmt = ' --file_format=array_record' if array_record else ''
  py_fmt = ", file_format='array_record'" if array_record else ''
  return (f'on a machine with internet run `tfds build {full_name} --data_dir=DIR{fmt}` (or `python -c "import '
          f"tensorflow_datasets as tfds; tfds.builder('{full_name}', data_dir='DIR').download_and_prepare("
          f'{py_fmt.lstrip(", ")})"`), copy DIR to this machine and set --config.data.data_dir=DIR')


# ------------------------------------------------------------------------------------- Downloads.
def download_hosts(builder: Any) -> list[tuple[str, int]]:
  """(host, port) of every download URL the builder declares, or of the http(s) proxy if one is set (empty when the
  builder declares no URL)."""
  try:
    urls = list(getattr(type(builder), 'url_infos', None) or {})
  except Exception:  # pylint: disable=broad-except  (a builder whose checksums file cannot be read)
    urls = []
  proxies = [v for k, v in urllib.request.getproxies().items() if k in ('http', 'https')]
  hosts = set()
  for url in (proxies if urls else []) or urls:  # Behind a proxy only the proxy needs to answer.
    parsed = urllib.parse.urlsplit(url)
    if parsed.hostname:
      hosts.add((parsed.hostname, parsed.port or (80 if parsed.scheme == 'http' else 443)))
  return sorted(hosts)


def any_reachable(hosts: list[tuple[str, int]], timeout: float = PROBE_TIMEOUT_S) -> bool:
  """Whether a TCP connection to any of `hosts` opens within `timeout` seconds (probed concurrently)."""
  def connects(host_port: tuple[str, int]) -> bool:
    try:
      socket.create_connection(host_port, timeout=timeout).close()
      return True
    except OSError:
      return False

  with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(hosts))) as pool:
    return any(pool.map(connects, hosts))


def _is_mocked(builder: Any) -> bool:
  """Under tfds.testing.mock_data download_and_prepare is a no-op: nothing to probe or clean up."""
  return getattr(type(builder).download_and_prepare, '__module__', '').startswith('tensorflow_datasets.testing')


def _data_root(builder: Any) -> str:
  """The data_dir holding name/config/version (builder.data_dir ends with info.full_name)."""
  data_dir, full_name = os.fspath(builder.data_dir), builder.info.full_name
  return data_dir[:-len(full_name)].rstrip('/') if data_dir.endswith(full_name) else os.path.dirname(data_dir)


def _directories(root: str, depth: int = _SNAPSHOT_DEPTH) -> set[str]:
  """The existing directories among root's ancestors, root, and what lies under root down to `depth` levels."""
  parts = os.path.normpath(os.path.abspath(root)).split(os.sep)
  found = {d for d in (os.sep.join(parts[:i]) or os.sep for i in range(1, len(parts) + 1)) if os.path.isdir(d)}
  level = [root] if os.path.isdir(root) else []
  for _ in range(depth):
    nxt = []
    for d in level:
      try:
        nxt.extend(e.path for e in os.scandir(d) if e.is_dir(follow_symlinks=False))
      except OSError:
        pass
    found.update(nxt)
    level = nxt
  return found


def _remove_new_directories(root: str, before: set[str]) -> None:
  """Removes the topmost directories (at root or below it, or root's new ancestors) not in `before`."""
  new = _directories(root) - before
  for d in sorted(d for d in new if os.path.dirname(d) not in new):
    shutil.rmtree(d, ignore_errors=True)
    logging.info('Removed %s, left by the failed download.', d)


def download_and_prepare(builder: Any, file_format: Optional[str] = None,
                         probe_timeout: float = PROBE_TIMEOUT_S) -> None:
  """builder.download_and_prepare(), but raising DataUnavailableError at once when no download host is reachable,
  and leaving the data_dir as it was when the download or preparation fails."""
  kwargs = {'file_format': file_format} if file_format else {}
  if _is_mocked(builder):
    builder.download_and_prepare(**kwargs)
    return
  name = builder.info.full_name
  hosts = download_hosts(builder)
  t0 = time.time()
  if hosts and not any_reachable(hosts, probe_timeout):
    raise DataUnavailableError(f'cannot download {name}: none of its download hosts '
                               f'({", ".join(h for h, _ in hosts)}) is reachable (probed in {time.time() - t0:.1f} '
                               's; no network?)')
  root = os.path.abspath(_data_root(builder))
  before = _directories(root)
  try:
    builder.download_and_prepare(**kwargs)
  except BaseException:
    _remove_new_directories(root, before)
    raise


# ------------------------------------------------------------------------------- RGB datasets.
def builder_name(spec: DatasetSpec, data_config: Any) -> str:
  """'name/config' of the TFDS builder: data.tfds_config, else the dataset's default config."""
  config = data_config.get('tfds_config', None) or spec.tfds_config
  return f'{spec.tfds_name}/{config}' if config else spec.tfds_name


def tfds_split(spec: DatasetSpec, split: str) -> str:
  """The TFDS split that cm_jax's `split` reads ('test' may be TFDS's 'validation')."""
  return spec.test_split if split == 'test' else split


def prepared_builder(name: str, spec: DatasetSpec, data_config: Any) -> Any:
  """The prepared TFDS builder of an RGB dataset: prepared data in data.data_dir, else a download."""
  if data_source(data_config) == 'local':
    raise ValueError(f"data.source = 'local' reads the MNIST family's IDX files and image folders; {name!r} comes "
                     "from TFDS: set --config.data.source=auto (or tfds).")
  tfds_name = builder_name(spec, data_config)
  hint = spec.install_hint or prepare_hint(tfds_name, array_record=True)
  try:
    builder = make_builder(tfds_name, data_config.get('data_dir', None))
  except Exception as e:  # pylint: disable=broad-except
    raise DataUnavailableError(f'Dataset {name!r}: no TFDS builder {tfds_name!r} ({type(e).__name__}: {e}). '
                               'Check data.tfds_config.') from e
  if builder.is_prepared():
    logging.info('Dataset %s: using prepared TFDS data in %s.', name, builder.data_dir)
    return builder
  if not spec.downloadable:
    raise DataUnavailableError(f'Dataset {name!r} ({tfds_name}) is not prepared in {builder.data_dir}, and {hint}.')
  logging.info('Dataset %s: no prepared TFDS data in %s; downloading and preparing it (ArrayRecord).', name,
               builder.data_dir)
  try:
    download_and_prepare(builder, file_format='array_record')
  except Exception as e:  # pylint: disable=broad-except
    why = str(e)[:300] if isinstance(e, DataUnavailableError) else f'{type(e).__name__}: {str(e)[:300]}'
    raise DataUnavailableError(f'Dataset {name!r} ({tfds_name}) is not prepared in {builder.data_dir}, and the TFDS '
                               f'download failed: {why}.\nTo fix: {hint}.') from e
  return builder


# ---------------------------------------------------------------------------------------- Reading.
def _fit(image_HWC: np.ndarray, size: Optional[int]) -> np.ndarray:
  image_HWC = np.asarray(image_HWC, np.uint8)
  return image_HWC if not size else transforms.center_crop_resize(image_HWC, size)


def read_split(builder: Any, split: str, with_labels: bool = False, size: Optional[int] = None,
               chunk: int = 10_000) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """A prepared TFDS split fully in memory: (images uint8 (N, H, W, C), labels int32 (N,) or None).

  size: centre crop + resize every image to size x size (None: keep the stored shape). Fixed-shape images are
  read in chunks rather than `batch_size=-1`: with unknown split sizes (as under `tfds.testing.mock_data`) TFDS
  batches by sys.maxsize, which aborts the process in recent TensorFlow. Images of varying size are read one by
  one.
  """
  if getattr(builder.info.file_format, 'value', None) == 'array_record':  # as_dataset cannot read ArrayRecord.
    return _read_by_index(builder, split, with_labels, size)
  tfds = import_tfds()
  fixed = None not in tuple(builder.info.features['image'].shape)
  ds = builder.as_dataset(split=split, batch_size=chunk if fixed else None, shuffle_files=False)
  parts, label_parts, count, last_log = [], [], 0, time.time()
  for ex in tfds.as_numpy(ds):
    images = ex['image'] if fixed else ex['image'][None]
    if size and images.shape[1:3] != (size, size):
      images = np.stack([_fit(x, size) for x in images])
    parts.append(np.asarray(images, np.uint8))
    if with_labels:
      label_parts.append(np.asarray(ex['label'], np.int32).reshape(-1))
    count += len(images)
    if time.time() - last_log > 5:
      logging.info('Read %d %s images of %s so far.', count, split, builder.info.full_name)
      last_log = time.time()
  images = np.concatenate(parts) if parts else np.zeros((0,), np.uint8)
  logging.info('Read %d %s images of %s from TFDS (%s).', len(images), split, builder.name, builder.data_dir)
  if not with_labels:
    return images, None
  return images, np.concatenate(label_parts) if label_parts else np.zeros((0,), np.int32)


def _read_by_index(builder: Any, split: str, with_labels: bool, size: Optional[int],
                   chunk: int = 1000) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """read_split of data prepared as ArrayRecord: every row through the random-access data source."""
  stored = tuple(builder.info.features['image'].shape)
  if not size and None in stored:
    raise ValueError(f'{builder.info.full_name} has images of varying size: give a target size.')
  shape = (size, size, 3) if size else stored
  ds = TfdsStreamDataset(builder, split, shape, 0, with_labels)
  parts = [ds.get(np.arange(lo, min(lo + chunk, ds.num_examples))) for lo in range(0, ds.num_examples, chunk)]
  images = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0,) + shape, np.uint8)
  logging.info('Read %d %s images of %s by index (%s).', len(images), split, builder.info.full_name,
               builder.data_dir)
  if not with_labels:
    return images, None
  return images, np.concatenate([p[1] for p in parts]) if parts else np.zeros((0,), np.int32)


def source_fingerprint(full_name: str, split: str, num_examples: int, image_shape: tuple[int, ...]) -> dict:
  """What identifies a TFDS split's training rows, whatever the storage: name/config/version, split and shape."""
  return {'num_examples': int(num_examples), 'shape': list(image_shape), 'source': 'tfds', 'tfds': full_name,
          'split': split}


class TfdsStreamDataset:
  """Rows of a prepared TFDS split read on demand through the ArrayRecord random-access data source."""

  def __init__(self, builder: Any, split: str, image_shape: tuple[int, int, int], num_classes: int,
               with_labels: bool):
    name = builder.info.full_name
    try:
      self._source = builder.as_data_source(split=split)
    except NotImplementedError as e:
      raise DataUnavailableError(
          f'{name} is prepared in {builder.data_dir} in a format without random access, but data.storage = '
          f"'stream' reads it by index. Rebuild it as ArrayRecord: `tfds build {name} "
          f'--data_dir={_data_root(builder)} --file_format=array_record` (on a machine with internet, then copy '
          "it over), or set --config.data.storage=memory.") from e
    self.num_examples = int(len(self._source))
    self.image_shape = tuple(image_shape)
    self.num_classes = num_classes
    self._with_labels = with_labels
    self._read = self._read_batched
    self.fingerprint = source_fingerprint(name, split, self.num_examples, self.image_shape)
    logging.info('Streaming %s (%s): %d examples read by index from %s.', name, split, self.num_examples,
                 builder.data_dir)

  def _read_batched(self, keys: list[int]) -> list[Any]:
    try:
      return self._source.__getitems__(keys)  # ArrayRecord reads the records of a batch in parallel.
    except TypeError:  # The data source of tfds.testing.mock_data (TFDS 4.9) breaks __getitems__.
      self._read = self._read_single
      return self._read_single(keys)

  def _read_single(self, keys: list[int]) -> list[Any]:
    return [self._source[k] for k in keys]

  def get(self, indices: Any) -> tuple[np.ndarray, Optional[np.ndarray]]:
    keys = [int(i) for i in np.asarray(indices, np.int64).reshape(-1)]
    records = self._read(keys) if keys else []
    h, w, c = self.image_shape
    images = np.zeros((len(keys), h, w, c), np.uint8)
    for i, record in enumerate(records):
      images[i] = _fit(record['image'], h if (h, w, c) != np.shape(record['image']) else None)
    if not self._with_labels:
      return images, None
    return images, np.asarray([record['label'] for record in records], np.int32).reshape(len(keys))

