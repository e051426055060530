"""The training CLI: config files, type-checked overrides, unknown keys, required flags."""

import json
import os
import subprocess
import sys

import jax

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_train(*args):
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or '')
  return subprocess.run([sys.executable, '-m', 'cm_jax.train', *args], capture_output=True, text=True,
                        cwd=REPO_ROOT, env=env, timeout=900)


def test_override_with_wrong_type_fails(tmp_path):
  result = run_train('--config=configs/test.py', f'--workdir={tmp_path}', '--config.optim.lr=fast')
  assert result.returncode != 0
  assert 'optim.lr' in result.stderr and 'fast' in result.stderr
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_unknown_key_fails(tmp_path):
  result = run_train('--config=configs/test.py', f'--workdir={tmp_path}', '--config.optim.learning_rate=1e-3')
  assert result.returncode != 0
  assert 'learning_rate' in result.stderr


def test_missing_workdir_is_a_usage_error():
  result = run_train('--config=configs/test.py')
  assert result.returncode != 0 and '--workdir' in result.stderr


def test_overrides_reach_the_run_and_its_checkpoint(tmp_path):
  result = run_train('--config=configs/test.py', f'--workdir={tmp_path}', '--config.optim.lr=2e-4',
                     '--config.training.num_steps=2', '--config.data.source=local',
                     '--config.model.embedding=positional')
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / 'checkpoints' / '2' / 'config' / 'metadata') as f:
    saved = json.load(f)
  assert saved['optim']['lr'] == 2e-4 and saved['model']['embedding'] == 'positional'
  assert 'No checkpoint' in result.stderr and 'starting from step 0' in result.stderr
  again = run_train('--config=configs/test.py', f'--workdir={tmp_path}', '--config.optim.lr=2e-4',
                    '--config.training.num_steps=2', '--config.data.source=local',
                    '--config.model.embedding=positional')
  assert again.returncode == 0 and 'Resuming from the checkpoint at step 2' in again.stderr
