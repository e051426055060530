"""cm_jax's default XLA CPU options (cm_jax/runtime/xla_flags.py): merged into XLA_FLAGS, never over the user's."""

import os
import subprocess
import sys

import jaxlib

from cm_jax.runtime import xla_flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAG = xla_flags.CPU_DEFAULTS[0][0]
VALUE = xla_flags.CPU_DEFAULTS[0][1]


def test_flag_names_parses_an_xla_flags_string():
  assert xla_flags.flag_names('--a=1  --b --c=x=y junk') == {'a', 'b', 'c'}
  assert xla_flags.flag_names('') == set()


def test_defaults_are_appended_after_the_users_flags():
  assert xla_flags.merged('') == f'--{FLAG}={VALUE}'
  assert xla_flags.merged(' --xla_force_host_platform_device_count=2 ') == (
      f'--xla_force_host_platform_device_count=2 --{FLAG}={VALUE}')


def test_a_flag_the_user_set_is_kept_as_is():
  mine = f'--{FLAG}=dot --other=1'
  assert xla_flags.merged(mine) == mine
  new, reason = xla_flags.decide({'XLA_FLAGS': mine}, '0.10.2', backend_started=False)
  assert new is None and 'already set' in reason


def test_decide_applies_only_to_tested_jaxlib_releases_and_before_the_backend_starts():
  new, reason = xla_flags.decide({}, '0.10.2', backend_started=False)
  assert new == f'--{FLAG}={VALUE}' and reason == f'XLA_FLAGS={new}'
  new, reason = xla_flags.decide({}, '0.11.0', backend_started=False)
  assert new is None and 'jaxlib 0.11.0 is not one of the tested releases' in reason
  new, reason = xla_flags.decide({}, '0.10.2', backend_started=True)
  assert new is None and 'already started' in reason


def test_the_opt_out_variable_turns_the_defaults_off():
  for off in ('0', 'false', 'OFF', 'no'):
    new, reason = xla_flags.decide({xla_flags.OPT_OUT: off}, '0.10.2', backend_started=False)
    assert new is None and xla_flags.OPT_OUT in reason
  new, _ = xla_flags.decide({xla_flags.OPT_OUT: '1'}, '0.10.2', backend_started=False)
  assert new is not None


def test_apply_changes_only_the_given_environment():
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  reason = xla_flags.apply(env)  # This test session's backend has started (conftest imports jax and uses it).
  assert env['XLA_FLAGS'].startswith('--xla_force_host_platform_device_count=2')
  assert reason


def test_the_installed_jaxlib_is_a_tested_release():
  """If this fails after a JAX upgrade, check that every CPU_DEFAULTS flag still exists (an unknown XLA flag
  aborts the process), re-measure it with benchmarks/train_step.py, and add the release to TESTED_JAXLIB."""
  assert jaxlib.__version__.startswith(xla_flags.TESTED_JAXLIB), jaxlib.__version__


def test_a_fresh_process_starts_jax_with_the_defaults_and_computes():
  """The real thing: importing cm_jax.inference before any computation puts the flag in place, and XLA
  accepts it (an unknown flag would abort the process)."""
  code = ('import os, jax, jax.numpy as jnp\n'
          'from cm_jax import inference\n'
          'x = jnp.ones((2, 6, 6, 4)); w = jnp.ones((3, 3, 4, 4))\n'
          'g = jax.grad(lambda w: jnp.sum(jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", '
          'dimension_numbers=("NHWC", "HWIO", "NHWC"))))(w)\n'
          'print(os.environ["XLA_FLAGS"]); print(float(g.sum()))\n')
  env = dict(os.environ, XLA_FLAGS='', PYTHONPATH=REPO_ROOT)
  env.pop(xla_flags.OPT_OUT, None)
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  flags_line, total = out.stdout.split()[-2:]
  assert flags_line == f'--{FLAG}={VALUE}'
  # d sum(conv(ones, w)) / dw[i, j, c, o] = 2 images x the 6x6 positions where tap (i, j) stays inside the
  # image (36 at the centre, 30 at an edge tap, 25 at a corner tap): 2 x 256 per (c, o) pair, 16 pairs.
  assert float(total) == 2 * (36 + 4 * 30 + 4 * 25) * 16
