r"""Time to quality: the score a recipe reaches after a wall-clock training budget, next to the PyTorch
reference's at the same budgets, on the same machine; prints JSON lines.

  python benchmarks/time_to_quality.py --out=DIR --minutes=10,30,60 \
      [--recipe='configs/fashion_mnist_ct.py'] [--torch_python=/tmp/venv-torch/bin/python] [--num=2000]
  # a teacher and its student inside one budget (40% / 60% of it):
  python benchmarks/time_to_quality.py --out=DIR --minutes=30 \
      --recipe='configs/fashion_mnist_edm.py@0.4;configs/fashion_mnist_ect.py@0.6'

For each budget (minutes), in order:
1. cm_jax: the recipe is a ';'-separated list of stages, each `path[|--config.a=1|...][@fraction]` (the
   fractions of the budget sum to 1; one stage takes all of it). A stage after the first trains with
   `--config.teacher.workdir=` the previous stage's run (a CD or ECT student of an EDM teacher). An override
   may use the stage's step count in braces, e.g. `--config.loss.ect_stage_steps={num_steps//5}` (max, min,
   int and round are at hand). Each stage's `training.num_steps` is sized from its measured step time:
   `benchmarks/train_step.py` times the compiled step (not counted in the budget), then
   num_steps = (fraction x budget - overhead_s) / (step_s x loop_factor). `overhead_s` (process start, data
   loading, compilation, sample grids, checkpoints) and
   `loop_factor` (data and logging inside the loop) default to what a 10-minute Fashion-MNIST run measured on
   a 2-core CPU; the record says how long each stage really took (`wall_s`, the whole process) against its
   share of the budget, so a sizing that missed is visible, not hidden. Sample grids and checkpoints are
   written 4 times per stage. Then `python -m cm_jax.evaluate --workdir=LAST_STAGE --num=N` scores one-step
   and two-step samples (a teacher-only recipe: its Heun sampler).
2. PyTorch (with --torch_python): the reference trains for the same minutes and samples with Heun, 18 steps
   (35 network calls); `cm_jax.evaluate --samples=... --crop=2` scores its samples with the same classifier
   and reference set (the evaluation config of the recipe's last stage).

Each run lives in OUT/cm_jax_<minutes>min or OUT/pytorch_<minutes>min and writes result.json there; a rerun
with the same --out reuses finished results (runs take hours) and refuses a run directory left unfinished.
Every record has the scores of each sampler (classifier FD, precision, recall, class balance), the CPU model
and the load average before and after; the last line is a summary table (one row per budget).
Run it on an otherwise idle machine: the budget is wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

from machine import cpu_model, load_average  # benchmarks/machine.py, beside this script.
from vs_pytorch import json_lines  # benchmarks/vs_pytorch.py: the JSON lines of a command's stdout.

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_REFERENCE = os.path.join(os.path.dirname(REPO_ROOT), 'shared', 'peers', 'pytorch_edm_reference.py')
SCORE_KEYS = ('sampler', 'steps', 'times', 'classifier_fd', 'precision', 'recall', 'class_balance_tv')
SAFE_BUILTINS = {'max': max, 'min': min, 'int': int, 'round': round}


class BenchmarkError(Exception):
  """A user error: one line on stderr, exit code 2."""


def parse_recipe(text: str) -> list[dict]:
  """'a.py|--config.x=1@0.4;b.py@0.6' -> [{'config', 'overrides', 'fraction'}, ...]."""
  stages = []
  for spec in [s.strip() for s in text.split(';') if s.strip()]:
    fraction = None
    if '@' in spec:
      spec, tail = spec.rsplit('@', 1)
      try:
        fraction = float(tail)
      except ValueError:
        raise BenchmarkError(f'--recipe: {tail!r} after @ is not a fraction of the budget (e.g. @0.4).') from None
    path, *overrides = spec.split('|')
    for override in overrides:
      fill_in(override, 1000)  # A bad {expression} fails now, not after hours of training.
    stages.append({'config': path.strip(), 'overrides': [o.strip() for o in overrides], 'fraction': fraction})
  if not stages:
    raise BenchmarkError('--recipe is empty; give at least one config, e.g. configs/fashion_mnist_ct.py.')
  if len(stages) == 1 and stages[0]['fraction'] is None:
    stages[0]['fraction'] = 1.0
  fractions = [s['fraction'] for s in stages]
  if any(f is None or f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
    raise BenchmarkError(f'--recipe: every stage of a multi-stage recipe needs @fraction > 0, summing to 1 '
                         f'(got {fractions}).')
  for stage in stages:
    path = config_file(stage['config'])
    if os.path.exists(path) and not os.path.exists(os.path.join(REPO_ROOT, path)):
      stage['config'] = os.path.abspath(path) + stage['config'][len(path):]  # The runs start in REPO_ROOT.
    elif not os.path.exists(os.path.join(REPO_ROOT, path)):
      raise BenchmarkError(f'--recipe: config {stage["config"]} does not exist.')
  return stages


def config_file(config: str) -> str:
  """'configs/test.py:ect' (a config file with its get_config argument) -> 'configs/test.py'."""
  return config.split(':', 1)[0]


def num_steps_for(seconds: float, step_s: float, overhead_s: float, loop_factor: float) -> int:
  """Steps that fit in `seconds` of wall time: what is left after the fixed overhead, per looped step."""
  return max(1, int((seconds - overhead_s) / (step_s * loop_factor)))


def fill_in(override: str, num_steps: int) -> str:
  """Replaces each {expression of num_steps} in an override with its integer value."""
  def value(match):
    try:
      return str(int(eval(match.group(1), {'__builtins__': SAFE_BUILTINS}, {'num_steps': num_steps})))  # pylint: disable=eval-used
    except Exception as e:  # pylint: disable=broad-except
      raise BenchmarkError(f'--recipe: cannot evaluate {{{match.group(1)}}} in {override} ({e}).') from None
  return re.sub(r'\{([^{}]*)\}', value, override)


def run(command: list[str], log_path: str | None = None) -> tuple[str, float]:
  """Runs a command from the repository root; returns its stdout and wall time. stderr goes to log_path."""
  start = time.perf_counter()
  with open(log_path or os.devnull, 'w') as log:
    proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO_ROOT)
  wall = time.perf_counter() - start
  if proc.returncode != 0:
    tail = ''
    if log_path:
      with open(log_path) as f:
        tail = f.read()[-3000:]
    sys.stderr.write(tail)
    raise BenchmarkError(f'{" ".join(command)} exited with {proc.returncode} (its log: {log_path}).')
  return proc.stdout, wall


def evaluate(args, run_dir: str, what: list[str]) -> tuple[list[dict], dict, float]:
  """`python -m cm_jax.evaluate` on `what` (a workdir or a samples file): the scores, its JSON, its wall time."""
  out, wall = run([sys.executable, '-m', 'cm_jax.evaluate', *what, f'--num={args.num}',
                   f'--output={os.path.join(run_dir, "evaluate.json")}'] + args.eval_args,
                  os.path.join(run_dir, 'evaluate.log'))
  evaluation = json.loads(out)
  return [{k: r.get(k) for k in SCORE_KEYS} for r in evaluation['results']], evaluation, wall


def calibrate(stage: dict, steps: int) -> float:
  """Median seconds per compiled train step of the stage's config (benchmarks/train_step.py)."""
  out, _ = run([sys.executable, os.path.join(REPO_ROOT, 'benchmarks', 'train_step.py'),
                f'--config={stage["config"]}', f'--steps={steps}', '--warmup=2'] +
               [fill_in(o, 1000) for o in stage['overrides']])  # Step counts do not change the step's cost.
  (record,) = json_lines(out)
  return float(record['step_s'])


