"""Tests for cm_jax.input_pipeline."""

import gzip
import os
import struct

import ml_collections
import numpy as np
import pytest

from cm_jax import input_pipeline as ip
from cm_jax.data import mnist_family
from cm_jax.data import tfds_source

FASHION_DIR = '/usr/share/datasets/fashion-mnist'
_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09,
          np.dtype(np.int16): 0x0B, np.dtype(np.int32): 0x0C,
          np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}


def _idx_bytes(arr: np.ndarray) -> bytes:
  header = struct.pack('>BBBB', 0, 0, _CODES[arr.dtype], arr.ndim)
  header += struct.pack(f'>{arr.ndim}I', *arr.shape)
  return header + arr.astype(arr.dtype.newbyteorder('>')).tobytes()


def _write_idx(path, arr: np.ndarray, gz: bool) -> str:
  data = _idx_bytes(arr)
  path = str(path) + ('.gz' if gz else '')
  with open(path, 'wb') as f:
    f.write(gzip.compress(data) if gz else data)
  return path


def _make_idx_dir(directory, n_train=6, n_test=4, gz=True):
  """Writes tiny MNIST-style IDX files; returns (train, test) images."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(0)
  out = []
  for prefix, n in (('train', n_train), ('t10k', n_test)):
    imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    _write_idx(os.path.join(directory, f'{prefix}-images-idx3-ubyte'), imgs, gz)
    _write_idx(os.path.join(directory, f'{prefix}-labels-idx1-ubyte'),
               rng.integers(0, 10, (n,), dtype=np.uint8), gz)
    out.append(imgs[..., None])
  return out


def _config(**kw) -> ml_collections.ConfigDict:
  cfg = dict(name='mnist', source='auto', manual_dir=None, data_dir=None,
             pad_to=0)
  cfg.update(kw)
  return ml_collections.ConfigDict(cfg)


# ------------------------------------------------------------------ read_idx.
@pytest.mark.parametrize('gz', [False, True])
@pytest.mark.parametrize('dtype', [np.uint8, np.int32, np.float64])
def test_read_idx_round_trip(tmp_path, gz, dtype):
  arr = (np.arange(60) - 7).reshape(3, 4, 5).astype(dtype)
  path = _write_idx(tmp_path / 'x-idx3', arr, gz)
  out = ip.read_idx(path)
  assert out.dtype == np.dtype(dtype) and out.dtype.isnative
  np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize('mangle', ['truncate', 'extra', 'magic', 'dtype',
                                    'gzip', 'empty'])
def test_read_idx_corrupt(tmp_path, mangle):
  data = _idx_bytes(np.zeros((2, 3, 3), np.uint8))
  data = {'truncate': data[:-1], 'extra': data + b'\0',
          'magic': b'\x01' + data[1:], 'dtype': data[:2] + b'\x42' + data[3:],
          'gzip': gzip.compress(data)[:-10], 'empty': b''}[mangle]
  path = tmp_path / f'bad-{mangle}-idx3-ubyte'
  path.write_bytes(data)
  with pytest.raises(ValueError, match=f'bad-{mangle}-idx3-ubyte'):
    ip.read_idx(path)


# ------------------------------------------------------------- batch_indices.
def test_batch_indices_deterministic_and_seeded():
  a = ip.batch_indices(3, 5, 16, 100)
  assert a.dtype == np.int64 and a.shape == (16,)
  np.testing.assert_array_equal(a, ip.batch_indices(3, 5, 16, 100))
  assert not np.array_equal(a, ip.batch_indices(4, 5, 16, 100))


@pytest.mark.parametrize('n,b', [(64, 16), (50, 16), (7, 3), (5, 8)])
def test_batch_indices_epochs(n, b):
  steps = -(-2 * n // b) + 1  # Enough steps to cover two full epochs.
  stream = np.concatenate([ip.batch_indices(1, k, b, n) for k in range(steps)])
  for e in range(2):
    epoch = stream[e * n:(e + 1) * n]
    np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
    expected = np.random.default_rng((1, e)).permutation(n)
    np.testing.assert_array_equal(epoch, expected)
  # Resume at step k gives batches k, k+1, ... of the same stream.
  ip._epoch_permutation.cache_clear()
  k = steps // 2
  resumed = np.concatenate(
      [ip.batch_indices(1, s, b, n) for s in range(k, steps)])
  np.testing.assert_array_equal(resumed, stream[k * b:])


def test_batch_indices_cache_is_read_only():
  ip.batch_indices(0, 0, 4, 10)[:] = 0  # Returned arrays are fresh copies.
  assert sorted(ip.batch_indices(0, 0, 4, 10).tolist() +
                ip.batch_indices(0, 1, 4, 10).tolist() +
                ip.batch_indices(0, 2, 4, 10).tolist()[:2]) == list(range(10))


# --------------------------------------------------------------- local_batch.
def test_local_batch_processes_concatenate_to_global():
  images = np.arange(37 * 2 * 2).reshape(37, 2, 2, 1).astype(np.uint8)
  labels = np.arange(37, dtype=np.int32)
  data = ip.ArrayDataset(images, labels, 37)
  for step in (0, 3, 11):
    full, full_labels = ip.local_batch(data, 7, step, 12)
    np.testing.assert_array_equal(full,
                                  images[ip.batch_indices(7, step, 12, 37)])
    np.testing.assert_array_equal(full_labels, ip.batch_indices(7, step, 12, 37))
    parts = [ip.local_batch(data, 7, step, 12, p, 4) for p in range(4)]
    assert all(p.shape == (3, 2, 2, 1) and p.dtype == np.uint8 and l.dtype == np.int32 for p, l in parts)
    np.testing.assert_array_equal(np.concatenate([p for p, _ in parts]), full)
    np.testing.assert_array_equal(np.concatenate([l for _, l in parts]), full_labels)


def test_local_batch_without_labels_gives_none():
  data = ip.ArrayDataset(np.zeros((5, 2, 2, 1), np.uint8), None, 10)
  images, labels = ip.local_batch(data, 0, 0, 4)
  assert images.shape == (4, 2, 2, 1) and labels is None


def test_local_batch_indivisible():
  with pytest.raises(ValueError, match='divisible'):
    ip.local_batch(ip.ArrayDataset(np.zeros((10, 2, 2, 1), np.uint8), None, 10), 0, 0, 10, 0, 3)


def test_array_dataset_fingerprint_is_the_checkpointed_one():
  """In memory, the fingerprint is what checkpoints have always recorded: existing runs still resume."""
  import hashlib  # pylint: disable=g-import-not-at-top
  images = np.arange(3 * 4 * 4).reshape(3, 4, 4, 1).astype(np.uint8)
  assert ip.ArrayDataset(images, None, 10).fingerprint == {
      'num_examples': 3, 'shape': [4, 4, 1], 'sha256': hashlib.sha256(images.tobytes()).hexdigest()}


# ------------------------------------------------------------ scaling round.
def test_range_round_trip():
  x = np.arange(256, dtype=np.uint8)
  y = ip.to_model_range(x)
  assert y.dtype == np.float32 and y.min() == -1.0 and y.max() == 1.0
  np.testing.assert_array_equal(ip.to_uint8(y), x)
  assert ip.to_uint8(np.array([-3.0, 5.0])).tolist() == [0, 255]


def test_range_jax():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jnp.arange(256, dtype=jnp.uint8)
  y = ip.to_model_range(x)
  assert y.dtype == jnp.float32
  np.testing.assert_array_equal(ip.to_uint8(y), np.arange(256))


# -------------------------------------------------------------- load_images.
@pytest.mark.parametrize('name', ['mnist', 'fashion_mnist'])
def test_load_tfds_mock(name):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=7):
    x = ip.load_images(_config(name=name, source='tfds'), 'train')
    assert x.shape == (7, 28, 28, 1) and x.dtype == np.uint8
    padded = ip.load_images(_config(name=name, source='tfds', pad_to=32),
                            'test')
  assert padded.shape == (7, 32, 32, 1) and padded.dtype == np.uint8
  border = np.ones((32, 32), bool)
  border[2:30, 2:30] = False
  assert not padded[:, border].any()
  assert padded[:, 2:30, 2:30].any()


def test_load_auto_mock_uses_tfds(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(mnist_family, 'STANDARD_LOCAL_ROOT', str(tmp_path))
  with tfds.testing.mock_data(num_examples=5):
    x = ip.load_images(_config(name='mnist'), 'train')
  assert x.shape == (5, 28, 28, 1) and x.dtype == np.uint8


@pytest.mark.parametrize('source', ['local', 'auto'])
@pytest.mark.parametrize('gz', [True, False])
def test_load_manual_dir(tmp_path, monkeypatch, source, gz):
  train, test = _make_idx_dir(tmp_path / 'idx', gz=gz)
  # 'auto' must not consult TFDS when manual_dir is set.
  monkeypatch.setattr(tfds_source, 'make_builder', None)
  cfg = _config(source=source, manual_dir=str(tmp_path / 'idx'))
  np.testing.assert_array_equal(ip.load_images(cfg, 'train'), train)
  np.testing.assert_array_equal(ip.load_images(cfg, 'test'), test)
  cfg.pad_to = 30
  padded = ip.load_images(cfg, 'test')
  assert padded.shape == (4, 30, 30, 1)
  np.testing.assert_array_equal(padded[:, 1:29, 1:29], test)


def test_unknown_name():
  with pytest.raises(ValueError, match=r'data\.name.*fashion_mnist'):
    ip.load_images(_config(name='cifar100'), 'train')


def test_error_local_missing(tmp_path):
  cfg = _config(name='fashion_mnist', source='local',
                manual_dir=str(tmp_path / 'nope'))
  with pytest.raises(ip.DataUnavailableError) as e:
    ip.load_images(cfg, 'train')
  msg = str(e.value)
  assert "'fashion_mnist'" in msg and 'nope' in msg
  assert 'apt-get install dataset-fashion-mnist' in msg
  assert '--config.data.manual_dir' in msg


def test_error_auto_nothing_available(tmp_path, monkeypatch):
  monkeypatch.setattr(mnist_family, 'STANDARD_LOCAL_ROOT', str(tmp_path / 'root'))

  def offline(builder):
    raise OSError('network unreachable')

  monkeypatch.setattr(tfds_source, 'download_and_prepare', offline)
  cfg = _config(name='mnist', data_dir=str(tmp_path / 'tfds'))
  with pytest.raises(ip.DataUnavailableError) as e:
    ip.load_images(cfg, 'train')
  msg = str(e.value)
  assert "'mnist'" in msg
  assert 'TFDS prepared data: none' in msg
  assert 'local IDX: no IDX image files' in msg
  assert 'network unreachable' in msg
  assert 'no Debian package' in msg and '--config.data.manual_dir' in msg


# ----------------------------------------------------------------- Real data.
def _require_fashion():
  files = ['train-images-idx3-ubyte.gz', 't10k-images-idx3-ubyte.gz']
  missing = [f for f in files
             if not os.path.exists(os.path.join(FASHION_DIR, f))]
  if missing:
    pytest.fail(f'Fashion-MNIST IDX files missing from {FASHION_DIR} '
                f'({missing}): run `apt-get install dataset-fashion-mnist`.')


def test_real_fashion_mnist(tmp_path):
  _require_fashion()
  cfg = _config(name='fashion_mnist', source='local')
  train = ip.load_images(cfg, 'train')
  test = ip.load_images(cfg, 'test')
  assert train.shape == (60000, 28, 28, 1) and train.dtype == np.uint8
  assert test.shape == (10000, 28, 28, 1) and test.dtype == np.uint8
  assert round(float(train.mean(dtype=np.float64)), 2) == 72.94
  # 'auto' with an empty TFDS data_dir falls back to the standard directory.
  auto = ip.load_images(_config(name='fashion_mnist',
                                data_dir=str(tmp_path)), 'test')
  np.testing.assert_array_equal(auto, test)


# -------------------------------------------------------------- load_dataset.
def test_load_dataset_in_memory_is_the_whole_split(tmp_path):
  train, _ = _make_idx_dir(tmp_path / 'idx')
  cfg = _config(source='local', manual_dir=str(tmp_path / 'idx'))
  data = ip.load_dataset(cfg, 'train', with_labels=True)
  assert (data.num_examples, data.image_shape, data.num_classes) == (6, (28, 28, 1), 10)
  images, labels = data.get(np.arange(6))
  np.testing.assert_array_equal(images, train)
  assert labels.dtype == np.int32 and labels.shape == (6,)
  assert data.fingerprint == ip.array_fingerprint(train)
  # 'stream' keeps the small MNIST family in memory: same data, same fingerprint.
  cfg.storage = 'stream'
  assert ip.load_dataset(cfg, 'train').fingerprint == data.fingerprint


def test_load_dataset_reads_through_load_images(tmp_path, monkeypatch):
  """Substituting input_pipeline.load_images (as tests of the training loop do) changes what load_dataset serves."""
  train, _ = _make_idx_dir(tmp_path / 'idx')
  cfg = _config(source='local', manual_dir=str(tmp_path / 'idx'))
  load = ip.load_images
  monkeypatch.setattr(ip, 'load_images', lambda *a: load(*a)[::-1])
  np.testing.assert_array_equal(ip.load_dataset(cfg, 'train').get(np.arange(6))[0], train[::-1])


def test_labels_missing_is_a_clear_error(tmp_path):
  _make_idx_dir(tmp_path / 'idx')
  os.remove(tmp_path / 'idx' / 'train-labels-idx1-ubyte.gz')
  cfg = _config(source='auto', manual_dir=str(tmp_path / 'idx'))
  assert ip.load_dataset(cfg, 'train').num_examples == 6  # Unconditional: labels not needed.
  with pytest.raises(ip.DataUnavailableError, match=r'train-labels-idx1-ubyte\[\.gz\].*class_conditional'):
    ip.load_dataset(cfg, 'train', with_labels=True)


def test_unknown_storage():
  with pytest.raises(ValueError, match=r"data\.storage must be 'memory', 'stream' or 'prepared'"):
    ip.load_dataset(_config(storage='disk'), 'train')
  with pytest.raises(ValueError, match=r"'prepared' is for image folders, not 'mnist'"):
    ip.load_dataset(_config(storage='prepared'), 'train')
