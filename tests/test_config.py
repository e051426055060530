"""Config files, validation errors and the optimizer built from the config (no training)."""

import glob
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax import config_validation
from cm_jax import train_state as ts
from configs import default

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO_ROOT, 'configs', '*.py')))


def load(path):
  spec = importlib.util.spec_from_file_location('cfg', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize('path', [p for p in CONFIG_FILES if not p.endswith('__init__.py')],
                         ids=os.path.basename)
def test_every_config_file_validates(path):
  config_validation.validate(load(path))


@pytest.mark.parametrize('field,value,message', [
    ('model.num_groups', 3, 'model.num_groups'),
    ('model.dropout', 1.0, 'model.dropout'),
    ('training.ema_rates', (1.0,), 'training.ema_rates'),
    ('loss.s0', 2000, 'loss.s0'),
    ('sampling.two_step_t', 100.0, 'sampling.two_step_t'),
    ('data.source', 'internet', 'data.source'),
    ('optim.decay', 'linear', 'optim.decay'),
])
def test_validation_names_the_field(field, value, message):
  config = default.get_config()
  group, key = field.split('.')
  with config.unlocked():
    config[group][key] = value
  with pytest.raises(ValueError, match=message.replace('.', r'\.')):
    config_validation.validate(config)


def test_group_norm_must_divide_the_base_channels_too():
  config = default.get_config()
  config.model.ch, config.model.ch_mult, config.model.num_groups = 12, (2, 4), 8  # 24, 48 divide; 12 not.
  with pytest.raises(ValueError, match='12 channels'):
    config_validation.validate(config)


def test_gradient_clipping_does_not_change_the_optimizer_state_structure():
  params = {'w': jnp.ones((3,))}
  config = default.get_config()
  unclipped = ts.make_optimizer(config).init(params)
  config.optim.grad_clip = 1.0
  clipped_tx = ts.make_optimizer(config)
  assert jax.tree.structure(unclipped) == jax.tree.structure(clipped_tx.init(params))
  updates, _ = clipped_tx.update({'w': jnp.full((3,), 100.0)}, clipped_tx.init(params), params)
  assert np.all(np.isfinite(np.asarray(updates['w'])))


def test_learning_rate_schedule_warmup_and_cosine_end():
  config = default.get_config()
  config.optim.lr, config.optim.warmup_steps, config.optim.decay = 1e-3, 10, 'cosine'
  config.training.num_steps, config.optim.decay_steps = 100, 60
  lr = ts.learning_rate_schedule(config)
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(float(lr(5)), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(float(lr(10)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(lr(35)), 5e-4, rtol=1e-5)  # Half-way through the 50 cosine steps.
  assert float(lr(60)) == pytest.approx(0.0, abs=1e-12)


def test_ema_decay_warmup():
  assert float(ts.ema_decay(0.999, 0, True)) == pytest.approx(0.1)
  assert float(ts.ema_decay(0.999, 10**6, True)) == pytest.approx(0.999)
  assert float(ts.ema_decay(0.999, 0, False)) == pytest.approx(0.999)
