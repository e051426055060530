"""Packaging: the wheel's contents, the accelerator extras, and cm_jax used from outside the repository."""

import glob
import json
import os
import shutil
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax import checkpointing
from cm_jax import train_state as ts
from cm_jax.configs import default
from cm_jax.configs import test as test_config

tomllib = pytest.importorskip('tomllib')  # Python >= 3.11.
requirements = pytest.importorskip('packaging.requirements')

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_NAMES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO_ROOT, 'cm_jax', 'configs', '*.py')))


@pytest.fixture(scope='module')
def wheel(tmp_path_factory) -> str:
  """A wheel built from a copy of the source tree (so no build/ or egg-info lands in the repository)."""
  root = tmp_path_factory.mktemp('wheel')
  source = root / 'src'
  shutil.copytree(REPO_ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
      '.git', '.venv', 'build', 'workdirs', '*.egg-info', '__pycache__', '.pytest_cache'))
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w',
                  str(root / 'dist'), str(source)], check=True, capture_output=True, timeout=300)
  (path,) = glob.glob(str(root / 'dist' / 'cm_jax-*.whl'))
  return path


def test_wheel_ships_configs_inside_cm_jax_only(wheel):
  with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    top_level = z.read(next(n for n in names if n.endswith('.dist-info/top_level.txt'))).decode().split()
  assert top_level == ['cm_jax']
  assert sorted({n.split('/')[0] for n in names if not n.split('/')[0].endswith('.dist-info')}) == ['cm_jax']
  assert 'cm_jax/configs/default.py' in names and 'cm_jax/configs/fashion_mnist_ct.py' in names
  assert sorted(n.split('/')[-1] for n in names if n.startswith('cm_jax/configs/')) == CONFIG_NAMES


def test_accelerator_extras_are_declared():
  with open(os.path.join(REPO_ROOT, 'pyproject.toml'), 'rb') as f:
    project = tomllib.load(f)['project']
  extras = project['optional-dependencies']
  for extra in ('cuda12', 'tpu'):
    (req,) = (requirements.Requirement(r) for r in extras[extra])
    assert req.name == 'jax' and req.extras == {extra}, req
    assert req.specifier.contains('0.10.2') and not req.specifier.contains('0.4.30'), req
  assert not requirements.Requirement(extras['tpu'][0]).specifier.contains('0.5.0')  # libtpu on PyPI: 0.5.1+.
  assert any(requirements.Requirement(r).name == 'etils' for r in project['dependencies'])
  assert [requirements.Requirement(r).name for r in extras['gcs']] == ['google-cloud-storage']


def test_repo_root_configs_is_a_link_to_the_package():
  link = os.path.join(REPO_ROOT, 'configs')
  assert os.path.islink(link) and os.readlink(link) == os.path.join('cm_jax', 'configs')
  assert os.path.samefile(os.path.join(link, 'fashion_mnist_ct.py'),
                          os.path.join(REPO_ROOT, 'cm_jax', 'configs', 'fashion_mnist_ct.py'))


def _checksum(tree) -> float:
  return float(sum(np.asarray(leaf, np.float64).sum() for leaf in jax.tree.leaves(tree)))


@pytest.fixture(scope='module')
def saved_run(tmp_path_factory):
  """A workdir holding one checkpoint of the tiny config (an initial state, no training), at step 7; its
  first sampling EMA differs from the online parameters. Returns (workdir, checksum of that EMA)."""
  workdir = str(tmp_path_factory.mktemp('saved_run') / 'run')
  config = test_config.get_config()
  state = ts.init_state(config, ts.make_optimizer(config))
  ema = jax.tree.map(lambda p: p + 0.5, state.params)
  state = state.replace(step=jnp.asarray(7, jnp.int32), ema_params=(ema,) + tuple(state.ema_params[1:]))
  manager = checkpointing.make_manager(workdir, config)
  checkpointing.save(manager, state, config, {'name': 'packaging test'})
  manager.wait_until_finished()
  manager.close()
  return workdir, _checksum(ema)


# Run in a fresh interpreter whose working directory is outside the repository.
_OUTSIDE = r'''
import importlib.util, json, os, sys
import jax, numpy as np
repo, workdir = sys.argv[1], sys.argv[2]
assert not any(os.path.abspath(p or '.') == repo for p in sys.path), sys.path
import cm_jax
from cm_jax import inference
from cm_jax.configs import common as config_lib
config = config_lib.config_from_json_dict({'model': {'ch': 8}})
model = inference.load(workdir)
print(json.dumps(dict(
    cm_jax=cm_jax.__file__, configs_found=importlib.util.find_spec('configs') is not None,
    ch=config.model.ch, default_lr=config.optim.lr, step=model.step, which=model.which_params,
    checksum=float(sum(np.asarray(x, np.float64).sum() for x in jax.tree.leaves(model.params))))))
'''


def _run_outside(cwd, workdir: str, pythonpath: str = '') -> dict:
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  if pythonpath:
    env['PYTHONPATH'] = pythonpath
  result = subprocess.run([sys.executable, '-c', _OUTSIDE, REPO_ROOT, workdir], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('install', ['wheel', 'venv'])
def test_cm_jax_loads_a_run_from_outside_the_repository(install, wheel, saved_run, tmp_path):
  """The wheel (unpacked onto PYTHONPATH), or the package installed in this venv (editable or not)."""
  workdir, ema_checksum = saved_run
  site = ''
  if install == 'wheel':
    site = str(tmp_path / 'site')
    with zipfile.ZipFile(wheel) as z:  # A pure-Python wheel: unpacking it is installing it.
      z.extractall(site)
  cwd = tmp_path / 'elsewhere'
  cwd.mkdir()
  out = _run_outside(cwd, workdir, site)
  if install == 'wheel':
    assert out['cm_jax'].startswith(site)
  # No stray top-level `configs` package (a venv installed before configs moved needs `pip install -e .`).
  assert not out['configs_found']
  assert out['ch'] == 8
  assert out['default_lr'] == default.get_config().optim.lr  # Fields the JSON lacks come from the defaults.
  assert (out['step'], out['which']) == (7, 'ema_0.9')
  assert out['checksum'] == pytest.approx(ema_checksum, rel=1e-6)
