"""The recipe helpers of cm_jax/configs/common.py and the config modules built on them (no JAX: configs only)."""

import ast
import importlib
import inspect
import pkgutil
import re
import sys

import ml_collections
import pytest

from cm_jax import configs
from cm_jax.configs import common
from cm_jax.configs import default

CONFIG_MODULES = sorted(m.name for m in pkgutil.iter_modules(configs.__path__) if m.name != 'common')
# File-name suffix -> loss.name; the longest suffix that matches wins ('_ct2023' before '_ct').
LOSS_OF_SUFFIX = {'_ct2023': 'ct', '_ct': 'ct', '_cd': 'cd', '_ect': 'ect', '_edm': 'edm', '_sct': 'sct', '_scd': 'scd',
                  '_meanflow': 'meanflow'}
# Every helper with arguments that a config passes it.
HELPER_CALLS = {
    'apply_ict': dict(),
    'apply_ct2023': dict(s1=150, mu0=0.9, mu_variant='paper'),
    'apply_edm': dict(diffusion_steps=40),
    'apply_cd': dict(num_points=40, target='ema', mu0=0.95),
    'apply_ect': dict(stage_steps=580),
    'apply_scm': dict(tangent_warmup_steps=10_000),
    'apply_meanflow': dict(recipe='improved'),
    'apply_adm_unet': dict(ch=128, ch_mult=(1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16, 8)),
}


