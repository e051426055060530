"""End-to-end training: mock TFDS data, the real offline Fashion-MNIST files, exact resume, failure modes."""

import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from cm_jax import checkpointing
from cm_jax import inference
from cm_jax import train
from cm_jax.core import losses
from cm_jax.runtime import multihost

from tiny_runs import tiny_config
from tiny_runs import tree_equal


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory):
  """20 steps in one go on the real Fashion-MNIST IDX files (the offline path), checkpoints every 10."""
  workdir = str(tmp_path_factory.mktemp('straight'))
  config = tiny_config(**{'training.num_steps': 20, 'training.checkpoint_every': 10, 'training.eval_every': 10,
                          'training.log_every': 5, 'data.name': 'fashion_mnist', 'data.source': 'local',
                          'data.random_flip': True})
  state = train.train_and_evaluate(config, workdir)
  return workdir, config, state


def test_mock_tfds_end_to_end_with_cm2023_recipe(tmp_path):
  """Mock TFDS mnist, trained with the CM (2023) recipe: adaptive N(k), target EMA mu(k), l2."""
  config = tiny_config(**{'data.name': 'mnist', 'data.source': 'tfds', 'loss.schedule': 'adaptive',
                          'loss.s0': 2, 'loss.s1': 150, 'loss.index_distribution': 'uniform',
                          'loss.distance': 'l2', 'loss.weighting': 'uniform', 'loss.target': 'ema',
                          'loss.mu_variant': 'official'})
  with tfds.testing.mock_data(num_examples=40):
    state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 4
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '4']
  assert os.path.exists(tmp_path / 'samples' / 'step_00000004.png')
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(tmp_path))
  assert len(state.ema_params) == 2
  # The target network is an EMA of the online one: mu(k) < 1, so it moved, but not all the way.
  assert state.target_params is not None and not tree_equal(state.target_params, state.params)


def test_offline_fashion_mnist_run_writes_everything(straight_run):
  workdir, config, state = straight_run
  assert int(state.step) == 20
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints'))) == [10, 20]
  assert sorted(os.listdir(os.path.join(workdir, 'samples'))) == ['step_00000010.png', 'step_00000020.png']
  for leaf in jax.tree.leaves(state.params):
    assert np.all(np.isfinite(np.asarray(leaf)))


def test_resume_is_bit_identical(straight_run, tmp_path, preempt_at):
  """20 steps straight == 10 steps, a kill, a restart, 10 more: same params, EMAs, optimizer state, samples."""
  straight_dir, config, straight_state = straight_run
  resumed_dir = str(tmp_path)
  preempt_at(10)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, resumed_dir)
  assert checkpointing.make_manager(resumed_dir, read_only=True).all_steps() == [10]
  resumed_state = train.train_and_evaluate(config, resumed_dir)  # Resumes from step 10.
  assert int(resumed_state.step) == 20
  assert tree_equal(straight_state.params, resumed_state.params), 'params differ after resume'
  assert tree_equal(straight_state.ema_params, resumed_state.ema_params), 'EMA params differ after resume'
  assert tree_equal(straight_state.opt_state, resumed_state.opt_state), 'optimizer state differs after resume'
  a = inference.load(straight_dir).sample(6, steps=2, seed=3)
  b = inference.load(resumed_dir).sample(6, steps=2, seed=3)
  np.testing.assert_array_equal(a, b)


def test_restart_of_finished_run_trains_nothing_and_raising_num_steps_continues(straight_run, tmp_path):
  workdir, config, straight_state = straight_run
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  state = train.train_and_evaluate(config, copy)  # Already at num_steps: restores, trains nothing.
  assert int(state.step) == 20 and tree_equal(state.params, straight_state.params)
  longer = config.copy_and_resolve_references()
  longer.training.num_steps = 22
  state = train.train_and_evaluate(longer, copy)
  assert int(state.step) == 22 and not tree_equal(state.params, straight_state.params)
  assert checkpointing.make_manager(copy, read_only=True).latest_step() == 22


def test_inference_sampling_is_deterministic_and_batch_independent(straight_run):
  workdir, config, state = straight_run
  model = inference.load(workdir)
  assert model.step == 20 and model.which_params == 'ema_0.9'
  assert tree_equal(model.params, state.ema_params[0])
  one = model.sample(5, steps=1, seed=0, batch_size=5)
  assert one.dtype == np.uint8 and one.shape == (5, 28, 28, 1)
  np.testing.assert_array_equal(one, model.sample(5, steps=1, seed=0, batch_size=5))
  # Different batch sizes give the same images up to float rounding in the convolutions.
  other = model.sample(5, steps=1, seed=0, batch_size=2)
  assert np.max(np.abs(one.astype(int) - other.astype(int))) <= 1
  assert not np.array_equal(one, model.sample(5, steps=1, seed=1, batch_size=5))
  online = inference.load(workdir, ema='online')
  assert tree_equal(online.params, state.params)
  with pytest.raises(ValueError, match='ema_rates'):
    inference.load(workdir, ema=0.5)
  with pytest.raises(FileNotFoundError, match='available steps'):
    inference.load(workdir, step=7)
  with pytest.raises(ValueError, match='descending'):
    model.sample(2, steps=3, ts=(0.5, 1.0))


