"""The 2015-12-05 Inception graph of published FIDs and Inception Scores, run through TensorFlow on the CPU.

Protocol (as TTUR's fid.py and the ADM evaluator, openai/guided-diffusion and openai/consistency_models
evaluations/evaluator.py; clean-fid's legacy_tensorflow mode runs a TorchScript translation of the same graph):
  * weights: classify_image_graph_def.pb, a frozen GraphDef, from inception-2015-12-05.tgz (`TGZ_URL`, TTUR) or
    as a bare file (`PB_URL`, the ADM evaluator's copy);
  * input: uint8 NHWC images as float32 0..255 fed at 'ExpandDims:0' (any size; gray replicated to RGB); the graph
    itself resizes them to 299x299 with its own ResizeBilinear op (TF1 semantics) and normalises them;
  * features: 'pool_3:0', (N, 1, 1, 2048) -> (N, 2048);
  * class probabilities (Inception Score): softmax(pool_3 @ W), W = input 1 of the op 'softmax/logits/MatMul'
    (2048 x 1008), without the graph's bias, as improved-gan's inception_score.py (which TTUR-era code reuses)
    and the ADM evaluator do (the graph's own softmax reshapes to batch 1).
The weights cannot be fetched offline: `resolve_weights` says which file to get and where to put it.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
import urllib.request
from typing import Any

from absl import logging
import numpy as np

from cm_jax.runtime import paths

# TTUR (bioinf-jku/TTUR fid.py) downloads the TensorFlow release archive; the ADM evaluator the bare .pb.
TGZ_URL = 'http://download.tensorflow.org/models/image/imagenet/inception-2015-12-05.tgz'
PB_URL = 'https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/classify_image_graph_def.pb'
WEIGHTS_URLS: tuple[str, ...] = (TGZ_URL, PB_URL)  # Tried in this order by `resolve_weights`.
DOWNLOAD_TIMEOUT_S = 30.0

GRAPH_FILE = 'classify_image_graph_def.pb'  # The GraphDef's name, alone or inside the .tgz.
INPUT_TENSOR = 'ExpandDims:0'  # (1, H, W, 3) float 0..255 in the graph; remapped to a (None, H, W, 3) input.
FEATURE_TENSOR = 'pool_3:0'  # (N, 1, 1, D) average-pooled features.
LOGITS_MATMUL_OP = 'softmax/logits/MatMul'  # Its input 1 is the (D, C) classifier weight matrix.
NAME = 'inception-2015-12-05 (pool_3)'
INPUT_HANDLING = ('uint8 -> float 0..255, gray replicated to RGB, resized to 299x299 inside the graph by its '
                  'bilinear ResizeBilinear op as in TTUR/ADM')
CONFIG_HINT = 'the evaluation.inception_path config field (--config.evaluation.inception_path) or --inception_path'


class InceptionWeightsUnavailableError(FileNotFoundError):
  """Neither a given path, nor the cache, nor a download provided the Inception graph."""


def _tf() -> Any:
  """Imports TensorFlow lazily, keeping it off the GPUs (they belong to JAX)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # Devices already initialised; nothing to do.
    pass
  return tf


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def _graph_bytes(path: str) -> bytes:
  """The serialized GraphDef in `path`: the file itself, or GRAPH_FILE inside a .tgz."""
  if not tarfile.is_tarfile(path):
    with open(path, 'rb') as f:
      return f.read()
  with tarfile.open(path, 'r:*') as archive:
    members = [m for m in archive.getmembers() if m.isfile() and os.path.basename(m.name) == GRAPH_FILE]
    if len(members) != 1:
      raise ValueError(f'{path}: expected one {GRAPH_FILE} in the archive, found {len(members)}')
    return archive.extractfile(members[0]).read()


def _parse_graph(data: bytes, source: str) -> Any:
  """A GraphDef from bytes, checked to hold the tensors this module uses; ValueError naming `source`."""
  tf = _tf()
  graph_def = tf.compat.v1.GraphDef()
  try:
    graph_def.ParseFromString(data)
  except Exception as e:  # The protobuf DecodeError type depends on the protobuf backend.
    raise ValueError(f'{source}: not a TensorFlow GraphDef ({e})') from e
  names = {node.name for node in graph_def.node}
  wanted = [t.split(':')[0] for t in (INPUT_TENSOR, FEATURE_TENSOR)] + [LOGITS_MATMUL_OP]
  missing = [name for name in wanted if name not in names]
  if missing:
    raise ValueError(f'{source}: not the Inception graph (no node {missing})')
  return graph_def