def flat(config: ml_collections.ConfigDict, prefix: str = '') -> dict:
  """{'group.field': value} of every leaf field."""
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(flat(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = value
  return out


class Recorder:
  """Stands for a ConfigDict and records the dotted name of every field assigned through it."""

  def __init__(self, target, prefix='', written=None):
    object.__setattr__(self, '_target', target)
    object.__setattr__(self, '_prefix', prefix)
    object.__setattr__(self, 'written', set() if written is None else written)

  def __getattr__(self, name):
    value = getattr(self._target, name)
    if isinstance(value, ml_collections.ConfigDict):
      return Recorder(value, f'{self._prefix}{name}.', self.written)
    return value

  def __setattr__(self, name, value):
    self.written.add(self._prefix + name)
    setattr(self._target, name, value)


def fields_written_by(helper_name: str) -> set:
  recorder = Recorder(default.get_config())
  getattr(common, helper_name)(recorder, **HELPER_CALLS[helper_name])
  return recorder.written


def config_of(module_name: str) -> ml_collections.ConfigDict:
  return importlib.import_module(f'cm_jax.configs.{module_name}').get_config()


def test_the_helper_table_of_this_test_covers_every_helper_of_common():
  helpers = {name for name, f in inspect.getmembers(common, inspect.isfunction) if name.startswith('apply_')}
  assert helpers == set(HELPER_CALLS)


def test_apply_ict_sets_the_ict_loss_and_adam():
  config = default.get_config()
  config.loss.name, config.optim.name = 'edm', 'radam'
  assert common.apply_ict(config) is config
  loss = config.loss
  assert (loss.name, loss.schedule, loss.s0, loss.s1) == ('ct', 'exponential', 10, 1280)
  assert (loss.index_distribution, loss.p_mean, loss.p_std) == ('lognormal', -1.1, 2.0)
  assert (loss.distance, loss.weighting, loss.target) == ('pseudo_huber', 'inverse_delta', 'stopgrad')
  assert loss.huber_c is None  # iCT's c = 0.00054 sqrt(d) follows the image size.
  assert config.optim.name == 'adam'


def test_apply_ict_spells_out_the_loss_defaults_of_default_py():
  config = common.apply_ict(default.get_config())
  assert config.loss.to_dict() == default.get_config().loss.to_dict()


def test_apply_ict_takes_a_shorter_curriculum():
  assert common.apply_ict(default.get_config(), s1=160).loss.s1 == 160


def test_apply_ct2023_sets_cms_adaptive_curriculum_and_target_ema():
  config = common.apply_ct2023(default.get_config(), s1=200, mu0=0.95, mu_variant='official')
  loss = config.loss
  assert (loss.name, loss.schedule, loss.s0, loss.s1) == ('ct', 'adaptive', 2, 200)
  assert (loss.target, loss.mu0, loss.mu_variant) == ('ema', 0.95, 'official')
  assert (loss.index_distribution, loss.distance, loss.weighting) == ('uniform', 'l2', 'uniform')
  assert config.optim.name == 'radam'


def test_apply_edm_trains_a_teacher_sampled_with_heun():
  config = common.apply_edm(default.get_config(), diffusion_steps=40)
  assert (config.loss.name, config.loss.edm_p_mean, config.loss.edm_p_std) == ('edm', -1.2, 1.2)
  assert config.optim.name == 'adam'
  assert (config.sampling.diffusion_solver, config.sampling.diffusion_steps) == ('heun', 40)


def test_apply_cd_points_the_student_at_its_teacher():
  config = default.get_config()
  config.teacher.init_student, config.teacher.solver, config.model.dropout = False, 'euler', 0.3
  assert common.apply_cd(config, num_points=18) is config
  assert config.loss.name == 'cd'
  assert config.teacher.solver == 'heun'
  assert config.teacher.init_student  # The student starts from the teacher's weights.
  assert config.teacher.workdir is None  # Left to the command line.
  assert config.model.dropout == 0.0
  assert config.optim.name == 'radam'


def test_apply_cd_distils_on_a_fixed_grid_with_uniform_l2():
  loss = common.apply_cd(default.get_config(), num_points=18).loss
  assert (loss.schedule, loss.num_points) == ('fixed', 18)
  assert (loss.index_distribution, loss.distance, loss.weighting) == ('uniform', 'l2', 'uniform')


def test_apply_cd_with_stopgrad_leaves_the_target_ema_fields_alone():
  config = default.get_config()
  config.loss.mu0, config.loss.mu_variant = 0.5, 'official'
  common.apply_cd(config, num_points=18, target='stopgrad')
  assert (config.loss.target, config.loss.mu0, config.loss.mu_variant) == ('stopgrad', 0.5, 'official')


def test_apply_cd_with_a_target_ema_keeps_its_rate_constant():
  loss = common.apply_cd(default.get_config(), num_points=40, target='ema', mu0=0.95).loss
  assert (loss.target, loss.mu0, loss.mu_variant) == ('ema', 0.95, 'constant')


@pytest.mark.parametrize('target,mu0', [('ema', None), ('stopgrad', 0.95), ('lpips', None)])
def test_apply_cd_refuses_a_target_and_rate_that_do_not_go_together(target, mu0):
  with pytest.raises(ValueError, match='apply_cd'):
    common.apply_cd(default.get_config(), num_points=18, target=target, mu0=mu0)


def test_apply_ect_tunes_the_teacher_with_ects_shrinking_gap():
  config = default.get_config()
  config.teacher.init_student = False
  assert common.apply_ect(config, stage_steps=25_000) is config
  loss = config.loss
  assert (loss.name, loss.p_mean, loss.p_std) == ('ect', -1.1, 2.0)
  assert (loss.ect_q, loss.ect_k, loss.ect_b, loss.ect_stage_steps) == (2.0, 8.0, 1.0, 25_000)
  assert (loss.distance, loss.weighting) == ('l2_norm', 'inverse_delta')
  assert config.teacher.init_student  # ECT starts from the teacher by definition.
  assert config.teacher.workdir is None
  assert config.optim.name == 'radam'


@pytest.mark.parametrize('name', ['ct', 'scd'])
def test_apply_scm_sets_the_continuous_time_objective_and_keeps_distillation(name):
  config = default.get_config()
  config.loss.name, config.teacher.init_student, config.model.dropout = name, False, 0.3
  assert common.apply_scm(config, tangent_warmup_steps=10_000) is config
  loss = config.loss
  assert loss.name == ('scd' if name == 'scd' else 'sct')
  assert (loss.p_mean, loss.p_std, loss.tangent_warmup_steps, loss.tangent_c) == (-1.0, 1.4, 10_000, 0.1)
  assert loss.target == 'stopgrad' and config.model.adaptive_weight
  assert (config.optim.name, config.optim.b1, config.optim.b2) == ('radam', 0.9, 0.99)
  assert config.teacher.init_student  # sCM starts sCT and sCD from the teacher's EMA weights.
  assert config.model.dropout == (0.0 if name == 'scd' else 0.3)  # sCM: no dropout for sCD.


def test_apply_adm_unet_sets_adms_layout_at_the_given_size():
  model = common.apply_adm_unet(default.get_config(), ch=192, ch_mult=(1, 2, 3, 4), num_res_blocks=3,
                                attn_resolutions=(32, 16, 8)).model
  assert (model.ch, model.ch_mult, model.num_res_blocks, model.attn_resolutions) == (192, (1, 2, 3, 4), 3, (32, 16, 8))
  assert (model.head_channels, model.scale_shift, model.resblock_updown, model.num_groups) == (64, True, True, 32)
  assert (model.embedding, model.fourier_scale) == ('fourier', 0.02)


@pytest.mark.parametrize('helper_name', sorted(HELPER_CALLS))
def test_a_helper_sets_only_fields_that_default_declares_and_keeps_their_types(helper_name):
  before = flat(default.get_config())
  after = flat(getattr(common, helper_name)(default.get_config(), **HELPER_CALLS[helper_name]))
  assert after.keys() == before.keys()
  for key, value in after.items():
    if value is not None and before[key] is not None:
      assert type(value) is type(before[key]), key


@pytest.mark.parametrize('helper_name', sorted(HELPER_CALLS))
def test_a_helper_documents_every_field_it_sets(helper_name):
  written = fields_written_by(helper_name)
  assert written
  named = set(re.findall(r'\b([a-z]+\.[a-z_0-9]+)\b', getattr(common, helper_name).__doc__))
  assert written <= named, f'{helper_name} sets {sorted(written - named)} without naming them in its docstring'


def test_common_imports_only_ml_collections_and_the_standard_library():
  """Config files import it, and so will the checkpoint reader: no JAX, TensorFlow or cm_jax module."""
  tree = ast.parse(inspect.getsource(common))
  imported = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      imported.update(alias.name.split('.')[0] for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      imported.add(node.module.split('.')[0])
  # config_from_json_dict reads configs/default.py when it is called (a function-local import).
  imported = {m for m in imported if m != 'cm_jax'} | {
      n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module.startswith('cm_jax')}
  assert imported - set(sys.stdlib_module_names) <= {'ml_collections', 'cm_jax.configs'}


def test_common_is_not_a_config():
  assert not hasattr(common, 'get_config')


def expected_loss_name(module_name: str) -> str:
  if module_name in ('default', 'test'):
    return 'ct'  # default.py's defaults are iCT's; test.py's default variant keeps them.
  for suffix in sorted(LOSS_OF_SUFFIX, key=len, reverse=True):
    if module_name.endswith(suffix):
      return LOSS_OF_SUFFIX[suffix]
  raise AssertionError(f'configs/{module_name}.py: its name ends in none of {sorted(LOSS_OF_SUFFIX)}; name the '
                       'loss in the file name (or teach this test its rule).')


@pytest.mark.parametrize('module_name', CONFIG_MODULES)
def test_every_config_module_returns_a_config_dict_whose_loss_its_file_name_names(module_name):
  config = config_of(module_name)
  assert isinstance(config, ml_collections.ConfigDict)
  assert config.loss.name == expected_loss_name(module_name)


@pytest.mark.parametrize('loss_name', ['ct', 'edm', 'cd', 'ect', 'sct', 'scd', 'meanflow'])
def test_the_tiny_test_config_trains_the_loss_it_is_given(loss_name):
  from cm_jax.configs import test  # pylint: disable=g-import-not-at-top
  assert test.get_config(loss_name).loss.name == loss_name


def test_recipe_configs_end_on_their_recipe_with_their_own_overrides_after_it():
  assert (config_of('cifar10_cd').loss.num_points, config_of('cifar10_cd').loss.target) == (18, 'stopgrad')
  assert (config_of('imagenet64_cd').loss.mu0, config_of('imagenette_cd').loss.mu_variant) == (0.95, 'constant')
  assert (config_of('fashion_mnist_ct2023').loss.schedule, config_of('imagenet64_ct').loss.s1) == ('adaptive', 200)
  assert (config_of('cifar10_ect').loss.ect_stage_steps, config_of('fashion_mnist_ect').loss.ect_stage_steps) == (
      25_000, 1280)
  assert (config_of('cifar10_edm').sampling.diffusion_steps, config_of('imagenette_edm').sampling.diffusion_steps) == (
      18, 40)
  # The dropout of a config after its helper wins over the helper's: ECT on CIFAR-10 keeps 0.2, CD's is 0.
  assert (config_of('cifar10_ect').model.dropout, config_of('cifar10_cd').model.dropout) == (0.2, 0.0)
  # The Fashion-MNIST family keeps the CT run's Adam where CM and ECT use RAdam.
  assert {config_of(n).optim.name for n in ('fashion_mnist_ct2023', 'fashion_mnist_cd', 'fashion_mnist_ect')} == {
      'adam'}
  assert {config_of(n).optim.name for n in ('cifar10_cd', 'cifar10_ect', 'imagenet64_ct', 'imagenette_cd')} == {
      'radam'}
  # sCM: sCT keeps dropout 0.2 on CIFAR-10 and sCD has none; ImageNet 64x64 keeps EDM2's Adam and P_std 1.6.
  assert (config_of('cifar10_sct').model.dropout, config_of('cifar10_scd').model.dropout) == (0.2, 0.0)
  assert (config_of('cifar10_sct').optim.name, config_of('cifar10_sct').optim.b2) == ('radam', 0.99)
  assert (config_of('imagenet64_scd').optim.name, config_of('imagenet64_scd').loss.p_std) == ('adam', 1.6)


def test_meanflow_configs_take_the_published_recipes():
  paper, improved = config_of('cifar10_meanflow'), config_of('fashion_mnist_meanflow')
  assert (paper.loss.mf_time_order, paper.loss.mf_t_mean, paper.loss.mf_t_std) == ('sort', -2.0, 2.0)
  assert (improved.loss.mf_time_order, improved.loss.mf_t_mean, improved.loss.mf_r_mean) == ('min', -0.6, -4.0)
  assert (paper.optim.lr, paper.training.batch_size, paper.model.dropout, paper.training.num_steps) == (
      6e-4, 1024, 0.2, 800_000)
  for config in (paper, improved):
    assert config.model.two_times and config.loss.mf_norm_p == 0.75 and config.loss.mf_ratio_r_neq_t == 0.75
    assert 0 < config.sampling.two_step_t < 1
  with pytest.raises(ValueError, match='recipe'):
    common.apply_meanflow(default.get_config(), recipe='v2')


def test_the_mnist_configs_use_mnists_own_sigma_data():
  """MNIST's std in [-1, 1] is 2 x 0.3081 = 0.616, not Fashion-MNIST's 0.71; teacher and students agree."""
  assert {config_of(n).consistency.sigma_data for n in ('mnist_ct', 'mnist_edm', 'mnist_cd', 'mnist_ect')} == {0.62}
  assert config_of('fashion_mnist_ct').consistency.sigma_data == 0.71
