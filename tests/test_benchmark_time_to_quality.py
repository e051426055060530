"""benchmarks/time_to_quality.py: budget sizing, recipe parsing, and one tiny end-to-end run of a two-stage
recipe (EDM teacher, then ECT) next to a stand-in PyTorch reference, on the local Fashion-MNIST files."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, 'benchmarks', 'time_to_quality.py')
sys.path.insert(0, os.path.join(REPO_ROOT, 'benchmarks'))
import time_to_quality  # pylint: disable=g-import-not-at-top,wrong-import-position

# Writes what the real reference writes: N zero-padded 32x32 uint8 images under arr_0, a 'trained' line.
FAKE_REFERENCE = textwrap.dedent('''
    import argparse, os, numpy as np
    ap = argparse.ArgumentParser(); ap.add_argument("out"); ap.add_argument("--minutes", type=float)
    ap.add_argument("--num", type=int); a = ap.parse_args()
    images = np.random.default_rng(0).integers(0, 256, (a.num, 28, 28, 1)).astype(np.uint8)
    os.makedirs(a.out, exist_ok=True)
    np.savez(os.path.join(a.out, "edm_heun18.npz"), arr_0=np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0))))
    print(f"trained 7 steps in {a.minutes * 60:.0f}s", flush=True)
''')


def run(*args, timeout=900):
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                        cwd=REPO_ROOT)


def test_num_steps_fill_the_budget_after_the_overhead():
  # 600 s, 40 s of overhead, 0.25 s per step, 5% more in the loop: 560 / 0.2625 = 2133.3 -> 2133 steps.
  assert time_to_quality.num_steps_for(600.0, 0.25, 40.0, 1.05) == 2133
  assert time_to_quality.num_steps_for(30.0, 0.25, 40.0, 1.05) == 1  # Less than the overhead: one step.
  assert time_to_quality.num_steps_for(10.0, 0.5, 0.0, 1.0) == 20


def test_overrides_take_the_step_count():
  assert time_to_quality.fill_in('--config.loss.ect_stage_steps={num_steps//5}', 2900) == (
      '--config.loss.ect_stage_steps=580')
  assert time_to_quality.fill_in('--config.x={max(1, num_steps // 4)}', 2) == '--config.x=1'
  assert time_to_quality.fill_in('--config.model.ch_mult=(1,2)', 7) == '--config.model.ch_mult=(1,2)'


def test_recipe_parsing():
  (one,) = time_to_quality.parse_recipe('configs/fashion_mnist_ct.py|--config.model.ch=32|--config.x=(1,2)')
  assert one == {'config': 'configs/fashion_mnist_ct.py', 'overrides': ['--config.model.ch=32', '--config.x=(1,2)'],
                 'fraction': 1.0}
  two = time_to_quality.parse_recipe('configs/test.py:edm@0.4; configs/test.py:ect|--config.optim.lr=1e-3@0.6')
  assert [(s['config'], s['overrides'], s['fraction']) for s in two] == [
      ('configs/test.py:edm', [], 0.4), ('configs/test.py:ect', ['--config.optim.lr=1e-3'], 0.6)]
  for bad, message in [('configs/test.py@0.5;configs/test.py@0.4', 'summing to 1'),
                       ('configs/test.py;configs/test.py', 'needs @fraction'),
                       ('configs/test.py@half', "'half' after @ is not a fraction"),
                       ('configs/nope.py', 'config configs/nope.py does not exist'),
                       (' ; ', '--recipe is empty'),
                       ('configs/test.py|--config.loss.s1={num_stepz}', r'cannot evaluate \{num_stepz\}')]:
    with pytest.raises(time_to_quality.BenchmarkError, match=message):
      time_to_quality.parse_recipe(bad)


def test_two_stage_recipe_next_to_the_reference(tmp_path):
  reference = tmp_path / 'reference.py'
  reference.write_text(FAKE_REFERENCE)
  out_dir = tmp_path / 'out'
  args = [f'--out={out_dir}', '--minutes=0.005', '--overhead_s=0', '--loop_factor=1', '--calibration_steps=2',
          '--recipe=configs/test.py:edm|--config.data.source=local@0.5;'
          'configs/test.py:ect|--config.data.source=local|--config.loss.ect_stage_steps={max(1, num_steps // 2)}@0.5',
          f'--torch_python={sys.executable}', f'--reference={reference}', '--num=12',
          f'--eval_args=--batch_size=6|--cache_dir={tmp_path}/cache|--num_reference=200']
  first = run(*args)
  assert first.returncode == 0, first.stderr[-3000:]
  records = [json.loads(line) for line in first.stdout.splitlines()]
  assert [r.get('system') for r in records] == ['cm_jax', 'pytorch', None]
  cm, torch, summary = records
  teacher, student = cm['stages']
  for stage in cm['stages']:
    assert stage['budget_s'] == 0.15  # Half of 0.005 minutes.
    assert stage['num_steps'] == time_to_quality.num_steps_for(0.5 * 0.005 * 60, stage['calibrated_step_s'], 0.0,
                                                               1.0)
    assert stage['wall_s'] > 0 and os.path.isdir(os.path.join(stage['workdir'], 'checkpoints'))
  assert cm['checkpoint_step'] == student['num_steps']
  # The student was tuned from the first stage's run.
  with open(os.path.join(cm['stages'][1]['workdir'].rsplit('/', 1)[0], 'stage1.log')) as f:
    assert teacher['workdir'] in f.read()
  assert [(s['sampler'], s['steps']) for s in cm['scores']] == [('consistency', 1), ('consistency', 2)]
  assert torch['trained'] == 'trained 7 steps in 0s' and [s['sampler'] for s in torch['scores']] == ['external']
  for s in cm['scores'] + torch['scores']:
    assert s['classifier_fd'] > 0 and 0 <= s['precision'] <= 1 and 0 <= s['class_balance_tv'] <= 0.9
  assert cm['cpu'] == torch['cpu'] and cm['num'] == 12 and 'load_after' in cm
  (row,) = summary['rows']
  assert row == {'minutes': 0.005, 'cm_jax_1step_fd': round(cm['scores'][0]['classifier_fd'], 2),
                 'cm_jax_2step_fd': round(cm['scores'][1]['classifier_fd'], 2),
                 'pytorch_heun18_fd': round(torch['scores'][0]['classifier_fd'], 2)}

  again = run(*args, timeout=120)  # Finished runs are reused, not retrained.
  assert again.returncode == 0, again.stderr[-3000:]
  reused = [json.loads(line) for line in again.stdout.splitlines()]
  assert reused[0]['reused'] is True and reused[0]['scores'] == cm['scores'] and reused[2] == summary

  os.remove(out_dir / 'pytorch_0.005min' / 'result.json')  # As a run killed half-way leaves it.
  unfinished = run(*args, timeout=120)
  assert unfinished.returncode == 2
  assert unfinished.stderr.strip().splitlines()[-1] == (
      f'time_to_quality.py: error: {out_dir}/pytorch_0.005min exists without result.json (an unfinished run); '
      'move it away or give another --out.')


def test_bad_flags_are_one_error_line(tmp_path):
  for args, message in [(['--minutes=ten'], '--minutes=ten: give comma-separated numbers'),
                        (['--minutes=0'], '--minutes=0: give positive budgets'),
                        (['--torch_python=/nonexistent/python'], '--torch_python /nonexistent/python does not exist.'),
                        (['--recipe=configs/nope.py'], 'config configs/nope.py does not exist')]:
    out = run(f'--out={tmp_path}/o', *args, timeout=60)
    assert out.returncode == 2, (args, out.stderr[-2000:])
    assert out.stdout == ''
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith('time_to_quality.py: error: ') and message in last, (args, last)


def test_summary_row_has_one_column_per_sampler_and_step_count():
  records = {'cm_jax': {'scores': [{'sampler': 'meanflow', 'steps': 1, 'classifier_fd': 56.04},
                                   {'sampler': 'meanflow', 'steps': 2, 'classifier_fd': 57.4}]},
             'pytorch': {'scores': [{'sampler': 'external', 'steps': 35, 'classifier_fd': 70.7}]}}
  assert time_to_quality.summary_row(30.0, records) == {
      'minutes': 30.0, 'cm_jax_1step_fd': 56.04, 'cm_jax_2step_fd': 57.4, 'pytorch_heun18_fd': 70.7}
