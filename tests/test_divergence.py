"""Divergence guard: a run that blows up stops before it saves the blown-up state, and its advice works.

The issue this guards against: at optim.lr = 1e6 the weights reach 1.2e14 while the loss still reads finite,
the step-2 checkpoint kept them, and the advised restart (a lower lr, same workdir) resumed from it into a NaN
loss at once. Now every update's max |w| over parameters, target and EMAs (metrics['param_max_abs']) is checked
against training.max_param_abs before the state it produced can be saved, and a resumed checkpoint must pass
the same bound.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax import checkpointing
from cm_jax import config_validation
from cm_jax import train
from cm_jax import train_state as ts
from cm_jax.runtime import errors
from cm_jax.train_step import param_max_abs
import checkpoint_utils
import tiny_runs

WHERE = '/runs/r/checkpoints'
LIMIT = 1e4


def tiny_config(**overrides):
  return tiny_runs.tiny_config(local_data=True, **overrides)  # The Fashion-MNIST IDX files: no TFDS, no download.


def metrics(loss=0.5, grad_norm=1.0, w=1.5):
  return {'loss': jnp.float32(loss), 'grad_norm': jnp.float32(grad_norm), 'param_max_abs': jnp.float32(w),
          'lr': jnp.float32(4e-4)}


def check(step, m, steps=(), limit=LIMIT):
  return train.check_update(step, m, lambda: list(steps), limit, WHERE)


# ------------------------------------------------------------------------------------------------
# The host check of one update's metrics.
# ------------------------------------------------------------------------------------------------
def test_a_healthy_update_passes_with_its_host_metrics():
  host = check(7, metrics(), steps=(4, 6))
  assert host == pytest.approx({'loss': 0.5, 'grad_norm': 1.0, 'param_max_abs': 1.5, 'lr': 4e-4})
  assert all(isinstance(v, float) for v in host.values())


def test_nan_loss_names_the_update_and_the_last_checkpoint():
  with pytest.raises(FloatingPointError) as e:
    check(5, metrics(loss=np.nan), steps=(2, 4))
  message = str(e.value)
  assert message.startswith('Non-finite loss nan or gradient norm 1.0 in the update from step 5 to step 6 ')
  assert 'before saving that state' in message
  assert 'Restarting resumes from the last good checkpoint, step 4: try a lower --config.optim.lr' in message


def test_inf_gradient_without_a_checkpoint_starts_again_from_step_0():
  with pytest.raises(FloatingPointError, match=r'gradient norm inf in the update from step 0 to step 1 .*'
                     r'No checkpoint was saved yet, so restarting starts again from step 0: try a lower'):
    check(0, metrics(grad_norm=np.inf))


def test_exploded_weights_stop_the_run_although_the_loss_is_finite():
  with pytest.raises(FloatingPointError) as e:
    check(1, metrics(w=1.2e14), steps=(1,))
  message = str(e.value)
  assert message.startswith('Parameters exploded: max |w| = 1.2e+14 > training.max_param_abs = 10000 after the '
                            'update from step 1 to step 2 ')
  # The weights of step 1 passed when the update from 0 produced them: that checkpoint is good.
  assert 'resumes from the last good checkpoint, step 1:' in message


def test_non_finite_weights_stop_the_run_even_without_a_bound():
  for limit in (LIMIT, 0.0, None):
    with pytest.raises(FloatingPointError, match=r'^Non-finite parameters \(max \|w\| = nan\) after the update '
                       r'from step 3 to step 4 .*resumes from the last good checkpoint, step 2:'):
      check(3, metrics(w=np.nan), steps=(2,), limit=limit)


def test_zero_or_none_turns_the_bound_off():
  for limit in (0.0, None):
    assert check(3, metrics(w=1e30), limit=limit)['param_max_abs'] == pytest.approx(1e30)
  assert check(3, metrics(w=LIMIT), limit=LIMIT)['param_max_abs'] == LIMIT  # The bound itself still passes.


def test_a_nan_loss_right_after_a_checkpoint_advises_moving_that_checkpoint_away():
  """The loss and gradient of the update from step k depend on the step-k state alone: a restart from the
  step-k checkpoint would repeat the NaN whatever the learning rate, so the advice skips that checkpoint."""
  with pytest.raises(FloatingPointError) as e:
    check(4, metrics(loss=np.nan), steps=(2, 4))
  message = str(e.value)
  assert 'The last checkpoint, step 4, holds the weights this update started from' in message
  assert f'move {WHERE}/4 out of the way, and restarting resumes from step 2, the checkpoint before it:' in message
  with pytest.raises(FloatingPointError, match=f'move {WHERE}/4 out of the way, and restarting starts again '
                     'from step 0:'):
    check(4, metrics(grad_norm=np.nan), steps=(4,))
  with pytest.raises(FloatingPointError, match='resumes from the last good checkpoint, step 4:'):
    check(4, metrics(w=1e5), steps=(2, 4))  # Weights: the step-4 state passed; only the new one failed.


def test_param_max_abs_covers_every_tree_and_propagates_nan():
  params = {'a': jnp.array([1.0, -3.0]), 'b': {'c': jnp.array([[0.5]])}}
  assert float(param_max_abs(params)) == 3.0
  assert float(param_max_abs(params, None, ({'a': jnp.array([-7.0])},))) == 7.0  # No target; one EMA.
  assert np.isnan(float(jax.jit(param_max_abs)(params, {'a': jnp.array([np.nan, 9.0])})))
  assert float(jax.jit(param_max_abs)({'a': jnp.array([-np.inf])})) == np.inf
  assert float(param_max_abs(None, ())) == 0.0


def test_check_restored_refuses_nan_or_exploded_weights():
  ok = jnp.ones((2,))
  state = ts.TrainState(step=jnp.int32(8), rng=jax.random.PRNGKey(0), params={'w': ok}, target_params=None,
                        ema_params=({'w': ok.at[0].set(np.nan)},), opt_state=())
  with pytest.raises(errors.InputFileError, match=rf'checkpoint of step 8 in {WHERE} holds non-finite weights '
                     rf'.*Move {WHERE}/8 out of the way and the run resumes from step 6, the checkpoint before it'):
    train.check_restored(state, LIMIT, WHERE, [4, 6, 8])
  state = state.replace(ema_params=({'w': ok * 2e4},))
  with pytest.raises(errors.InputFileError, match=r'exploded weights \(max \|w\| = 2e\+04 > training.max_param_abs'
                     r' = 10000\).* and the run starts again from step 0 \(no older checkpoint there\)'):
    train.check_restored(state, LIMIT, WHERE, [8])
  train.check_restored(state, 0.0, WHERE, [8])  # Bound off: finite weights pass.


@pytest.mark.parametrize('value', [1e4, 0.5, 0.0, None])
def test_config_accepts_a_positive_bound_zero_or_none(value):
  config_validation.validate(tiny_config(**{'training.max_param_abs': value}))


@pytest.mark.parametrize('value', [-1.0, float('nan')])
def test_config_refuses_a_negative_or_nan_bound(value):
  with pytest.raises(errors.ConfigError, match=r'^config\.training\.max_param_abs: must be a number > 0'):
    config_validation.validate(tiny_config(**{'training.max_param_abs': value}))


# ------------------------------------------------------------------------------------------------
# The run: lr = 1e6, then the advised restart in the same workdir.
# ------------------------------------------------------------------------------------------------
def saved_weights_max(workdir, step) -> float:
  """max |w| over params, target and EMAs of checkpoint `step`, restored from disk."""
  _, state = checkpoint_utils.restore_full_state(workdir, step)
  return float(param_max_abs(state.params, state.target_params, state.ema_params))


def test_lr_1e6_stops_at_the_first_update_and_keeps_no_checkpoint(tmp_path):
  """The issue's run: one RAdam step at lr = 1e6 takes max |w| from 1.0 to ~7e6 with a finite loss (the next
  reaches 1.2e14, then NaN). With a checkpoint after every update, the step-1 state would be saved if anything
  slipped past the check; the run starts again from step 0 (the advised restart is then a fresh start)."""
  workdir = str(tmp_path)
  diverging = tiny_config(**{'optim.lr': 1e6, 'training.checkpoint_every': 1, 'training.max_param_abs': LIMIT})
  with pytest.raises(FloatingPointError) as e:
    train.train_and_evaluate(diverging, workdir)
  message = str(e.value)
  assert re.match(r'Parameters exploded: max \|w\| = \S+ > training.max_param_abs = 10000 after the update from '
                  r'step 0 to step 1 ', message), message
  assert 'No checkpoint was saved yet, so restarting starts again from step 0: try a lower --config.optim.lr' \
      in message
  assert checkpointing.make_manager(workdir, read_only=True).all_steps() == []


def test_lr_1e6_after_a_saved_step_names_it_and_the_advised_restart_trains_on(tmp_path):
  """Warm-up makes the first update a no-op (lr 0), so step 1 is saved; the update from step 1 at lr 5e5
  explodes. The message names step 1, every checkpoint left holds bounded weights, and the advised restart
  (lr 1e-4, same workdir) resumes from step 1 and trains to the end: each of its updates passes check_update
  (finite loss and gradient, bounded weights), or it would raise."""
  workdir = str(tmp_path)
  common = {'optim.warmup_steps': 2, 'training.checkpoint_every': 1}
  with pytest.raises(FloatingPointError) as e:
    train.train_and_evaluate(tiny_config(**common, **{'optim.lr': 1e6}), workdir)
  message = str(e.value)
  assert re.match(r'Parameters exploded: max \|w\| = \S+ > training.max_param_abs = 10000 after the update from '
                  r'step 1 to step 2 ', message), message
  assert 'Restarting resumes from the last good checkpoint, step 1: try a lower --config.optim.lr' in message
  steps = checkpointing.make_manager(workdir, read_only=True).all_steps()
  assert steps == [1]
  for step in steps:
    assert saved_weights_max(workdir, step) <= LIMIT

  state = train.train_and_evaluate(tiny_config(**common, **{'optim.lr': 1e-4}), workdir)
  assert int(state.step) == 4
  assert checkpointing.make_manager(workdir, read_only=True).all_steps() == [2, 3, 4]
  assert saved_weights_max(workdir, 4) <= 2.0  # Init max |w| is 1.0 (GroupNorm scales).

  # A checkpoint whose weights exceed the bound (here: a bound set below them) is refused on resume.
  with pytest.raises(errors.InputFileError, match=r'checkpoint of step 4 in .* holds exploded weights .*'
                     r'and the run resumes from step 3, the checkpoint before it'):
    train.train_and_evaluate(tiny_config(**common, **{'optim.lr': 1e-4, 'training.max_param_abs': 0.5}), workdir)
