"""Files cm_jax reads (checkpoints, npz images, evaluation caches, configs saved in checkpoints) stay inert:
nothing is unpickled, and no path read from a checkpoint leads a write outside the places the user named."""

import os
import pickle
import re

import numpy as np
import pytest

import checkpoint_utils

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_DIRS = ('cm_jax', 'benchmarks', 'examples')
# Code that would unpickle (or run) what a file holds.
FORBIDDEN = {
    'a pickle module': re.compile(r'^\s*(import|from)\s+(pickle|cPickle|_pickle|dill|cloudpickle|joblib)\b', re.M),
    'allow_pickle=True': re.compile(r'allow_pickle\s*=\s*True'),
    'torch.load': re.compile(r'torch\.load\('),
    'yaml.load': re.compile(r'yaml\.(unsafe_)?load\('),
    'np.load without allow_pickle=False': re.compile(r'np\.load\((?![^\n]*allow_pickle=False)'),
    'jnp.load / pd.read_pickle': re.compile(r'(jnp\.load|read_pickle)\('),
}


def _sources():
  for d in SOURCE_DIRS:
    for folder, _, files in os.walk(os.path.join(REPO_ROOT, d)):
      for name in files:
        if name.endswith('.py'):
          yield os.path.join(folder, name)


def test_no_code_path_unpickles():
  found = []
  for path in _sources():
    with open(path) as f:
      text = f.read()
    for what, pattern in FORBIDDEN.items():
      for m in pattern.finditer(text):
        found.append(f'{os.path.relpath(path, REPO_ROOT)}:{text[:m.start()].count(chr(10)) + 1}: {what}')
  assert not found, found


def test_the_scan_catches_what_it_looks_for():
  """The patterns above match the forms they are meant to forbid (a scan that cannot fail proves nothing)."""
  samples = {'a pickle module': 'import pickle\n', 'allow_pickle=True': 'np.load(f, allow_pickle=True)',
             'torch.load': 'torch.load(path)', 'yaml.load': 'yaml.load(text)',
             'np.load without allow_pickle=False': 'with np.load(path) as f:',
             'jnp.load / pd.read_pickle': 'pd.read_pickle(p)'}
  for what, text in samples.items():
    assert FORBIDDEN[what].search(text), what
  assert not FORBIDDEN['np.load without allow_pickle=False'].search('np.load(path, allow_pickle=False)')


@pytest.fixture
def no_unpickling(monkeypatch):
  """Any unpickling in the code under test fails loudly."""
  def refuse(*args, **kwargs):
    raise AssertionError('something was unpickled')
  monkeypatch.setattr(pickle, 'load', refuse)
  monkeypatch.setattr(pickle, 'loads', refuse)
  monkeypatch.setattr(pickle, 'Unpickler', refuse)


def test_object_arrays_in_files_are_refused_not_loaded(tmp_path, no_unpickling):
  from cm_jax import edit
  from cm_jax.runtime import errors
  from cm_jax.evaluation import metrics
  path = str(tmp_path / 'objects.npz')
  np.savez(path, np.array([{'a': 1}], dtype=object))
  with pytest.raises(errors.InputFileError, match='objects.npz'):
    edit.load_images(path)
  stats = str(tmp_path / 'stats.npz')
  np.savez(stats, mu=np.array([object()], dtype=object), sigma=np.zeros((1, 1)), num=np.int64(1))
  with pytest.raises(ValueError):
    metrics.FeatureStats.load(stats)


# --------------------------------------------------------------------------------------------------
# Paths recorded in a checkpoint: never followed out of it, never used to choose where to write.
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  """A tiny trained workdir with checkpoints at steps 2 and 4."""
  from cm_jax import train
  from cm_jax.configs import test as test_config
  config = test_config.get_config()
  config.training.eval_every = 100
  workdir = str(tmp_path_factory.mktemp('untrusted') / 'run')
  train.train_and_evaluate(config, workdir)
  return workdir


def test_a_checkpoint_holding_a_symbolic_link_is_not_loaded(tiny_run, tmp_path, no_unpickling):
  import shutil
  from cm_jax import inference
  workdir = str(tmp_path / 'run')
  shutil.copytree(tiny_run, workdir)
  outside = tmp_path / 'outside.bin'
  outside.write_bytes(b'secret')
  os.symlink(outside, os.path.join(workdir, 'checkpoints', '4', 'state', 'link'))
  model = inference.load(workdir)  # Falls back to step 2, leaving step 4 as it is.
  assert model.step == 2
  assert os.path.islink(os.path.join(workdir, 'checkpoints', '4', 'state', 'link'))
  from cm_jax import checkpointing
  with pytest.raises(checkpointing.UnreadableCheckpointError, match='symbolic link'):
    inference.load(workdir, step=4)


def test_the_evaluation_cache_recorded_in_a_checkpoint_is_not_used(tiny_run, tmp_path):
  import shutil
  from cm_jax.evaluation import classifier
  from cm_jax import inference
  workdir = str(tmp_path / 'run')
  shutil.copytree(tiny_run, workdir)
  checkpoint_utils.rewrite_saved_config(
      workdir, lambda saved: saved['evaluation'].update(cache_dir=str(tmp_path / 'elsewhere')))
  model = inference.load(workdir)
  assert model.config.evaluation.cache_dir is None
  assert not classifier.cache_dir(model.config).startswith(str(tmp_path / 'elsewhere'))