class InceptionNet:
  """The Inception graph as a function: uint8 images (N, H, W, 1 or 3) -> pool_3 features and class probs."""

  def __init__(self, path: str):
    """`path`: classify_image_graph_def.pb or inception-2015-12-05.tgz (see `resolve_weights`)."""
    if not os.path.isfile(path):
      raise FileNotFoundError(f'Inception graph not found: {path}')
    self.path = os.path.abspath(path)
    data = _graph_bytes(self.path)
    self._graph_sha256 = hashlib.sha256(data).hexdigest()
    self._file_sha256 = _sha256(self.path)
    self._fn, self.feature_dim, self.num_classes = self._build(_parse_graph(data, self.path))
    logging.info('Loaded %s from %s (sha256 %s): %d features, %d classes.', NAME, self.path,
                 self._file_sha256, self.feature_dim, self.num_classes)

  @staticmethod
  def _build(graph_def: Any) -> tuple[Any, int, int]:
    """A pruned concrete function images (B, H, W, 3) float32 -> (features (B, D), probs (B, C))."""
    tf = _tf()

    def import_graph():
      images = tf.compat.v1.placeholder(tf.float32, [None, None, None, 3], name='images')
      tf.compat.v1.import_graph_def(graph_def, input_map={INPUT_TENSOR: images}, name='inception')

    wrapped = tf.compat.v1.wrap_function(import_graph, [])
    graph = wrapped.graph
    weights_DC = graph.get_operation_by_name(f'inception/{LOGITS_MATMUL_OP}').inputs[1]
    if weights_DC.shape.rank != 2 or not weights_DC.shape.is_fully_defined():
      raise ValueError(f'{LOGITS_MATMUL_OP} input 1 has shape {weights_DC.shape}, not a (D, C) matrix')
    feature_dim, num_classes = (int(n) for n in weights_DC.shape)
    pool = graph.get_tensor_by_name(f'inception/{FEATURE_TENSOR}')
    with graph.as_default():
      features = tf.reshape(pool, [-1, feature_dim], name='features')
      probs = tf.nn.softmax(tf.matmul(features, weights_DC), name='probs')
    fn = wrapped.prune(feeds=[graph.get_tensor_by_name('images:0')], fetches=[features, probs])
    return fn, feature_dim, num_classes

  def __call__(self, images_NHWC: np.ndarray, batch_size: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """pool_3 features (N, D) and class probabilities (N, C), both float32 as the network computes them."""
    images_NHWC = np.asarray(images_NHWC)
    if images_NHWC.dtype != np.uint8:
      raise TypeError(f'InceptionNet wants uint8 images 0..255, got {images_NHWC.dtype}')
    if images_NHWC.ndim != 4 or images_NHWC.shape[-1] not in (1, 3):
      raise ValueError(f'InceptionNet wants (N, H, W, 1 or 3) images, got shape {images_NHWC.shape}')
    if batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    tf = _tf()
    features, probs = [np.zeros((0, self.feature_dim), np.float32)], [np.zeros((0, self.num_classes), np.float32)]
    for start in range(0, len(images_NHWC), batch_size):
      batch = images_NHWC[start:start + batch_size].astype(np.float32)
      if batch.shape[-1] == 1:
        batch = np.repeat(batch, 3, axis=-1)
      f_BD, p_BC = self._fn(tf.constant(batch))
      features.append(f_BD.numpy())
      probs.append(p_BC.numpy())
    return np.concatenate(features), np.concatenate(probs)

  def protocol(self) -> dict[str, Any]:
    """How features are made, for the metrics' JSON output."""
    return {
        'name': NAME,
        'path': self.path,
        'sha256': self._file_sha256,
        'graph_sha256': self._graph_sha256,  # Of classify_image_graph_def.pb, also when read from the .tgz.
        'input': INPUT_HANDLING,
        'input_tensor': INPUT_TENSOR,
        'feature_tensor': FEATURE_TENSOR,
        'feature_dim': self.feature_dim,
        'probabilities': f'softmax(pool_3 @ W), W = input 1 of {LOGITS_MATMUL_OP}, no bias (as improved-gan/ADM)',
        'num_classes': self.num_classes,
    }


# ------------------------------------------------------------------------------------------------ Weights.
def _download(url: str, dest: str) -> None:
  """Fetches `url` (.pb, or a .tgz holding GRAPH_FILE), checks it is the graph, and renames it to `dest`."""
  folder = os.path.dirname(dest)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=GRAPH_FILE + '.', suffix='.download')
  try:
    with os.fdopen(fd, 'wb') as f, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
      for chunk in iter(lambda: response.read(1 << 20), b''):
        f.write(chunk)
    data = _graph_bytes(tmp)
    _parse_graph(data, url)
    with open(tmp, 'wb') as f:
      f.write(data)
    os.replace(tmp, dest)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def cache_path(cache_dir: str) -> str:
  """Where `resolve_weights` keeps the graph: {cache_dir}/inception/classify_image_graph_def.pb."""
  return os.path.join(os.path.expanduser(cache_dir), 'inception', GRAPH_FILE)


def resolve_weights(path: str | None, cache_dir: str, download: bool = True) -> str:
  """The Inception graph file: `path` if given, else the cached copy, else a download into the cache.

  Raises FileNotFoundError if `path` is given and missing, and InceptionWeightsUnavailableError (a
  FileNotFoundError) saying which file to get, from where, and where to put it when nothing else works.
  """
  if path is not None:
    if not os.path.isfile(path):
      raise FileNotFoundError(f'Inception graph not found: {path} (set by {CONFIG_HINT})')
    return path
  if paths.is_remote(cache_dir):  # TensorFlow reads the graph from a local file: keep it on this host.
    cache_dir = os.path.join(os.path.expanduser('~'), '.cache', 'cm_jax')
  cached = cache_path(cache_dir)
  if os.path.isfile(cached):
    return cached
  failures = []
  if download:
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    for url in WEIGHTS_URLS:
      logging.info('Downloading the Inception graph from %s to %s.', url, cached)
      try:
        _download(url, cached)
        return cached
      except (OSError, ValueError, tarfile.TarError) as e:  # URLError and timeouts are OSErrors.
        failures.append(f'  {url}: {e}')
  else:
    failures.append('  (download disabled)')
  sources = ' or '.join(f'{url} (extract {GRAPH_FILE} from the archive)' if _is_archive_url(url) else url
                        for url in WEIGHTS_URLS)
  raise InceptionWeightsUnavailableError(
      f'The Inception graph {GRAPH_FILE} (inception-2015-12-05) is not available:\n' + '\n'.join(failures) +
      f'\nOn a machine with internet access, get it from {sources}; then put {GRAPH_FILE} at {cached}, or pass '
      f'the path of the .pb (or of the .tgz) with {CONFIG_HINT}.')


def _is_archive_url(url: str) -> bool:
  return url.endswith(('.tgz', '.tar.gz', '.tar'))
