"""Tests for the TFDS datasets (cifar10, imagenette, imagenet64) on tfds.testing.mock_data, both storages, and the
fast offline failure of TFDS downloads."""

import os
import socket
import time

import ml_collections
import numpy as np
import pytest

from cm_jax import input_pipeline as ip
from cm_jax.data import catalog
from cm_jax.data import mnist_family
from cm_jax.data import tfds_source

N = 12  # Mock examples per split.


def _config(name, **kw) -> ml_collections.ConfigDict:
  cfg = dict(name=name, source='auto', manual_dir=None, data_dir=None, tfds_config=None, image_size=0,
             class_map=None, storage='memory', pad_to=0)
  cfg.update(kw)
  return ml_collections.ConfigDict(cfg)


@pytest.fixture
def mock_tfds():
  tfds = tfds_source.import_tfds()
  with tfds.testing.mock_data(num_examples=N):
    yield


# ------------------------------------------------------------------------------- Shapes, labels.
@pytest.mark.parametrize('storage', ['memory', 'stream'])
@pytest.mark.parametrize('name,image_size,side,classes', [
    ('cifar10', 0, 32, 10), ('cifar10', 16, 16, 10), ('imagenette', 0, 64, 10), ('imagenette', 24, 24, 10),
    ('imagenet64', 0, 64, 1000)])
def test_rgb_tfds_datasets(mock_tfds, monkeypatch, storage, name, image_size, side, classes):
  if name == 'imagenet64':  # Never downloaded: mock it as prepared by hand.
    monkeypatch.setattr(tfds_source.import_tfds().core.DatasetBuilder, 'is_prepared', lambda self: True)
  cfg = _config(name, image_size=image_size, storage=storage)
  assert catalog.image_shape(cfg) == (side, side, 3) and ip.num_classes(cfg) == classes
  data = ip.load_dataset(cfg, 'train', with_labels=True)
  assert (data.num_examples, data.image_shape, data.num_classes) == (N, (side, side, 3), classes)
  images, labels = data.get(np.arange(N))
  assert images.shape == (N, side, side, 3) and images.dtype == np.uint8
  assert images.max() > images.min()  # Random pixels, not a blank array.
  assert labels.shape == (N,) and labels.dtype == np.int32
  assert labels.min() >= 0 and labels.max() < classes
  unlabeled = ip.load_dataset(cfg, 'test')
  assert unlabeled.get([0, 1])[1] is None
  assert ip.load_images(cfg, 'test').shape == (N, side, side, 3)


def test_stream_fingerprint_names_the_source_and_test_is_validation(mock_tfds):
  fp = ip.load_dataset(_config('imagenette', storage='stream'), 'test').fingerprint
  assert fp == {'num_examples': N, 'shape': [64, 64, 3], 'source': 'tfds', 'tfds': 'imagenette/160px-v2/1.0.0',
                'split': 'validation'}
  fp = ip.load_dataset(_config('imagenette', storage='stream', tfds_config='320px-v2'), 'train').fingerprint
  assert fp['tfds'] == 'imagenette/320px-v2/1.0.0' and fp['split'] == 'train'
  memory = ip.load_dataset(_config('imagenette'), 'test')
  assert memory.fingerprint == ip.load_dataset(_config('imagenette', storage='stream'), 'test').fingerprint


def test_cifar10_at_its_own_size_is_untouched(mock_tfds):
  """image_size 0 or 32 keeps the stored pixels; another size crops and resizes them."""
  raw = ip.load_images(_config('cifar10'), 'train')
  np.testing.assert_array_equal(ip.load_images(_config('cifar10', image_size=32), 'train'), raw)
  stream = ip.load_dataset(_config('cifar10', storage='stream'), 'train')
  stored = tfds_source.import_tfds().data_source('cifar10', split='train')
  np.testing.assert_array_equal(stream.get([3])[0][0], stored[3]['image'])


# -------------------------------------------------------------------------------------- Batches.
@pytest.mark.parametrize('storage', ['memory', 'stream'])
@pytest.mark.parametrize('name', ['cifar10', 'imagenette'])
def test_batches_split_over_processes_and_are_a_function_of_the_step(mock_tfds, storage, name):
  data = ip.load_dataset(_config(name, image_size=8, storage=storage), 'train', with_labels=True)
  for step in (0, 1, 5):
    full, full_labels = ip.local_batch(data, 3, step, 8)
    parts = [ip.local_batch(data, 3, step, 8, p, 4) for p in range(4)]
    assert all(images.shape == (2, 8, 8, 3) for images, _ in parts)
    np.testing.assert_array_equal(np.concatenate([images for images, _ in parts]), full)
    np.testing.assert_array_equal(np.concatenate([labels for _, labels in parts]), full_labels)
    again, _ = ip.local_batch(data, 3, step, 8)
    np.testing.assert_array_equal(again, full)
  assert not np.array_equal(ip.local_batch(data, 3, 0, 8)[0], ip.local_batch(data, 3, 1, 8)[0])
  with ip.BatchStream(data, 3, 8, 1, 2) as stream:
    for step in (0, 1, 2, 6, 7, 2):  # Consecutive steps come prefetched; jumps are read directly.
      images, labels = stream.get(step)
      expected_images, expected_labels = ip.local_batch(data, 3, step, 8, 1, 2)
      np.testing.assert_array_equal(images, expected_images)
      np.testing.assert_array_equal(labels, expected_labels)


