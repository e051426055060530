"""Image folders at scale: decoding in worker processes (data.decode_workers), JPEG draft decoding
(data.jpeg_draft), and folders decoded once into a memory map (python -m cm_jax.prepare, data.storage =
'prepared'): the same rows as streaming, resumable and shareable preparation, and every damage named."""

import json
import os
import signal
import subprocess
import sys

import ml_collections
import numpy as np
from PIL import Image
import pytest

from cm_jax import config_validation
from cm_jax import input_pipeline as ip
from cm_jax.configs import test as test_config
from cm_jax.data import decode_pool
from cm_jax.data import image_folder
from cm_jax.data import prepared
from cm_jax.runtime import errors

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 8


def make_folder(root, per_class=7) -> str:
  """Two classes of small JPEGs and PNGs of assorted sizes (15 files)."""
  rng = np.random.default_rng(1)
  for c, name in enumerate(('ant', 'bee')):
    os.makedirs(os.path.join(root, name))
    for i in range(per_class + c):
      pixels = rng.integers(0, 256, (12 + i, 20 - i, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(os.path.join(root, name, f'{i:02d}.{"jpg" if i % 2 else "png"}'))
  return str(root)


@pytest.fixture
def folder(tmp_path):
  return make_folder(tmp_path / 'root')


def _config(root, **kw) -> ml_collections.ConfigDict:
  cfg = dict(name='image_folder', source='auto', manual_dir=root, data_dir=None, tfds_config=None, image_size=SIZE,
             class_map=None, storage='memory', pad_to=0, prepared_dir=None, decode_workers=0, jpeg_draft=False)
  cfg.update(kw)
  return ml_collections.ConfigDict(cfg)


def _listing(root):
  return image_folder.list_folder(root, None)


# ------------------------------------------------------------------------------ Decode processes.
def test_worker_processes_give_the_rows_threads_give_in_the_order_asked(folder):
  threads = ip.load_dataset(_config(folder, storage='stream'), 'train', with_labels=True)
  workers = ip.load_dataset(_config(folder, storage='stream', decode_workers=3), 'train', with_labels=True)
  try:
    for rows in ([0], [14, 2, 2, 9, 0, 5, 11], list(range(15))[::-1], [4, 1]):  # [4, 1]: fewer rows than workers.
      a, la = threads.get(rows)
      b, lb = workers.get(rows)
      np.testing.assert_array_equal(a, b)
      np.testing.assert_array_equal(la, lb)
    assert threads.fingerprint == workers.fingerprint  # The same rows, so the same data record.
    memory = ip.load_dataset(_config(folder, decode_workers=2), 'train', with_labels=True)
    np.testing.assert_array_equal(memory.get(np.arange(15))[0], threads.get(np.arange(15))[0])
  finally:
    threads.close()
    workers.close()


def test_an_unreadable_file_is_named_and_the_workers_go_on(folder):
  bad = os.path.join(folder, 'bee', '03.jpg')
  listing = _listing(folder)
  with open(bad, 'r+b') as f:  # A good header, a truncated body: only decoding finds it.
    f.truncate(40)
  pool = decode_pool.DecodePool(2, SIZE)
  try:
    paths = [listing.path(i) for i in range(len(listing.files))]
    with pytest.raises(ValueError, match='03.jpg: not a readable image'):
      pool.decode(paths)
    assert bad in paths
    good = [p for p in paths if p != bad]
    assert len(pool.decode(good)) == len(good)  # Every worker answered: the pool still works.
  finally:
    pool.close()


def test_a_killed_worker_stops_the_read_with_one_line(folder):
  listing = _listing(folder)
  pool = decode_pool.DecodePool(2, SIZE)
  try:
    pool.decode([listing.path(0)])
    victim = pool._workers[1]  # pylint: disable=protected-access
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    with pytest.raises(decode_pool.DecodeWorkerError, match=r'was killed by signal 9.*data.decode_workers'):
      pool.decode([listing.path(i) for i in range(6)])
    assert isinstance(decode_pool.DecodeWorkerError('x'), errors.UserError)
  finally:
    pool.close()


def test_workers_ignore_sigterm_and_end_when_closed(folder):
  pool = decode_pool.DecodePool(2, SIZE)
  workers = list(pool._workers)  # pylint: disable=protected-access
  pool.decode([os.path.join(folder, 'ant', '00.png')])
  for w in workers:  # A preemption notice reaches the whole process group: the trainer handles it, not them.
    os.kill(w.pid, signal.SIGTERM)
  assert len(pool.decode([os.path.join(folder, 'ant', '00.png')] * 3)) == 3
  pool.close()
  assert all(w.returncode == 0 for w in workers)
  with pytest.raises(RuntimeError, match='after close'):
    pool.decode(['x'])


def test_worker_count():
  assert image_folder.worker_count(0) == 0 and image_folder.worker_count(3) == 3
  assert image_folder.worker_count(-1) == image_folder.usable_cores() == len(os.sched_getaffinity(0))
  with pytest.raises(ValueError, match='data.decode_workers'):
    image_folder.worker_count(-2)
  config = test_config.get_config()
  config.data.decode_workers = -5
  with pytest.raises(errors.ConfigError, match='config.data.decode_workers'):
    config_validation.validate(config)


# ------------------------------------------------------------------------------------ JPEG draft.
def test_jpeg_draft_decodes_large_jpegs_smaller_and_is_recorded_in_the_fingerprint(tmp_path):
  rng = np.random.default_rng(0)
  os.makedirs(tmp_path / 'a')
  pixels = np.asarray(Image.fromarray(rng.integers(0, 256, (30, 40, 3), np.uint8)).resize((400, 300)))
  Image.fromarray(pixels).save(tmp_path / 'a' / 'big.jpg', quality=95)
  Image.fromarray(pixels).save(tmp_path / 'a' / 'big.png')
  jpg, png = str(tmp_path / 'a' / 'big.jpg'), str(tmp_path / 'a' / 'big.png')
  full, draft = image_folder.decode(jpg, 16), image_folder.decode(jpg, 16, draft=True)
  assert full.shape == draft.shape == (16, 16, 3)
  assert 0 < np.abs(full.astype(int) - draft.astype(int)).max() < 64  # Close, but not the same pixels.
  np.testing.assert_array_equal(image_folder.decode(png, 16), image_folder.decode(png, 16, draft=True))  # PNG: none.
  with Image.open(jpg) as image:  # What draft mode does: the decoder itself scales 300 -> 75 (1/4) for a 16 side.
    image.draft('RGB', (100, 75))
    assert image.size == (100, 75)
  plain = ip.load_dataset(_config(str(tmp_path), storage='stream', image_size=16), 'train')
  drafted = ip.load_dataset(_config(str(tmp_path), storage='stream', image_size=16, jpeg_draft=True), 'train')
  assert 'decode' not in plain.fingerprint and drafted.fingerprint['decode'] == 'jpeg_draft'
  np.testing.assert_array_equal(drafted.get([0])[0][0], draft)


# ------------------------------------------------------------------------------------- Prepared.
def test_prepared_rows_equal_streamed_rows_and_parts_share_the_work(folder, tmp_path):
  out = str(tmp_path / 'prep')
  listing = _listing(folder)
  first = prepared.prepare(listing, SIZE, out, workers=2, part=(1, 2), chunk=4)  # Chunks 1 and 3: 4 + 3 rows.
  assert (first.chunks, first.chunks_done, first.decoded_here, first.complete) == (4, 2, 7, False)
  with pytest.raises(prepared.PreparedDataError, match=r'unfinished \(2 of 4 chunks\).*cm_jax.prepare'):
    ip.load_dataset(_config(None, storage='prepared', prepared_dir=out), 'train')
  second = prepared.prepare(listing, SIZE, out, workers=0, part=(0, 2), chunk=4)  # Chunks 0 and 2: 4 + 4 rows.
  assert (second.chunks_done, second.decoded_here, second.complete) == (4, 8, True)
  again = prepared.prepare(listing, SIZE, out, chunk=4)  # Done: nothing decoded again.
  assert again.decoded_here == 0 and again.complete
  config = _config(None, storage='prepared', prepared_dir=out)
  data = ip.load_dataset(config, 'train', with_labels=True)
  stream = ip.load_dataset(_config(folder, storage='stream'), 'train', with_labels=True)
  assert (data.num_examples, data.image_shape, data.num_classes) == (15, (SIZE, SIZE, 3), 2)
  assert data.fingerprint == stream.fingerprint  # A run may switch storage and resume.
  assert ip.num_classes(config) == 2
  for step in (0, 3, 11):
    a, la = ip.local_batch(data, 5, step, 6, 1, 2)
    b, lb = ip.local_batch(stream, 5, step, 6, 1, 2)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
  images, labels = ip.load_labeled_images(config, 'train')  # Whole-split readers (evaluation) too.
  np.testing.assert_array_equal(images, stream.get(np.arange(15))[0])
  assert labels.tolist() == [0] * 7 + [1] * 8


def test_an_interrupted_preparation_redoes_only_the_unrecorded_chunk(folder, tmp_path):
  out = str(tmp_path / 'prep')
  listing = _listing(folder)
  prepared.prepare(listing, SIZE, out, chunk=4)
  os.remove(os.path.join(out, 'chunks', '000002'))  # As if killed after writing the rows, before the record.
  os.remove(os.path.join(out, 'COMPLETE'))
  with open(os.path.join(out, 'images.u8'), 'r+b') as f:  # ... and with those rows half written.
    f.seek(8 * SIZE * SIZE * 3)
    f.write(b'\0' * 100)
  result = prepared.prepare(listing, SIZE, out, chunk=4)
  assert (result.decoded_here, result.complete) == (4, True)
  data = prepared.PreparedDataset(out, SIZE, with_labels=False)  # Verified against every chunk's SHA-256.
  np.testing.assert_array_equal(data.get(np.arange(15))[0], image_folder.load_arrays(listing, SIZE, False)[0])


def test_a_damaged_prepared_array_is_named_when_opened(folder, tmp_path):
  out = str(tmp_path / 'prep')
  prepared.prepare(_listing(folder), SIZE, out, chunk=4)
  with open(os.path.join(out, 'images.u8'), 'r+b') as f:
    f.seek(13 * SIZE * SIZE * 3 + 5)  # Row 13: chunk 3.
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 1]))
  with pytest.raises(prepared.PreparedDataError, match=r'images.u8: chunk\(s\) \[3\] of 4 do not match'):
    ip.load_dataset(_config(None, storage='prepared', prepared_dir=out), 'train')
  with open(os.path.join(out, 'images.u8'), 'r+b') as f:
    f.truncate(100)
  with pytest.raises(prepared.PreparedDataError, match='images.u8: 100 bytes, expected'):
    ip.load_dataset(_config(None, storage='prepared', prepared_dir=out), 'train')