def cm_jax_run(args, stages: list[dict], minutes: float, run_dir: str) -> dict:
  budget_s = minutes * 60.0
  done, previous = [], None
  for index, stage in enumerate(stages):
    step_s = calibrate(stage, args.calibration_steps)
    num_steps = num_steps_for(stage['fraction'] * budget_s, step_s, args.overhead_s, args.loop_factor)
    every = max(1, num_steps // 4)
    workdir = os.path.join(run_dir, f'stage{index}')
    command = [sys.executable, '-m', 'cm_jax.train', f'--config={stage["config"]}', f'--workdir={workdir}',
               f'--config.training.num_steps={num_steps}', f'--config.training.eval_every={every}',
               f'--config.training.checkpoint_every={every}'] + [fill_in(o, num_steps) for o in stage['overrides']]
    if previous is not None:
      command.append(f'--config.teacher.workdir={previous}')
    print(f'time_to_quality: {minutes:g} min, stage {index}: {stage["config"]} {" ".join(stage["overrides"])} '
          f'for {num_steps} steps ({step_s:.3f} s per step)', file=sys.stderr, flush=True)
    _, wall = run(command, os.path.join(run_dir, f'stage{index}.log'))
    done.append(dict(stage, num_steps=num_steps, calibrated_step_s=step_s, budget_s=round(stage['fraction'] *
                                                                                          budget_s, 3),
                     wall_s=round(wall, 1), workdir=workdir))
    previous = workdir
  scored, evaluation, eval_wall = evaluate(args, run_dir, [f'--workdir={previous}'])
  return {'stages': done, 'train_wall_s': round(sum(s['wall_s'] for s in done), 1),
          'evaluate_s': round(eval_wall, 1), 'scores': scored, 'checkpoint_step': evaluation.get('checkpoint_step')}


def pytorch_run(args, stages: list[dict], minutes: float, run_dir: str) -> dict:
  out, wall = run([args.torch_python, args.reference, run_dir, '--minutes', f'{minutes:g}', '--num',
                   str(args.num)], os.path.join(run_dir, 'reference.log'))
  with open(os.path.join(run_dir, 'reference.out'), 'w') as f:  # Its progress: 'step 50 loss ...', 'trained ...'.
    f.write(out)
  trained = [line for line in out.splitlines() if line.startswith('trained ')]
  eval_config = os.path.splitext(os.path.basename(config_file(stages[-1]['config'])))[0]
  samples = os.path.join(run_dir, 'edm_heun18.npz')
  scored, _, eval_wall = evaluate(args, run_dir, [f'--samples={samples}', '--crop=2',
                                                 f'--eval_config={eval_config}'])
  return {'train_wall_s': round(wall, 1), 'trained': trained[-1] if trained else None,
          'sampler_note': 'EDM Heun, 18 steps (35 network calls)', 'evaluate_s': round(eval_wall, 1),
          'scores': scored}


def summary_row(minutes: float, records: dict) -> dict:
  row = {'minutes': minutes}
  for system, record in records.items():
    for s in record['scores']:
      name = {'consistency': f'{s["steps"]}step', 'meanflow': f'{s["steps"]}step',  # One column per step count.
              'external': 'heun18'}.get(s['sampler'], s['sampler'])
      row[f'{system}_{name}_fd'] = round(s['classifier_fd'], 2)
  return row


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='Directory of the runs and their result.json files.')
  parser.add_argument('--minutes', default='10,30,60', help='Comma-separated wall-clock training budgets.')
  parser.add_argument('--recipe', default='configs/fashion_mnist_ct.py',
                      help="';'-separated stages 'path[|--config.a=1|...][@fraction]'.")
  parser.add_argument('--torch_python', default=None, help='Python of a venv with torch, numpy and diffusers; '
                      'without it only cm_jax runs.')
  parser.add_argument('--reference', default=DEFAULT_REFERENCE, help='pytorch_edm_reference.py')
  parser.add_argument('--num', type=int, default=2000, help='Samples scored per sampler.')
  parser.add_argument('--overhead_s', type=float, default=40.0,
                      help='Seconds per stage not spent in train steps (start-up, compilation, grids).')
  parser.add_argument('--loop_factor', type=float, default=1.05,
                      help='Wall time of a step in the training loop / the compiled step alone.')
  parser.add_argument('--calibration_steps', type=int, default=20)
  parser.add_argument('--eval_args', default='', help="Extra flags for every cm_jax.evaluate call, '|'-separated "
                      "(e.g. '--cache_dir=DIR|--num_reference=2000').")
  args = parser.parse_args()
  try:
    stages = parse_recipe(args.recipe)
    try:
      budgets = [float(m) for m in args.minutes.split(',') if m.strip()]
    except ValueError:
      raise BenchmarkError(f'--minutes={args.minutes}: give comma-separated numbers, e.g. 10,30,60.') from None
    if not budgets or min(budgets) <= 0:
      raise BenchmarkError(f'--minutes={args.minutes}: give positive budgets, e.g. 10,30,60.')
    if args.torch_python is not None:
      for path, what in ((args.torch_python, '--torch_python'), (args.reference, '--reference')):
        if not os.path.exists(path):
          raise BenchmarkError(f'{what} {path} does not exist.')
      args.torch_python, args.reference = os.path.abspath(args.torch_python), os.path.abspath(args.reference)
    args.eval_args = [a for a in args.eval_args.split('|') if a]
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for minutes in budgets:
      records = {}
      systems = [('cm_jax', cm_jax_run)] + ([('pytorch', pytorch_run)] if args.torch_python else [])
      for system, fn in systems:
        run_dir = os.path.abspath(os.path.join(args.out, f'{system}_{minutes:g}min'))
        result_path = os.path.join(run_dir, 'result.json')
        if os.path.exists(result_path):
          with open(result_path) as f:
            record = dict(json.load(f), reused=True)
        else:
          if os.path.exists(run_dir):
            raise BenchmarkError(f'{run_dir} exists without result.json (an unfinished run); move it away or '
                                 'give another --out.')
          os.makedirs(run_dir)
          load_before = load_average()
          record = {'system': system, 'minutes': minutes, 'budget_s': minutes * 60.0, 'recipe': args.recipe,
                    'num': args.num, 'cpu': cpu_model(), 'cores': os.cpu_count(), 'load_before': load_before}
          record.update(fn(args, stages, minutes, run_dir))
          record.update(load_after=load_average(), date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()))
          with open(result_path, 'w') as f:
            json.dump(record, f, indent=1)
        print(json.dumps(record), flush=True)
        records[system] = record
      rows.append(summary_row(minutes, records))
    print(json.dumps({'summary': True, 'recipe': args.recipe, 'cpu': cpu_model(), 'rows': rows}), flush=True)
  except BenchmarkError as e:
    print(f'time_to_quality.py: error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