def test_non_finite_loss_stops_run_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  original = losses.consistency_training_loss

  def poisoned(params, target_params, x0, step, rng, teacher_params=None, labels=None, **kwargs):
    loss, metrics = original(params, target_params, x0, step, rng, teacher_params, labels, **kwargs)
    poison = jax.numpy.where(step >= 3, jax.numpy.nan, 0.0)
    metrics = dict(metrics, loss=metrics['loss'] + poison)
    return loss + poison, metrics

  monkeypatch.setattr(losses, 'consistency_training_loss', poisoned)
  config = tiny_config(**{'data.source': 'local', 'training.num_steps': 6})
  with pytest.raises(FloatingPointError, match=r'Non-finite loss .* update from step 3 to step 4 .*'
                     r'resumes from the last good checkpoint, step 2:'):
    train.train_and_evaluate(config, str(tmp_path))
  manager = checkpointing.make_manager(str(tmp_path), read_only=True)
  assert manager.all_steps() == [2]
  model = inference.load(str(tmp_path))
  for leaf in jax.tree.leaves(model.params):
    assert np.all(np.isfinite(np.asarray(leaf)))


def test_a_signal_during_the_last_step_ends_the_run_complete_and_says_so(tmp_path, monkeypatch, caplog):
  """SIGINT after the last step's stop check (while its samples are written): nothing is left to stop, so the
  run ends with all its steps and its final checkpoint, and says it was stopped after the last step."""
  reached = multihost.StopSignal.reached
  calls = []

  def signal_after_the_last_check(self):
    answer = reached(self)
    calls.append(answer)
    if len(calls) == 4:  # The last of the 4 steps: the signal lands just after this check.
      self.signal_name = 'SIGINT'
    return answer

  monkeypatch.setattr(multihost.StopSignal, 'reached', signal_after_the_last_check)
  config = tiny_config(**{'data.source': 'local', 'training.num_steps': 4})
  with caplog.at_level(logging.WARNING):
    state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 4 and calls == [False] * 4
  assert checkpointing.make_manager(str(tmp_path), read_only=True).all_steps() == [2, 4]
  assert 'Stopped by SIGINT after step 4, the last one: training is complete' in caplog.text, caplog.text


def test_bad_config_errors_name_the_field(tmp_path):
  with pytest.raises(ValueError, match='config.training.batch_size = 7 does not divide by the 2 devices'):
    train.train_and_evaluate(tiny_config(**{'training.batch_size': 7, 'data.source': 'local'}), str(tmp_path))
  with pytest.raises(ValueError, match=r'config\.loss\.distance'):
    train.train_and_evaluate(tiny_config(**{'loss.distance': 'lpips'}), str(tmp_path))
  with pytest.raises(ValueError, match=r'config\.model\.ch_mult'):
    train.train_and_evaluate(tiny_config(**{'model.ch_mult': (1, 2, 2, 2)}), str(tmp_path))
  with pytest.raises(ValueError, match=r'config\.data\.name'):
    train.train_and_evaluate(tiny_config(**{'data.name': 'imagenet'}), str(tmp_path))
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_sample_cli_writes_uint8_npz_and_png(straight_run, tmp_path):
  workdir, _, _ = straight_run
  out = tmp_path / 'samples.npz'
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or '')
  cmd = [sys.executable, '-m', 'cm_jax.sample', f'--workdir={workdir}', '--num=7', '--steps=2', '--seed=5',
         f'--out={out}', '--batch_size=4']
  result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  arr = np.load(out)['arr_0']
  assert arr.dtype == np.uint8 and arr.shape == (7, 28, 28, 1)
  assert (tmp_path / 'samples.png').exists()
  # The CLI and the notebook API agree for the same seed and checkpoint.
  api = inference.load(workdir).sample(7, steps=2, seed=5, batch_size=4)
  np.testing.assert_array_equal(arr, api)
  bad = subprocess.run(cmd[:-1] + ['--ts=1.0,2.0', '--steps=3'], capture_output=True, text=True, env=env,
                       timeout=600)
  assert bad.returncode != 0 and 'strictly descending' in bad.stderr


def test_resuming_with_a_different_model_fails_clearly(straight_run):
  workdir, config, _ = straight_run
  changed = config.copy_and_resolve_references()
  changed.model.ch = 16
  with pytest.raises(ValueError, match=r'model\.ch: checkpoint 8, now 16'):
    train.train_and_evaluate(changed, workdir)


def test_resuming_on_a_differently_ordered_dataset_fails_clearly(straight_run, monkeypatch):
  """E.g. a run started on the IDX files, resumed where TFDS-prepared (shuffled) data is found first."""
  workdir, config, _ = straight_run
  load = train.input_pipeline.load_images
  monkeypatch.setattr(train.input_pipeline, 'load_images', lambda *a: load(*a)[::-1])
  with pytest.raises(ValueError, match='different training array'):
    train.train_and_evaluate(config, workdir)


def test_unreadable_latest_checkpoint_falls_back_to_the_previous_one(straight_run, tmp_path):
  """Step 20's arrays are destroyed: the run resumes from step 10 and reaches the same parameters."""
  workdir, config, straight_state = straight_run
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  for path in (copy / 'checkpoints' / '20' / 'state').rglob('*'):
    if path.is_file() and 'metadata' not in path.name:
      path.write_bytes(b'corrupt')
  state = train.train_and_evaluate(config, str(copy))
  assert int(state.step) == 20
  assert tree_equal(straight_state.params, state.params)
