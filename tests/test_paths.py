"""Workdirs and outputs on remote paths (gs://): path helpers, and writes on an in-memory stand-in for GCS."""

import importlib
import io
import os

from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath
from fsspec.implementations import memory
import numpy as np
from PIL import Image
import pytest

from cm_jax import checkpointing
from cm_jax import edit
from cm_jax import inference
from cm_jax import teacher
from cm_jax.runtime import images
from cm_jax.runtime import paths

try:
  from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=g-import-not-at-top
except ImportError:  # An Orbax that does not query GCS buckets.
  gcs_utils = None

_FSSPEC_REGISTRY = importlib.import_module('fsspec.registry')  # `fsspec.registry` is a read-only view.


def test_uris_are_remote_and_kept_as_they_are():
  assert paths.is_remote('gs://bucket/run') and paths.is_remote('s3://b/r')
  assert not paths.is_remote('/tmp/run') and not paths.is_remote('run') and not paths.is_remote('a/gs://b')
  assert paths.absolute('gs://bucket/run') == 'gs://bucket/run'
  assert checkpointing.checkpoint_dir('gs://bucket/run') == 'gs://bucket/run/checkpoints'
  assert checkpointing.checkpoint_dir('gs://bucket/run/') == 'gs://bucket/run/checkpoints'


def test_local_relative_paths_become_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.absolute('run') == str(tmp_path / 'run')
  assert checkpointing.checkpoint_dir('run') == str(tmp_path / 'run' / 'checkpoints')
  assert checkpointing.checkpoint_dir('./run/') == str(tmp_path / 'run' / 'checkpoints')


def test_teacher_fingerprint_keeps_a_remote_workdir(tmp_path, monkeypatch):
  model = inference.LoadedModel(config=None, params={'w': np.arange(3.0)}, step=5, which_params='online')
  assert teacher.fingerprint(model, 'gs://bucket/teacher')['workdir'] == 'gs://bucket/teacher'
  monkeypatch.chdir(tmp_path)
  assert teacher.fingerprint(model, 'teacher')['workdir'] == str(tmp_path / 'teacher')


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """gs:// served by an in-memory fsspec filesystem through epath (no network, no TensorFlow gfile); the test
  runs in an empty directory, so that a gs:// path mistaken for a local one shows up there."""

  class FakeGcs(memory.MemoryFileSystem):
    protocol = ('gs', 'gcs')
    store = {}
    pseudo_dirs = ['']

    @classmethod
    def _strip_protocol(cls, path):
      path = str(path)
      for prefix in ('gs://', 'gcs://'):
        path = path[len(prefix):] if path.startswith(prefix) else path
      return memory.MemoryFileSystem._strip_protocol(path)

  # epath serves gs:// through TensorFlow's gfile when TensorFlow is installed, else through fsspec.
  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)
  for name in ('gs', 'gcs'):
    monkeypatch.setitem(_FSSPEC_REGISTRY._registry, name, FakeGcs)  # pylint: disable=protected-access
  cached = type(epath_backend.fsspec_backend)._get_filesystem  # pylint: disable=protected-access
  cached.cache_clear()
  local = tmp_path / 'cwd'
  local.mkdir()
  monkeypatch.chdir(local)
  yield FakeGcs
  cached.cache_clear()
  assert not os.listdir(local), 'a gs:// path was written as a local one'


def test_fake_gcs_is_not_the_local_disk(fake_gcs):
  epath.Path('gs://bucket/x/y.txt').parent.mkdir(parents=True, exist_ok=True)
  epath.Path('gs://bucket/x/y.txt').write_text('hi')
  assert list(fake_gcs.store) == ['/bucket/x/y.txt']


def test_atomic_write_to_gcs(fake_gcs):
  path = 'gs://bucket/cache/features.npz'
  assert paths.write_file(path, lambda f: np.savez(f, x=np.arange(4))) == path
  with np.load(io.BytesIO(epath.Path(path).read_bytes())) as data:
    np.testing.assert_array_equal(data['x'], np.arange(4))

  def fail(f):
    f.write(b'half')
    raise OSError('disk full')

  with pytest.raises(OSError, match='disk full'):
    paths.write_file('gs://bucket/cache/other.npz', fail)
  assert not epath.Path('gs://bucket/cache/other.npz').exists()


