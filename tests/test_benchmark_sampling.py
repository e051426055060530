"""benchmarks/sampling.py: one JSON line per (sampler, batch size) on the tiny config; bad flags refused."""

import json
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, 'benchmarks', 'sampling.py')
KEYS = {'config', 'sampler', 'steps', 'network_calls', 'batch_size', 'num', 'compile_s', 'sample_s',
        'images_per_s', 'seconds_per_10k', 'params', 'backend', 'devices', 'cpu', 'xla_flags', 'jax_version'}


def run(*args):
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=600,
                        cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=REPO_ROOT))


def test_every_sampler_at_two_batch_sizes():
  out = run('--config=configs/test.py', '--num=10', '--num_heun=4', '--batch_sizes=4,8')
  assert out.returncode == 0, out.stderr[-3000:]
  records = [json.loads(line) for line in out.stdout.splitlines()]  # stdout holds only JSON lines.
  assert [(r['sampler'], r['batch_size']) for r in records] == [
      ('onestep', 4), ('onestep', 8), ('twostep', 4), ('twostep', 8), ('heun', 4), ('heun', 8)]
  diffusion_steps = 4  # configs/test.py's sampling.diffusion_steps
  for r in records:
    assert set(r) == KEYS
    assert r['network_calls'] == {'onestep': 1, 'twostep': 2, 'heun': 2 * diffusion_steps - 1}[r['sampler']]
    assert r['num'] == (4 if r['sampler'] == 'heun' else 10)
    assert r['sample_s'] > 0 and r['images_per_s'] > 0 and r['compile_s'] > 0
    # sample_s is rounded to 1 ms, seconds_per_10k (from the unrounded time) to 10 ms.
    assert abs(r['seconds_per_10k'] - r['sample_s'] * 10000 / r['num']) <= 0.0005 * 10000 / r['num'] + 0.006
    assert r['config'] == 'configs/test.py' and r['params'] > 0


def test_unknown_sampler_is_one_error_line():
  out = run('--samplers=onestep,bogus')
  assert out.returncode == 2
  assert out.stdout == ''
  assert out.stderr.strip().splitlines()[-1] == (
      'sampling.py: error: --samplers/--batch_sizes/--num: unknown bogus; choose from onestep, twostep, heun.')
