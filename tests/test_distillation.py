"""End-to-end: a tiny EDM teacher on mock TFDS data, sampled with Heun/Euler, then CD, ECT, sCD and sCT from it."""

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
from cm_jax import teacher as teacher_lib
from cm_jax import train
from cm_jax import train_state as ts
import checkpoint_utils
import tiny_runs

MOCK_EXAMPLES = 40


def tiny(loss_name, teacher_dir=None, **overrides):
  config = tiny_runs.tiny_config(loss_name, **{'data.name': 'mnist', 'data.source': 'tfds',
                                                'teacher.workdir': teacher_dir, **overrides})
  if loss_name != 'edm':
    config.seed = 1  # Another seed than the teacher's: a random init of the student differs from the teacher's.
  return config


def run(config, workdir):
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    return train.train_and_evaluate(config, str(workdir))


def max_abs_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
             zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def tree_equal(a, b) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
  """A 4-step EDM teacher (loss.name = 'edm') on mock MNIST."""
  workdir = tmp_path_factory.mktemp('teacher')
  state = run(tiny('edm'), workdir)
  assert int(state.step) == 4 and state.target_params is None
  return str(workdir)


@pytest.fixture(scope='module')
def cd_run(teacher_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('cd')
  return str(workdir), run(tiny('cd', teacher_dir), workdir)


def test_teacher_is_a_diffusion_model_sampled_with_heun_and_euler(teacher_dir):
  assert os.path.exists(os.path.join(teacher_dir, 'samples', 'step_00000004.png'))
  model = inference.load(teacher_dir)
  assert model.is_diffusion_model and model.denoiser.sigma_min == 0.0
  heun = model.sample(3, seed=1)  # Default: config.sampling.diffusion_solver = 'heun', diffusion_steps = 4.
  assert heun.shape == (3, 28, 28, 1) and heun.dtype == np.uint8
  np.testing.assert_array_equal(heun, model.sample(3, sampler='heun', steps=4, seed=1))
  assert not np.array_equal(heun, model.sample(3, sampler='euler', steps=4, seed=1))
  with pytest.raises(ValueError, match="sample it with 'heun' or 'euler'"):
    model.sample(2, sampler='consistency')
  with pytest.raises(ValueError, match='--ts'):
    model.sample(2, ts=(1.0,))


def test_consistency_models_refuse_the_ode_samplers(cd_run):
  model = inference.load(cd_run[0])
  assert not model.is_diffusion_model
  with pytest.raises(ValueError, match='need an EDM denoiser'):
    model.sample(2, sampler='heun')


def test_cd_student_starts_from_the_teacher_and_trains(teacher_dir, cd_run):
  workdir, state = cd_run
  assert int(state.step) == 4
  teacher = inference.load(teacher_dir)
  # Four small Adam steps from the teacher's EMA weights stay close to them; a random init is far away.
  random_init = jax.jit(lambda: ts.init_state(tiny('cd', teacher_dir), ts.make_optimizer(tiny('cd'))))()
  assert max_abs_diff(state.params, teacher.params) < 0.02
  assert max_abs_diff(random_init.params, teacher.params) > 0.1
  assert not tree_equal(state.params, teacher.params)
  assert sorted(os.listdir(os.path.join(workdir, 'samples'))) == ['step_00000004.png']
  # Sampling a CD student is consistency sampling, one or more steps.
  assert inference.load(workdir).sample(2, steps=2).shape == (2, 28, 28, 1)


def test_cd_with_a_random_student_and_euler_teacher_and_target_ema(teacher_dir, tmp_path):
  config = tiny('cd', teacher_dir, **{'teacher.init_student': False, 'teacher.solver': 'euler',
                                      'loss.target': 'ema', 'loss.mu_variant': 'constant', 'loss.mu0': 0.95,
                                      'training.num_steps': 2})
  state = run(config, tmp_path)
  teacher = inference.load(teacher_dir)
  assert max_abs_diff(state.params, teacher.params) > 0.1
  # Target EMA with constant mu = 0.95: it moved from the init towards params, but not all the way.
  assert state.target_params is not None and not tree_equal(state.target_params, state.params)


def test_cd_resume_is_bit_identical(teacher_dir, cd_run, tmp_path, preempt_at):
  _, straight = cd_run
  preempt_at(2)
  with pytest.raises(KeyboardInterrupt):
    run(tiny('cd', teacher_dir), tmp_path)
  assert checkpointing.make_manager(str(tmp_path), read_only=True).all_steps() == [2]
  resumed = run(tiny('cd', teacher_dir), tmp_path)
  assert int(resumed.step) == 4
  assert tree_equal(straight.params, resumed.params) and tree_equal(straight.ema_params, resumed.ema_params)
  assert tree_equal(straight.opt_state, resumed.opt_state)


def test_ect_from_the_teacher_trains_and_resumes_without_it(teacher_dir, tmp_path):
  own_teacher = tmp_path / 'teacher'
  shutil.copytree(teacher_dir, own_teacher)
  workdir = tmp_path / 'ect'
  config = tiny('ect', str(own_teacher))  # ect_stage_steps = 2: stages 0 and 1 in 4 steps.
  state = run(config, workdir)
  assert int(state.step) == 4 and state.target_params is None
  assert max_abs_diff(state.params, inference.load(str(own_teacher)).params) < 0.02
  model = inference.load(str(workdir))
  assert not model.is_diffusion_model and model.sample(2, steps=1).shape == (2, 28, 28, 1)
  # The teacher only initialises ECT: with the teacher gone, the run still continues from its checkpoint.
  shutil.rmtree(own_teacher)
  longer = config.copy_and_resolve_references()
  longer.training.num_steps = 6
  assert int(run(longer, workdir).step) == 6


def test_scd_distils_the_teacher_resumes_bit_identically_samples_and_edits(teacher_dir, tmp_path, preempt_at):
  """sCD end to end: starts from the teacher's weights plus a fresh adaptive-weight head, which trains and is
  saved and restored with the rest (a preempted run resumes to the same state); the run samples in one and two
  steps (unshifted) and inpaints."""
  straight_dir = tmp_path / 'scd'
  straight = run(tiny('scd', teacher_dir), straight_dir)
  teacher = inference.load(teacher_dir)
  assert int(straight.step) == 4 and 'adaptive_weight' not in teacher.params
  head = straight.params['adaptive_weight']
  assert float(np.max(np.abs(head['Dense_0']['kernel']))) > 0  # Zero-initialised, then trained.
  rest = {k: v for k, v in straight.params.items() if k != 'adaptive_weight'}
  assert max_abs_diff(rest, teacher.params) < 0.02  # Four small steps from the teacher's weights.
  preempt_at(2)
  with pytest.raises(KeyboardInterrupt):
    run(tiny('scd', teacher_dir), tmp_path / 'resumed')
  resumed = run(tiny('scd', teacher_dir), tmp_path / 'resumed')
  assert tree_equal(straight.params, resumed.params) and tree_equal(straight.opt_state, resumed.opt_state)
  model = inference.load(str(straight_dir))
  assert model.denoiser.sigma_min == 0.0 and not model.is_diffusion_model
  assert tree_equal(model.params['adaptive_weight'], straight.ema_params[0]['adaptive_weight'])
  for steps in (1, 2):
    x = model.sample(3, steps=steps)
    assert x.shape == (3, 28, 28, 1) and np.all(np.isfinite(x))
  from cm_jax import edit  # pylint: disable=g-import-not-at-top
  images = (np.arange(2 * 28 * 28).reshape(2, 28, 28, 1) % 255).astype(np.uint8)
  out = edit.run_task(model, 'inpaint', images, num=2, batch_size=2)
  assert out['result'].shape == (2, 28, 28, 1)


def test_sct_trains_from_random_weights_or_from_the_teacher(teacher_dir, tmp_path):
  scratch = run(tiny('sct'), tmp_path / 'scratch')
  assert int(scratch.step) == 4 and scratch.target_params is None
  teacher = inference.load(teacher_dir)
  rest = {k: v for k, v in scratch.params.items() if k != 'adaptive_weight'}
  assert max_abs_diff(rest, teacher.params) > 0.1
  warm = run(tiny('sct', teacher_dir), tmp_path / 'warm')  # sCM's recipe: the teacher's first weights.
  rest = {k: v for k, v in warm.params.items() if k != 'adaptive_weight'}
  assert max_abs_diff(rest, teacher.params) < 0.02
  assert inference.load(str(tmp_path / 'warm')).sample(2, steps=2).shape == (2, 28, 28, 1)


def test_missing_teacher_names_the_path(tmp_path):
  missing = str(tmp_path / 'no_teacher_here')
  with pytest.raises(FileNotFoundError, match='config.teacher.workdir = .*no_teacher_here'):
    run(tiny('cd', missing), tmp_path / 'cd')
  assert not os.path.exists(tmp_path / 'cd' / 'checkpoints' / '2')


def test_a_consistency_run_is_not_a_teacher(teacher_dir, tmp_path):
  """The teacher's config says loss.name = 'ct': refused, naming the path and the field."""
  fake = tmp_path / 'ct_run'
  shutil.copytree(teacher_dir, fake)
  checkpoint_utils.rewrite_saved_config(fake, lambda saved: saved['loss'].update(name='ct'))
  with pytest.raises(ValueError, match=r"ct_run.*loss.name = 'ct', not 'edm'"):
    run(tiny('cd', str(fake)), tmp_path / 'cd')


def test_check_teacher_lists_every_mismatch():
  teacher = tiny('edm')
  student = tiny('cd', '/t')
  teacher_lib.check_teacher(teacher, student, '/t')  # Same model and data: fine.
  student.model.dropout = 0.3  # Dropout does not change the parameters: still fine.
  teacher_lib.check_teacher(teacher, student, '/t')
  student.model.ch = 16
  student.data.name = 'fashion_mnist'
  with pytest.raises(ValueError, match=r'data\.name: teacher .mnist., student .fashion_mnist.*model\.ch: '
                                       r'teacher 8, student 16'):
    teacher_lib.check_teacher(teacher, student, '/t')
  student.teacher.init_student = False  # A random student may have any architecture, not any dataset.
  with pytest.raises(ValueError, match=r'data\.name') as error:
    teacher_lib.check_teacher(teacher, student, '/t')
  assert 'model.ch' not in str(error.value)


def test_sample_cli_heun_on_the_teacher(teacher_dir, tmp_path):
  out = tmp_path / 'teacher.npz'
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or '')
  cmd = [sys.executable, '-m', 'cm_jax.sample', f'--workdir={teacher_dir}', '--num=3', '--sampler=heun',
         '--steps=4', '--seed=2', f'--out={out}']
  result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'EDM heun sampler, 4 steps (7 network calls)' in result.stderr
  np.testing.assert_array_equal(np.load(out)['arr_0'], inference.load(teacher_dir).sample(3, steps=4, seed=2))
  bad = subprocess.run(cmd[:-1] + [f'--out={out}', '--sampler=consistency'], capture_output=True, text=True,
                       env=env, timeout=600)
  assert bad.returncode != 0 and "sample it with 'heun' or 'euler'" in bad.stderr


def test_cd_resume_refuses_a_teacher_that_changed(teacher_dir, tmp_path):
  """The teacher trained on after the student started: resuming against its new latest step is refused."""
  own_teacher = tmp_path / 'teacher'
  shutil.copytree(teacher_dir, own_teacher)
  cd_dir = tmp_path / 'cd'
  run(tiny('cd', str(own_teacher), **{'training.num_steps': 2}), cd_dir)
  run(tiny('edm', **{'training.num_steps': 6}), own_teacher)  # The teacher goes on to step 6.
  with pytest.raises(ValueError, match=r'started with the teacher at step 4 .* now gives step 6 .*'
                                       r'--config.teacher.step=4'):
    run(tiny('cd', str(own_teacher)), cd_dir)
  state = run(tiny('cd', str(own_teacher), **{'teacher.step': 4}), cd_dir)  # Pinned: resumes.
  assert int(state.step) == 4
