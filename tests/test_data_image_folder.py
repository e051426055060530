"""Tests for image folders (cm_jax.data.image_folder through cm_jax.input_pipeline): labels, class maps, both
storages, fingerprints and every error a user can run into."""

import json
import os

import ml_collections
import numpy as np
from PIL import Image
import pytest

from cm_jax import input_pipeline as ip
from cm_jax.data import catalog


def _save(path, pixels, mode=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(pixels, mode).save(path)


def make_tree(root) -> str:
  """cat: 2 images (one in a subfolder), dog: gray + RGBA PNGs, fish: 1 JPEG; plus files to ignore."""
  rng = np.random.default_rng(0)
  rgb = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  _save(os.path.join(root, 'cat', 'a.png'), rgb(20, 30))
  _save(os.path.join(root, 'cat', 'sub', 'b.jpg'), rgb(40, 40))
  _save(os.path.join(root, 'dog', 'gray.png'), np.full((10, 12), 77, np.uint8))
  rgba = np.concatenate([np.full((48, 64, 3), (10, 200, 30), np.uint8), np.full((48, 64, 1), 9, np.uint8)], -1)
  _save(os.path.join(root, 'dog', 'rgba.PNG'), rgba)
  _save(os.path.join(root, 'fish', 'e.jpeg'), rgb(17, 23))
  with open(os.path.join(root, 'cat', 'notes.txt'), 'w') as f:
    f.write('not an image')
  os.makedirs(os.path.join(root, '.cache'))
  return str(root)


def _config(root, **kw) -> ml_collections.ConfigDict:
  cfg = dict(name='image_folder', source='auto', manual_dir=root, data_dir=None, tfds_config=None, image_size=8,
             class_map=None, storage='memory', pad_to=0)
  cfg.update(kw)
  return ml_collections.ConfigDict(cfg)


@pytest.fixture
def tree(tmp_path):
  return make_tree(tmp_path / 'root')


def _write_map(tmp_path, mapping) -> str:
  path = tmp_path / 'map.json'
  path.write_text(mapping if isinstance(mapping, str) else json.dumps(mapping))
  return str(path)


# ------------------------------------------------------------------------------------- Reading.
def test_images_labels_and_shapes_in_sorted_folder_order(tree):
  cfg = _config(tree)
  images, labels = ip.load_labeled_images(cfg, 'train')
  assert images.shape == (5, 8, 8, 3) and images.dtype == np.uint8
  assert labels.dtype == np.int32 and labels.tolist() == [0, 0, 1, 1, 2]  # cat, cat, dog, dog, fish.
  assert (images[2] == 77).all()  # Grayscale -> RGB, a uniform image stays uniform.
  assert (images[3] == np.array([10, 200, 30], np.uint8)).all()  # RGBA -> RGB (alpha dropped).
  assert ip.num_classes(cfg) == 3 and catalog.image_shape(cfg) == (8, 8, 3)
  np.testing.assert_array_equal(ip.load_images(cfg, 'train'), images)
  assert catalog.image_shape(_config(tree, image_size=0)) == (64, 64, 3)
  assert ip.load_images(_config(tree, image_size=0), 'train').shape == (5, 64, 64, 3)


def test_class_map_merges_folders_and_leaves_others_out(tree, tmp_path):
  cfg = _config(tree, class_map=_write_map(tmp_path, {'cat': 1, 'dog': 1, 'fish': 0}))
  _, labels = ip.load_labeled_images(cfg, 'train')
  assert labels.tolist() == [1, 1, 1, 1, 0] and ip.num_classes(cfg) == 2
  only_fish = _config(tree, class_map=_write_map(tmp_path, {'fish': 0}))
  images, labels = ip.load_labeled_images(only_fish, 'train')
  assert len(images) == 1 and labels.tolist() == [0] and ip.num_classes(only_fish) == 1
  assert ip.load_dataset(only_fish, 'train', with_labels=True).num_classes == 1
  with pytest.raises(ValueError, match=r'leaves label\(s\) \[0, 1, 2\]'):  # Labels 0-2 would never be trained.
    ip.num_classes(_config(tree, class_map=_write_map(tmp_path, {'fish': 3})))


@pytest.mark.parametrize('with_labels', [False, True])
def test_memory_and_stream_give_the_same_batches(tree, with_labels):
  memory = ip.load_dataset(_config(tree), 'train', with_labels)
  stream = ip.load_dataset(_config(tree, storage='stream'), 'train', with_labels)
  assert isinstance(memory, ip.ArrayDataset) and not isinstance(stream, ip.ArrayDataset)
  for data in (memory, stream):
    assert (data.num_examples, data.image_shape, data.num_classes) == (5, (8, 8, 3), 3)
  with ip.BatchStream(stream, 1, 4, 1, 2) as batches:
    for step in (0, 1, 2, 7, 3):
      a, la = ip.local_batch(memory, 1, step, 4, 1, 2)
      b, lb = ip.local_batch(stream, 1, step, 4, 1, 2)
      c, lc = batches.get(step)
      assert a.shape == (2, 8, 8, 3)
      np.testing.assert_array_equal(a, b)
      np.testing.assert_array_equal(a, c)
      if with_labels:
        np.testing.assert_array_equal(la, lb)
        np.testing.assert_array_equal(la, lc)
      else:
        assert la is lb is lc is None


def test_fingerprints(tree):
  memory = ip.load_dataset(_config(tree), 'train')
  stream = ip.load_dataset(_config(tree, storage='stream'), 'train').fingerprint
  assert memory.fingerprint == stream  # The files, not the decoded pixels: either storage resumes the other.
  assert stream['num_examples'] == 5 and stream['shape'] == [8, 8, 3]
  json.dumps(stream)
  assert ip.load_dataset(_config(tree, storage='stream'), 'train').fingerprint == stream
  _save(os.path.join(tree, 'fish', 'f.png'), np.zeros((9, 9, 3), np.uint8))
  grown = ip.load_dataset(_config(tree, storage='stream'), 'train').fingerprint
  assert grown['num_examples'] == 6 and grown['files_sha256'] != stream['files_sha256']


# -------------------------------------------------------------------------------------- Errors.
def test_manual_dir_unset_missing_or_a_file(tmp_path):
  with pytest.raises(ip.DataUnavailableError, match='needs data.manual_dir.*--config.data.manual_dir'):
    ip.load_images(_config(None), 'train')
  with pytest.raises(ip.DataUnavailableError, match='nope does not exist'):
    ip.load_images(_config(str(tmp_path / 'nope')), 'train')
  (tmp_path / 'file').write_text('x')
  with pytest.raises(ip.DataUnavailableError, match='file is not a directory'):
    ip.num_classes(_config(str(tmp_path / 'file')))


def test_no_class_subdirectories(tmp_path):
  _save(str(tmp_path / 'loose.png'), np.zeros((4, 4, 3), np.uint8))
  with pytest.raises(ValueError, match=r'no class subdirectories \(its images lie directly in it\)'):
    ip.load_images(_config(str(tmp_path)), 'train')


def test_no_images_at_all(tmp_path):
  for name in ('a', 'b'):
    os.makedirs(tmp_path / name)
    (tmp_path / name / 'readme.txt').write_text('x')
  with pytest.raises(ValueError, match='No JPEG/PNG images'):
    ip.load_images(_config(str(tmp_path)), 'train')


def test_empty_class_folder_is_named(tree):
  os.makedirs(os.path.join(tree, 'empty_owl'))
  with pytest.raises(ValueError, match='empty_owl'):
    ip.load_dataset(_config(tree, storage='stream'), 'train')


@pytest.mark.parametrize('mapping,match', [
    ('{"cat": 0,', 'not valid JSON'),
    ('[1, 2]', r'not an object'),
    ({'cat': -1}, "'cat': -1"),
    ({'cat': True}, "'cat': True"),
    ({'cat': '0'}, "'cat': '0'"),
    ({}, 'empty'),
])
def test_bad_class_map(tree, tmp_path, mapping, match):
  path = _write_map(tmp_path, mapping)
  with pytest.raises(ValueError, match=match) as e:
    ip.load_images(_config(tree, class_map=path), 'train')
  assert path in str(e.value)


def test_class_map_naming_missing_folders_lists_them(tree, tmp_path):
  path = _write_map(tmp_path, {'cat': 0, 'zebra': 1, 'yak': 1})
  with pytest.raises(ValueError, match=r"\['yak', 'zebra'\]"):
    ip.num_classes(_config(tree, class_map=path))
  with pytest.raises(ip.DataUnavailableError, match='missing.json is not a file'):
    ip.num_classes(_config(tree, class_map=str(tmp_path / 'missing.json')))


@pytest.mark.parametrize('storage', ['memory', 'stream'])
def test_unreadable_image_is_named(tree, storage):
  with open(os.path.join(tree, 'dog', 'broken.jpg'), 'wb') as f:
    f.write(b'not a jpeg at all')
  # In memory every image is decoded at once; streamed, the header scan before step 0 finds it.
  match = r'broken\.jpg: not a readable image' if storage == 'memory' else r'1 of 6 image files are unreadable: .*broken\.jpg'
  with pytest.raises(ValueError, match=match):
    data = ip.load_dataset(_config(tree, storage=storage), 'train')
    data.get(np.arange(data.num_examples))


def test_streamed_folder_can_leave_unreadable_files_out(tree, caplog):
  with open(os.path.join(tree, 'dog', 'broken.jpg'), 'wb') as f:
    f.write(b'not a jpeg at all')
  data = ip.load_dataset(_config(tree, storage='stream', skip_unreadable=True), 'train', with_labels=True)
  assert data.num_examples == 5 and data.get(np.arange(5))[1].tolist() == [0, 0, 1, 1, 2]
  assert 'Leaving out the unreadable image' in caplog.text and 'broken.jpg' in caplog.text
  os.remove(os.path.join(tree, 'dog', 'broken.jpg'))
  intact = ip.load_dataset(_config(tree, storage='stream'), 'train')
  assert intact.fingerprint != data.fingerprint  # The listing records what was left out.
  np.testing.assert_array_equal(intact.get(np.arange(5))[0], data.get(np.arange(5))[0])


def test_a_truncated_image_with_a_good_header_is_still_named_when_drawn(tree):
  path = os.path.join(tree, 'fish', 'e.jpeg')
  with open(path, 'rb') as f:
    head = f.read()[:-300]  # The header reads; the pixels do not.
  with open(path, 'wb') as f:
    f.write(head)
  data = ip.load_dataset(_config(tree, storage='stream'), 'train')
  with pytest.raises(ValueError, match=r'e\.jpeg: not a readable image'):
    data.get(np.arange(data.num_examples))


def test_only_a_train_split(tree):
  for storage in ('memory', 'stream'):
    with pytest.raises(ValueError, match='evaluation.reference_split=train'):
      ip.load_dataset(_config(tree, storage=storage), 'test')


def test_tfds_source_is_refused(tree):
  with pytest.raises(ValueError, match='source=auto'):
    ip.load_images(_config(tree, source='tfds'), 'train')


def test_class_map_with_a_gap_in_its_labels_is_refused_naming_the_missing_label(tree, tmp_path):
  path = _write_map(tmp_path, {'cat': 0, 'dog': 2, 'fish': 2})
  with pytest.raises(ValueError, match=r'leaves label\(s\) \[1\] without a folder') as e:
    ip.num_classes(_config(tree, class_map=path))
  assert path in str(e.value)
  assert ip.num_classes(_config(tree, class_map=_write_map(tmp_path, {'cat': 0, 'dog': 1, 'fish': 1}))) == 2


def test_a_16_bit_grayscale_png_is_scaled_not_clipped_to_white(tmp_path):
  """PIL's own conversion of a 16-bit PNG clips every value above 255: a near-black image turned white."""
  root = tmp_path / 'wide'
  _save(str(root / 'only' / 'a.png'), np.full((8, 8), 40000, np.uint16))
  _save(str(root / 'only' / 'b.png'), np.full((8, 8), 1000, np.uint16))
  images = ip.load_images(_config(str(root)), 'train')
  assert images[:, 0, 0, 0].tolist() == [round(40000 * 255 / 65535), round(1000 * 255 / 65535)]  # 156, 4.


def test_reference_split_auto_is_train_for_an_image_folder_and_test_elsewhere():
  from cm_jax.configs import test as test_config  # pylint: disable=g-import-not-at-top
  from cm_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  assert config.evaluation.reference_split == 'auto' and evaluator.reference_split(config) == 'test'
  config.data.name = 'image_folder'
  assert evaluator.reference_split(config) == 'train'
  config.evaluation.reference_split = 'test'
  assert evaluator.reference_split(config) == 'test'  # Explicit: config validation refuses it for a folder.
