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
from cm_jax.configs import default

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO_ROOT, 'configs', '*.py')))


def load(path, *args):
  spec = importlib.util.spec_from_file_location('cfg', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


@pytest.mark.parametrize('path', [p for p in CONFIG_FILES if not p.endswith(('__init__.py', 'common.py'))],
                         ids=os.path.basename)
def test_every_config_file_validates(path):
  config = load(path)
  if config.loss.name in ('cd', 'ect', 'scd'):
    # Distillation and tuning configs need the teacher's workdir, which only the user knows.
    with pytest.raises(ValueError, match=r'config\.teacher\.workdir'):
      config_validation.validate(config)
    config.teacher.workdir = '/path/to/teacher'
  if config.data.name == 'image_folder':
    # Image-folder configs (ImageNet 64x64) need the folder, which only the user knows.
    with pytest.raises(ValueError, match=r'config\.data\.manual_dir'):
      config_validation.validate(config)
    config.data.manual_dir = '/path/to/imagenet/train'
  config_validation.validate(config)
  assert config_validation.advisories(config) == []  # No shipped config draws a warning.


@pytest.mark.parametrize('loss_name', ['ct', 'edm', 'cd', 'ect'])
def test_tiny_test_config_has_a_variant_per_loss(loss_name):
  config = load(os.path.join(REPO_ROOT, 'configs', 'test.py'), loss_name)
  assert config.loss.name == loss_name
  if loss_name in ('cd', 'ect'):
    config.teacher.workdir = '/path/to/teacher'
  config_validation.validate(config)


@pytest.mark.parametrize('loss_name', ['ct', 'edm'])
def test_a_teacher_for_a_loss_without_one_is_refused(loss_name):
  """E.g. --config.teacher.workdir added to a CT config would otherwise train plain CT without a word."""
  config = load(os.path.join(REPO_ROOT, 'configs', 'test.py'), loss_name)
  config.teacher.workdir = '/path/to/teacher'
  with pytest.raises(ValueError, match=r'config\.teacher\.workdir: is set, but loss.name'):
    config_validation.validate(config)


@pytest.mark.parametrize('loss_name', ['edm', 'ect'])
def test_a_target_ema_for_a_loss_without_a_target_is_refused(loss_name):
  config = load(os.path.join(REPO_ROOT, 'configs', 'test.py'), loss_name)
  config.teacher.workdir = '/path/to/teacher' if loss_name == 'ect' else None
  config.loss.target = 'ema'
  with pytest.raises(ValueError, match=r'config\.loss\.target'):
    config_validation.validate(config)


def test_ect_must_start_from_the_teacher():
  config = load(os.path.join(REPO_ROOT, 'configs', 'test.py'), 'ect')
  config.teacher.workdir = '/path/to/teacher'
  config.teacher.init_student = False
  with pytest.raises(ValueError, match=r'config\.teacher\.init_student'):
    config_validation.validate(config)


@pytest.mark.parametrize('field,value,message', [
    ('model.num_groups', 3, 'model.num_groups'),
    ('model.dropout', 1.0, 'model.dropout'),
    ('training.ema_rates', (1.0,), 'training.ema_rates'),
    ('loss.s0', 2000, 'loss.s0'),
    ('sampling.two_step_t', 100.0, 'sampling.two_step_t'),
    ('data.source', 'internet', 'data.source'),
    ('optim.decay', 'linear', 'optim.decay'),
    ('loss.name', 'sct2', 'loss.name'),
    ('loss.schedule', 'cosine', 'loss.schedule'),
    ('teacher.solver', 'rk4', 'teacher.solver'),
    ('sampling.diffusion_solver', 'dpm', 'sampling.diffusion_solver'),
    ('sampling.diffusion_steps', 0, 'sampling.diffusion_steps'),
    ('loss.ect_q', 1.0, 'loss.ect_q'),
    ('loss.ect_stage_steps', 0, 'loss.ect_stage_steps'),
    ('loss.edm_p_std', 0.0, 'loss.edm_p_std'),
    ('evaluation.feature_net', 'clip', 'evaluation.feature_net'),
    ('evaluation.reference_split', 'validation', 'evaluation.reference_split'),
    ('evaluation.every', -1, 'evaluation.every'),
    ('evaluation.pr_k', 0, 'evaluation.pr_k'),
    ('evaluation.classifier_steps', 0, 'evaluation.classifier_steps'),
    ('evaluation.num_reference', -5, 'evaluation.num_reference'),
    ('model.patch_size', 0, 'model.patch_size'),
    ('model.patch_size', 3, 'model.patch_size'),   # 28 does not divide by 3.
    ('model.patch_size', 4, 'model.ch_mult'),      # 28 / 4 = 7 cannot be halved for ch_mult (1, 2, 2).
    ('loss.tangent_c', 0.0, 'loss.tangent_c'),
    ('loss.tangent_warmup_steps', -1, 'loss.tangent_warmup_steps'),
    ('model.adaptive_weight', True, 'model.adaptive_weight'),  # The default loss 'ct' has no adaptive weight.
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
  assert float(ts.ema_decay(0.999, 0, 'capped')) == pytest.approx(0.1)
  assert float(ts.ema_decay(0.999, 8, 'capped')) == pytest.approx(0.5)
  assert float(ts.ema_decay(0.999, 10**6, 'capped')) == pytest.approx(0.999)
  assert float(ts.ema_decay(0.999, 0, 'none')) == pytest.approx(0.999)
  assert float(ts.ema_decay(0.9, 0, 'debias')) == 0.0  # The first update replaces the init.
  assert float(ts.ema_decay(0.9, 1, 'debias')) == pytest.approx(0.9 / 1.9)  # (0.9 p0 + p1) / 1.9.
  assert float(ts.ema_decay(0.999, 10**6, 'debias')) == pytest.approx(0.999)
  with pytest.raises(ValueError, match='training.ema_warmup'):
    ts.ema_decay(0.999, 0, True)


@pytest.mark.parametrize('rate', [0.5, 0.99, 0.9999])
def test_debiased_ema_is_the_normalised_exponential_average_of_the_iterates(rate):
  iterates = np.random.default_rng(0).normal(size=(300,))
  ema = 123.0  # The initial parameters: 'debias' gives them no weight.
  for k, p in enumerate(iterates):
    ema = float(ts.ema_update(jnp.float32(ema), jnp.float32(p), ts.ema_decay(rate, k, 'debias')))
  weights = rate ** np.arange(len(iterates))[::-1]
  np.testing.assert_allclose(ema, np.sum(weights * iterates) / np.sum(weights), rtol=1e-4, atol=1e-5)


def test_saved_bool_ema_warmup_reads_as_its_meaning():
  from cm_jax.configs import common as config_lib
  assert config_lib.config_from_json_dict({'training': {'ema_warmup': True}}).training.ema_warmup == 'capped'
  assert config_lib.config_from_json_dict({'training': {'ema_warmup': False}}).training.ema_warmup == 'none'


def test_ect_stages_past_float32_resolution_are_refused():
  """At stage s the gap t - r is t q^-(s+1)(...); past 2^-14 it is quantised in float32, at 2^-24 zero."""
  config = load(os.path.join(REPO_ROOT, 'configs', 'fashion_mnist_ect.py'))
  config.teacher.workdir = '/path/to/teacher'
  per_stage = config.loss.ect_stage_steps
  config.training.num_steps = per_stage * 14  # Last stage 13: q^14 = 2^14, the limit.
  config_validation.validate(config)
  config.training.num_steps = per_stage * 14 + 1  # Reaches stage 14.
  with pytest.raises(ValueError, match=r'config\.loss\.ect_stage_steps: .* reach stage 14'):
    config_validation.validate(config)


def test_fixed_schedule_with_a_target_ema_needs_a_constant_rate():
  config = load(os.path.join(REPO_ROOT, 'configs', 'fashion_mnist_cd.py'))
  config.teacher.workdir = '/path/to/teacher'
  config.loss.target = 'ema'
  with pytest.raises(ValueError, match=r'config\.loss\.mu_variant'):
    config_validation.validate(config)
  config.loss.mu_variant = 'constant'
  config_validation.validate(config)


def test_sct_with_a_high_frequency_time_embedding_gets_one_advisory():
  from cm_jax.configs import test as test_config  # pylint: disable=g-import-not-at-top
  config = test_config.get_config('sct')
  assert config.model.embedding == 'fourier' and config.model.fourier_scale == 0.02
  assert config_validation.advisories(config) == []
  config.model.fourier_scale = 16.0  # CM's official CIFAR-10 value; sCM's Fig. 4 shows it unstable.
  (note,) = config_validation.advisories(config)
  assert 'config.model.fourier_scale = 16.0' in note and 'fourier_scale 0.02' in note
  config.model.embedding = 'positional'  # positional_scale 1000: the PyTorch CM code's.
  (note,) = config_validation.advisories(config)
  assert 'config.model.positional_scale = 1000.0' in note
  config.model.positional_scale = 1.0
  assert config_validation.advisories(config) == []
  config.loss.name = 'ct'  # Discrete-time losses do not differentiate the network in time.
  config.model.embedding, config.model.fourier_scale = 'fourier', 16.0
  assert config_validation.advisories(config) == []


def test_sct_may_take_a_teacher_for_its_first_weights_only():
  from cm_jax.configs import test as test_config  # pylint: disable=g-import-not-at-top
  config = test_config.get_config('sct')
  config_validation.validate(config)  # From random weights.
  config.teacher.workdir = '/path/to/teacher'
  config_validation.validate(config)  # From the teacher's weights.
  config.teacher.init_student = False
  with pytest.raises(ValueError, match=r'config\.teacher\.init_student'):
    config_validation.validate(config)
  scd = test_config.get_config('scd')
  with pytest.raises(ValueError, match=r'config\.teacher\.workdir'):
    config_validation.validate(scd)