def test_other_data_in_out_a_size_mismatch_and_a_missing_directory_are_refused(folder, tmp_path):
  out = str(tmp_path / 'prep')
  prepared.prepare(_listing(folder), SIZE, out, chunk=4)
  with pytest.raises(prepared.PreparedDataError, match=r'holds a preparation of other data \(.*image_shape'):
    prepared.prepare(_listing(folder), 2 * SIZE, out, chunk=4)
  Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(os.path.join(folder, 'ant', 'new.png'))
  with pytest.raises(prepared.PreparedDataError, match='fingerprint'):
    prepared.prepare(_listing(folder), SIZE, out, chunk=4)
  with pytest.raises(errors.ConfigError, match=r'config.data.image_size: 16 does not match .* \(8x8\)'):
    ip.load_dataset(_config(None, storage='prepared', prepared_dir=out, image_size=16), 'train')
  with pytest.raises(prepared.PreparedDataError, match='is not a directory; make it with'):
    ip.load_dataset(_config(None, storage='prepared', prepared_dir=str(tmp_path / 'none')), 'train')
  with pytest.raises(errors.UsageError, match='--part=2/2'):
    prepared.prepare(_listing(folder), SIZE, str(tmp_path / 'p2'), part=(2, 2))


def test_prepared_storage_config_checks():
  config = test_config.get_config()
  config.data.name, config.data.image_size, config.data.storage = 'image_folder', 16, 'prepared'
  with pytest.raises(errors.ConfigError, match='config.data.prepared_dir'):
    config_validation.validate(config)
  config.data.prepared_dir = '/somewhere'  # manual_dir is not needed then.
  config_validation.validate(config)
  config = test_config.get_config()
  config.data.storage = 'prepared'
  with pytest.raises(errors.ConfigError, match="config.data.storage: 'prepared' is for image folders"):
    config_validation.validate(config)