def test_png_and_edit_outputs_to_gcs(fake_gcs):
  image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
  assert images.save_png(image, 'gs://bucket/run/samples/a.png') == 'gs://bucket/run/samples/a.png'
  with Image.open(io.BytesIO(epath.Path('gs://bucket/run/samples/a.png').read_bytes())) as img:
    np.testing.assert_array_equal(np.asarray(img), image)
  arrays = {k: np.full((2, 8, 8, 1), i, np.uint8) for i, k in enumerate(('original', 'degraded', 'result'))}
  npz, png = edit.write(arrays, 'gs://bucket/edits', 'inpaint')
  assert (npz, png) == ('gs://bucket/edits/inpaint.npz', 'gs://bucket/edits/inpaint.png')
  with np.load(io.BytesIO(epath.Path(npz).read_bytes())) as data:
    np.testing.assert_array_equal(data['result'], arrays['result'])
  assert epath.Path(png).read_bytes().startswith(b'\x89PNG')


@pytest.mark.parametrize('where', ['gcs', 'local'])
def test_unreadable_checkpoint_is_moved_aside(where, fake_gcs, tmp_path):
  workdir = 'gs://bucket/run' if where == 'gcs' else str(tmp_path / 'run')
  step_dir = epath.Path(checkpointing.checkpoint_dir(workdir)) / '20'
  (step_dir / 'state').mkdir(parents=True)
  (step_dir / 'state' / 'data').write_bytes(b'corrupt')
  (epath.Path(checkpointing.checkpoint_dir(workdir)) / '10').mkdir()
  aside = checkpointing.move_aside(workdir, [20])
  assert aside == os.path.join(workdir, 'unreadable_checkpoints')
  assert not step_dir.exists()
  assert [p.name for p in epath.Path(checkpointing.checkpoint_dir(workdir)).iterdir()] == ['10']
  (moved,) = epath.Path(aside).iterdir()
  assert moved.name.startswith('20-') and (moved / 'state' / 'data').read_bytes() == b'corrupt'


def test_inference_load_lists_a_gcs_workdir_through_orbax(fake_gcs, monkeypatch):
  """An empty gs:// workdir: Orbax lists gs://bucket/run/checkpoints itself (not /cwd/gs:/bucket/...)."""
  # Stand-ins for the GCS client that Orbax asks whether a bucket has hierarchical namespaces.
  monkeypatch.setattr(checkpointing, 'require_gcs_client', lambda workdir: None)
  if gcs_utils is not None:
    monkeypatch.setattr(gcs_utils, 'is_hierarchical_namespace_enabled', lambda path: False, raising=False)
  epath.Path('gs://bucket/run/checkpoints').mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match='No checkpoint in gs://bucket/run/checkpoints;'):
    inference.load('gs://bucket/run')


def test_gcs_workdir_without_its_client_names_the_extra():
  try:
    importlib.import_module('google.cloud.storage')
  except ImportError:
    with pytest.raises(ImportError, match=r"gs://bucket/run is on GCS.*pip install 'cm_jax\[gcs\]'"):
      checkpointing.make_manager('gs://bucket/run', read_only=True)
  else:
    pytest.skip('google-cloud-storage is installed here.')
  checkpointing.require_gcs_client('/tmp/run')  # Local workdirs do not need it.


def test_evaluation_caches_on_gcs_are_read_back(fake_gcs, monkeypatch):
  """evaluation.cache_dir = gs://...: the feature classifier and the reference features are written there
  and found again, with no retraining and no recomputation."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from cm_jax.evaluation import classifier  # pylint: disable=g-import-not-at-top
  from cm_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  from cm_jax.configs import test as test_config  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  config.data.name, config.data.source = 'mnist', 'tfds'
  config.evaluation.cache_dir, config.evaluation.num_reference = 'gs://bucket/cache', 30
  calls = []

  def features(images):
    calls.append(len(images))
    x = images.reshape(len(images), -1)[:, :16].astype(np.float64)
    return x, np.full((len(images), 4), 0.25)
  net = evaluator.FeatureNet('classifier', features, 'first-pixels', {'name': 'first pixels'})
  with tfds.testing.mock_data(num_examples=40):
    first = classifier.load_or_train(config)
    monkeypatch.setattr(classifier, 'train_classifier', lambda *a, **k: pytest.fail('retrained a cached one'))
    again = classifier.load_or_train(config)
    evaluator.load_reference(config, net)
    evaluator.load_reference(config, net)
  assert again.info == first.info
  assert calls == [30]  # The second reference load read gs://bucket/cache.
  assert any(k.startswith('/bucket/cache/classifier/') for k in fake_gcs.store)
  assert any(k.startswith('/bucket/cache/reference/') for k in fake_gcs.store)