def test_batch_stream_reports_read_errors():
  class Broken:
    num_examples, image_shape, num_classes, fingerprint = 10, (1, 1, 1), 1, {}

    def get(self, indices):
      raise OSError('disk gone')

  with ip.BatchStream(Broken(), 0, 2) as stream:
    with pytest.raises(OSError, match='disk gone'):
      stream.get(0)
    with pytest.raises(OSError, match='disk gone'):
      stream.get(1)  # The prefetched read failed too: its error surfaces here.
  with pytest.raises(ValueError, match='divisible'):
    ip.BatchStream(Broken(), 0, 3, 0, 2)


# ------------------------------------------------------------------------------------- Offline.
def _tree(root) -> list:
  return sorted(os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root) for n in dirs + files)


@pytest.fixture
def no_network(monkeypatch):
  """Every TCP connect fails at once (deterministic even on a machine with internet)."""
  probed = []

  def refuse(address, *args, **kwargs):
    probed.append(address)
    raise OSError('network is unreachable (test)')

  monkeypatch.setattr(socket, 'create_connection', refuse)
  return probed


@pytest.mark.parametrize('name,storage', [('cifar10', 'memory'), ('imagenette', 'stream')])
def test_offline_tfds_fails_fast_without_downloading(tmp_path, monkeypatch, no_network, name, storage):
  tfds = tfds_source.import_tfds()

  def must_not_run(self, *args, **kwargs):
    raise AssertionError('download_and_prepare was called')

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', must_not_run)
  (tmp_path / 'keep.txt').write_text('x')
  before = _tree(tmp_path)
  t0 = time.time()
  with pytest.raises(ip.DataUnavailableError) as e:
    ip.load_dataset(_config(name, data_dir=str(tmp_path), storage=storage), 'train')
  assert time.time() - t0 < 10
  msg = str(e.value)
  assert no_network and f'{name!r}' in msg and 'none of its download hosts' in msg
  assert 'tfds build' in msg and '--file_format=array_record' in msg and '--config.data.data_dir=DIR' in msg
  assert _tree(tmp_path) == before


def test_offline_mnist_auto_fails_fast_listing_every_attempt(tmp_path, monkeypatch, no_network):
  monkeypatch.setattr(mnist_family, 'STANDARD_LOCAL_ROOT', str(tmp_path / 'root'))
  t0 = time.time()
  with pytest.raises(ip.DataUnavailableError) as e:
    ip.load_images(_config('mnist', data_dir=str(tmp_path / 'tfds')), 'train')
  assert time.time() - t0 < 10
  msg = str(e.value)
  assert 'TFDS prepared data: none' in msg and 'local IDX' in msg and 'none of its download hosts' in msg
  assert not os.path.exists(tmp_path / 'tfds')


def test_failed_download_removes_what_it_created(tmp_path, monkeypatch):
  """The hosts answer, but the download dies half-way: the directories it made are removed, others kept."""
  tfds = tfds_source.import_tfds()

  class Connection:
    def close(self):
      pass

  monkeypatch.setattr(socket, 'create_connection', lambda *a, **k: Connection())

  def half_written(self, *args, **kwargs):
    os.makedirs(os.path.join(self.data_dir + '.incomplete', 'train'))
    os.makedirs(os.path.join(os.path.dirname(self.data_dir), '..', 'downloads', 'extracted', 'x'))
    raise OSError('connection reset (test)')

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', half_written)
  os.makedirs(tmp_path / 'other_dataset' / '1.0.0')
  before = _tree(tmp_path)
  with pytest.raises(ip.DataUnavailableError, match='connection reset'):
    ip.load_images(_config('cifar10', data_dir=str(tmp_path)), 'train')
  assert _tree(tmp_path) == before
  with pytest.raises(ip.DataUnavailableError, match='connection reset'):
    ip.load_images(_config('cifar10', data_dir=str(tmp_path / 'new' / 'dir')), 'train')
  assert _tree(tmp_path) == before


def test_imagenet64_is_never_downloaded(tmp_path, no_network):
  with pytest.raises(ip.DataUnavailableError, match='cannot be downloaded automatically.*tfds build imagenet_resized'):
    ip.load_dataset(_config('imagenet64', data_dir=str(tmp_path)), 'train')
  assert not no_network and _tree(tmp_path) == []


def test_local_source_is_for_idx_files_and_folders():
  with pytest.raises(ValueError, match="data.source = 'local'.*'cifar10'.*source=auto"):
    ip.load_images(_config('cifar10', source='local'), 'train')


def test_static_facts_read_no_data():
  assert set(ip.SUPPORTED) == {'mnist', 'fashion_mnist', 'cifar10', 'imagenette', 'imagenet64', 'image_folder'}
  assert catalog.image_shape(_config('mnist')) == (28, 28, 1)
  assert catalog.image_shape(_config('fashion_mnist', pad_to=32)) == (32, 32, 1)
  assert catalog.image_shape(_config('cifar10')) == (32, 32, 3)
  assert catalog.image_shape(_config('imagenet64', image_size=32)) == (32, 32, 3)
  assert [ip.num_classes(_config(n)) for n in ('mnist', 'fashion_mnist', 'cifar10', 'imagenette', 'imagenet64')] \
      == [10, 10, 10, 10, 1000]