def test_prepare_cli(folder, tmp_path):
  out = tmp_path / 'prep'
  base = [sys.executable, '-m', 'cm_jax.prepare', '--config=cm_jax/configs/test.py',
          '--config.data.name=image_folder', f'--config.data.manual_dir={folder}', '--config.data.image_size=16']
  result = subprocess.run(base + [f'--out={out}', '--workers=2'], cwd=REPO_ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
  record = json.loads(result.stdout.strip().splitlines()[-1])
  assert record['complete'] and record['num_examples'] == 15 and record['decoded_here'] == 15
  assert f'--config.data.storage=prepared --config.data.prepared_dir={out}' in result.stderr
  data = prepared.PreparedDataset(str(out), 16, with_labels=True)
  np.testing.assert_array_equal(data.get(np.arange(15))[0],
                                image_folder.load_arrays(_listing(folder), 16, False)[0])
  bad = subprocess.run(base + [f'--out={tmp_path / "q"}', '--part=3'], cwd=REPO_ROOT, capture_output=True,
                       text=True)
  assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == (
      'cm_jax.prepare: error: --part=3: give I/N, e.g. 0/1 (everything) or 1/4 (the second of four).')


def test_an_existing_directory_that_is_not_a_preparation_is_left_alone(folder, tmp_path):
  out = tmp_path / 'home'
  out.mkdir()
  (out / 'thesis.tex').write_text('precious')
  with pytest.raises(errors.UsageError, match='is not a cm_jax prepared folder'):
    prepared.prepare(_listing(folder), SIZE, str(out), chunk=4)
  assert sorted(os.listdir(out)) == ['thesis.tex']
