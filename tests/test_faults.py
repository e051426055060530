"""Fault injection: the real CLIs (`python -m cm_jax.train` / `cm_jax.sample`) in subprocesses on the tiny config,
hit by kill -9, SIGTERM and SIGINT at several points, by damaged checkpoint files, by a diverging loss, by a full
disk and by a second trainer on the same workdir.

What every case checks is the documented contract, not the timing of the fault:
- SIGTERM or the first SIGINT: the run stops after the step reached, saves a checkpoint there, logs
  'Stopped by SIGINT after step K' and exits 0; the same command then logs 'Resuming from the checkpoint at
  step K' and ends with a final checkpoint bit-identical to the uninterrupted run's (every array of the train
  state: params, target, EMAs, optimizer state, rng, step).
- kill -9 anywhere (while compiling, mid-training, mid-save, right after a save): the same command resumes from
  the last complete checkpoint (taking over the dead run's lock) and ends bit-identical.
- A damaged checkpoint is skipped (with a warning and an older one used) or refused in one clear line; a
  refusal or a failed save never deletes an older checkpoint, and a half-written one never passes as valid.
- A user-facing failure ends with ONE line `cm_jax.train: error: ...` on stderr, exit 1, no traceback.

Runs happen in a pool of two worker threads (the machine has 2 cores), all started by a module fixture; each
test waits for its own scenario, which raises what it found. Every run uses the same flags (schedule horizons
pinned, so runs of any num_steps compose), a fresh workdir, and the compilation cache of the test session.
"""

import concurrent.futures
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Optional, Union

import jax
import numpy as np
import pytest

from cm_jax import checkpointing
import checkpoint_utils

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
# Checkpoints at 2, 4, 6, 8 (the latest 3 kept); a metrics line per step (the signal timings key on them); no
# sample grid before the end. loss.total_steps / optim.decay_steps pinned: a run started with another
# num_steps (the full-disk case) trains on the same schedules.
COMMON = ['--config=configs/test.py', '--config.data.name=fashion_mnist', '--config.data.source=local',
          f'--config.loss.total_steps={STEPS}', f'--config.optim.decay_steps={STEPS}',
          '--config.training.checkpoint_every=2', '--config.training.eval_every=1000',
          '--config.training.log_every=1']
RUN_TIMEOUT = 300
TMP_SUFFIX = '.orbax-checkpoint-tmp'
METRICS = re.compile(r'\[(\d+)\] .*\bloss=')  # clu's metrics line of a step: '[3] grad_norm=..., loss=...'.
STOPPED = re.compile(r'Stopped by (\S+) after step (\d+)')
# Exec wrapper: file-size limit (writes beyond it fail with EFBIG instead of killing the process by SIGXFSZ).
LIMIT_FILE_SIZE = ('import os, resource, signal, sys; n = int(sys.argv[1]); '
                   'signal.signal(signal.SIGXFSZ, signal.SIG_IGN); '
                   'resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); '
                   'os.execv(sys.executable, [sys.executable] + sys.argv[2:])')

_ORBAX = threading.Lock()  # In-process restores, one at a time (the scenario threads share this process).
_LIVE: set = set()  # Every subprocess still running: killed when the module ends (a failed or aborted case).
_LIVE_LOCK = threading.Lock()
_ABORT = threading.Event()  # Set when the module ends: scenarios still running start no more processes.


def _env() -> dict:
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or '',
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.5', TF_CPP_MIN_LOG_LEVEL='2')
  env.pop('XLA_FLAGS', None)  # One device, as a user's CLI run has.
  return env


# ------------------------------------------------------------------------------------------------
# A CLI subprocess whose stderr is read line by line as it comes.
# ------------------------------------------------------------------------------------------------
class Cli:
  """`python -m cm_jax.MODULE ARGS` with stderr read in a thread, so a test can act when a line appears."""

  def __init__(self, module: str, args: list, file_size_limit: Optional[int] = None):
    if _ABORT.is_set():
      raise RuntimeError('the test module has ended')
    cmd = [sys.executable, '-m', module, *args]
    if file_size_limit is not None:
      cmd = [sys.executable, '-c', LIMIT_FILE_SIZE, str(file_size_limit), *cmd[1:]]
    self.cmd = cmd
    self.lines: list = []
    self.stdout = ''
    self._cond = threading.Condition()
    self._done = False
    env = _env()
    if file_size_limit is not None:  # Its truncated compilation-cache entries would warn in the other runs.
      env.update(JAX_COMPILATION_CACHE_DIR='', JAX_ENABLE_COMPILATION_CACHE='false')
    self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, errors='replace')
    with _LIVE_LOCK:
      _LIVE.add(self.proc)
    self._threads = [threading.Thread(target=self._read_stderr, daemon=True),
                     threading.Thread(target=self._read_stdout, daemon=True)]
    for t in self._threads:
      t.start()

  def _read_stderr(self) -> None:
    for line in self.proc.stderr:
      with self._cond:
        self.lines.append(line.rstrip('\n'))
        self._cond.notify_all()
    with self._cond:
      self._done = True
      self._cond.notify_all()

  def _read_stdout(self) -> None:
    self.stdout = self.proc.stdout.read()

  @property
  def pid(self) -> int:
    return self.proc.pid

  @property
  def stderr(self) -> str:
    with self._cond:
      return '\n'.join(self.lines)

  def wait_for(self, match: Union[str, Callable[[str], bool]], timeout: float = RUN_TIMEOUT) -> str:
    """The first stderr line containing `match` (or for which match(line) is true); fails if the process ends
    (or the time runs out) without one."""
    test = (lambda line: match in line) if isinstance(match, str) else match
    deadline = time.time() + timeout
    seen = 0
    with self._cond:
      while True:
        for line in self.lines[seen:]:
          if test(line):
            return line
        seen = len(self.lines)
        if self._done or time.time() > deadline:
          break
        self._cond.wait(0.5)
    raise AssertionError(f'no line matching {match!r} before the process ended ({self.proc.poll()}):\n'
                         f'{self.tail()}')

  def wait_for_path(self, predicate: Callable[[], bool], what: str, timeout: float = RUN_TIMEOUT,
                    poll_s: float = 0.0005) -> None:
    """Polls predicate() every `poll_s` while the process runs; fails if it ends first."""
    deadline = time.time() + timeout
    while not predicate():
      if self.proc.poll() is not None or time.time() > deadline:
        raise AssertionError(f'{what} never happened while the process ran (exit {self.proc.poll()}):\n'
                             f'{self.tail()}')
      time.sleep(poll_s)

  def send(self, signum: int) -> None:
    """Sends `signum`, asserting that the process was still running."""
    assert self.proc.poll() is None, f'the process ended before {signal.Signals(signum).name}:\n{self.tail()}'
    self.proc.send_signal(signum)

  def finish(self, timeout: float = RUN_TIMEOUT) -> int:
    try:
      code = self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
      raise AssertionError(f'{self.cmd} ran past {timeout} s:\n{self.tail()}') from None
    finally:
      for t in self._threads:
        t.join(timeout=30)
      with _LIVE_LOCK:
        _LIVE.discard(self.proc)
    return code

  def tail(self, n: int = 4000) -> str:
    return self.stderr[-n:]


def trainer(workdir, num_steps: int = STEPS, extra: tuple = (), **kwargs) -> Cli:
  return Cli('cm_jax.train', [f'--workdir={workdir}', *COMMON, f'--config.training.num_steps={num_steps}',
                              *extra], **kwargs)


def sampler(workdir, out, extra: tuple = ()) -> Cli:
  return Cli('cm_jax.sample', [f'--workdir={workdir}', '--num=4', '--batch_size=4', '--grid=0', f'--out={out}',
                               *extra])


# ------------------------------------------------------------------------------------------------
# What a workdir holds.
# ------------------------------------------------------------------------------------------------
def checkpoint_entries(workdir) -> list:
  try:
    return sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  except FileNotFoundError:
    return []


def tmp_entries(workdir) -> list:
  return [name for name in checkpoint_entries(workdir) if TMP_SUFFIX in name]


def complete_steps(workdir) -> list:
  """The steps Orbax lists as checkpoints (what a later run or `inference.load` would consider)."""
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    return []
  with _ORBAX:
    manager = checkpointing.make_manager(str(workdir), read_only=True)
    try:
      return sorted(manager.all_steps())
    finally:
      manager.close()


def restored_state(workdir, step: Optional[int] = None) -> tuple:
  """(step, {leaf path: numpy array}) of the whole train state of a checkpoint (default: the latest)."""
  with _ORBAX:
    step, state = checkpoint_utils.restore_full_state(workdir, step)
  flat, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(state))
  return step, {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def assert_bit_identical(workdir, reference: tuple) -> None:
  """The latest checkpoint of `workdir` is the reference's final checkpoint, array for array, bit for bit."""
  step, leaves = restored_state(workdir)
  ref_step, ref_leaves = reference
  assert step == ref_step == STEPS, (step, ref_step)
  assert leaves.keys() == ref_leaves.keys()
  differ = [k for k in leaves if not (leaves[k].dtype == ref_leaves[k].dtype and
                                      np.array_equal(leaves[k], ref_leaves[k]))]
  assert not differ, f'{len(differ)} of {len(leaves)} arrays differ from the uninterrupted run: {differ[:5]}'


def snapshot(root) -> dict:
  """Every file under root: (size, mtime, md5)."""
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, 'rb') as f:
        digest = hashlib.md5(f.read()).hexdigest()
      st = os.stat(path)
      out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns, digest)
  return out


def of_steps(snap: dict, steps) -> dict:
  prefixes = tuple(os.path.join('checkpoints', str(s)) + os.sep for s in steps)
  return {k: v for k, v in snap.items() if k.startswith(prefixes)}


def one_error_line(cli: Cli, program: str = 'cm_jax.train') -> str:
  """The single `PROGRAM: error: ...` line that ends stderr (and no traceback anywhere)."""
  stderr = cli.stderr
  assert 'Traceback' not in stderr, f'a traceback instead of one error line:\n{stderr[-6000:]}'
  lines = [line for line in cli.lines if line.strip()]
  errors = [line for line in lines if line.startswith(f'{program}: error: ')]
  assert len(errors) == 1 and lines[-1] == errors[0], f'expected one final error line:\n{stderr[-4000:]}'
  return errors[0]


def assert_clean_log(cli: Cli) -> None:
  stderr = cli.stderr
  assert 'Traceback' not in stderr and ': error: ' not in stderr, stderr[-4000:]


def stopped_at(cli: Cli, code: int, signame: str) -> int:
  """Checks a run stopped by `signame`: exit 0, the log line, and a complete checkpoint at the step it names;
  returns that step."""
  assert code == 0, f'exit {code} after {signame}:\n{cli.tail()}'
  assert_clean_log(cli)
  assert f'Got {signame}' in cli.stderr, f'{signame} never reached the run:\n{cli.tail()}'
  found = STOPPED.findall(cli.stderr)
  assert len(found) == 1 and found[0][0] == signame, f'no "Stopped by {signame} after step K":\n{cli.tail()}'
  return int(found[0][1])


def assert_resumes_to_the_end(workdir, reference: tuple, from_step: Optional[int]) -> Cli:
  """Runs the same command again: it resumes from `from_step` (None: starts at step 0), exits 0, leaves no
  lock or temporary checkpoint, and its final checkpoint is bit-identical to the reference."""
  run = trainer(workdir)
  code = run.finish()
  assert code == 0, f'the restarted run failed (exit {code}):\n{run.tail()}'
  assert_clean_log(run)
  if from_step is None:
    assert 'starting from step 0' in run.stderr, run.tail()
  else:
    assert f'Resuming from the checkpoint at step {from_step} ' in run.stderr, run.tail()
  assert not os.path.exists(os.path.join(workdir, 'LOCK.json'))
  assert not tmp_entries(workdir), checkpoint_entries(workdir)
  assert_bit_identical(workdir, reference)
  return run


def metrics_step_at_least(k: int) -> Callable[[str], bool]:
  def test(line: str) -> bool:
    m = METRICS.search(line)
    return bool(m) and int(m.group(1)) >= k
  return test


# ------------------------------------------------------------------------------------------------
# Scenarios (each in its own workdir under `root`; `reference` is the future of the uninterrupted run).
# ------------------------------------------------------------------------------------------------
def reference_run(root) -> tuple:
  workdir = os.path.join(root, 'reference')
  run = trainer(workdir)
  code = run.finish()
  assert code == 0, run.tail()
  assert_clean_log(run)
  assert complete_steps(workdir) == [4, 6, 8], checkpoint_entries(workdir)
  return restored_state(workdir)


def startup_sigint_then_kill9_at_resume(root, reference):
  """SIGINT while the run loads its data, before the train step is compiled: it still trains one step, saves
  step 1 and exits 0. Then kill -9 while the restarted run compiles (after 'Resuming'): its LOCK.json stays
  behind; the next restart takes the dead run's lock over and resumes from step 1."""
  workdir = os.path.join(root, 'startup')
  run = trainer(workdir)
  run.wait_for('Model: ')
  run.send(signal.SIGINT)
  step = stopped_at(run, run.finish(), 'SIGINT')
  assert step == 1 and complete_steps(workdir) == [1], (step, checkpoint_entries(workdir))
  run = trainer(workdir)
  run.wait_for('Resuming from the checkpoint at step 1 ')
  run.send(signal.SIGKILL)
  assert run.finish() == -signal.SIGKILL
  assert os.path.exists(os.path.join(workdir, 'LOCK.json'))  # Left by the killed run.
  assert complete_steps(workdir) == [1]
  assert_resumes_to_the_end(workdir, reference.result(), 1)


def sigint_mid_training_then_at_resume(root, reference):
  """SIGINT after step 3's metrics; then a SIGINT as the restarted run resumes (before its compile), which
  stops after one more step; then the end."""
  workdir = os.path.join(root, 'sigint_mid_training')
  run = trainer(workdir)
  run.wait_for(metrics_step_at_least(3))
  run.send(signal.SIGINT)
  first = stopped_at(run, run.finish(), 'SIGINT')
  assert 3 <= first <= STEPS and complete_steps(workdir)[-1] == first, (first, checkpoint_entries(workdir))
  if first < STEPS:
    again = trainer(workdir)
    again.wait_for(f'Resuming from the checkpoint at step {first} ')
    again.send(signal.SIGINT)
    second = stopped_at(again, again.finish(), 'SIGINT')
    assert second == first + 1 and complete_steps(workdir)[-1] == second, (second, again.tail())
    first = second
  assert_resumes_to_the_end(workdir, reference.result(), first)


def assert_restart_ends_bit_identical(workdir, reference: tuple, steps: list) -> None:
  """After a kill -9: the restart resumes from the newest listed checkpoint (or, if the kill left it
  unfinished, an older one after a warning naming it), exits 0 and ends bit-identical."""
  run = trainer(workdir)
  code = run.finish()
  assert code == 0, f'the restarted run failed (exit {code}):\n{run.tail()}'
  assert_clean_log(run)
  resumed = re.search(r'Resuming from the checkpoint at step (\d+) ', run.stderr)
  assert resumed and int(resumed.group(1)) in steps, (steps, run.tail())
  if int(resumed.group(1)) != steps[-1]:
    assert [line for line in run.lines if line[:1] == 'W' and re.search(rf'\bstep {steps[-1]}\b', line)], run.tail()
  assert not os.path.exists(os.path.join(workdir, 'LOCK.json'))
  assert not tmp_entries(workdir), checkpoint_entries(workdir)
  assert_bit_identical(workdir, reference)


def sigint_then_kill9_right_after_saves(root, reference):
  """SIGINT the moment the step-4 checkpoint is renamed into place (exit 0, stopped at K >= 4, step 4 kept);
  then kill -9 the restarted run the moment its next checkpoint is renamed into place; then the end."""
  workdir = os.path.join(root, 'after_save')
  run = trainer(workdir)
  run.wait_for_path(lambda: '4' in checkpoint_entries(workdir), 'the step-4 checkpoint')
  run.send(signal.SIGINT)
  step = stopped_at(run, run.finish(), 'SIGINT')
  steps = complete_steps(workdir)
  assert step >= 4 and steps[-1] == step and 4 in steps, (step, checkpoint_entries(workdir))
  if step < STEPS:
    following = str(step + 2 - step % 2)
    run = trainer(workdir)
    run.wait_for_path(lambda: following in checkpoint_entries(workdir), f'the step-{following} checkpoint')
    run.send(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL
    steps = complete_steps(workdir)
    assert steps and steps[-1] >= step, (step, checkpoint_entries(workdir))
  assert_restart_ends_bit_identical(workdir, reference.result(), steps)


def sigterm_then_kill9_mid_training(root, reference):
  """SIGTERM after step 3's metrics (exit 0, stopped at K); kill -9 the restarted run two steps later; the
  next restart resumes from the newest checkpoint and ends bit-identical."""
  workdir = os.path.join(root, 'sigterm')
  run = trainer(workdir)
  run.wait_for(metrics_step_at_least(3))
  run.send(signal.SIGTERM)
  step = stopped_at(run, run.finish(), 'SIGTERM')
  steps = complete_steps(workdir)
  assert step >= 3 and steps[-1] == step, (step, checkpoint_entries(workdir))
  if step + 2 <= STEPS:
    run = trainer(workdir)
    run.wait_for(metrics_step_at_least(step + 2))
    run.send(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL
    steps = complete_steps(workdir)
    assert steps and steps[-1] >= step, (step, checkpoint_entries(workdir))
  assert_restart_ends_bit_identical(workdir, reference.result(), steps)


def kill9_mid_save(root, reference):
  """kill -9 while a checkpoint (step >= 4) is being written: its temporary directory stays behind, is not
  listed as a checkpoint, and the restart resumes from the one before. If the kill lands just after the
  rename (a race the test cannot exclude), the restarted run gets killed at its next save instead (3 tries)."""
  workdir = os.path.join(root, 'kill9_mid_save')
  hit = None
  for _ in range(3):
    last = (complete_steps(workdir) or [0])[-1]
    run = trainer(workdir)

    def saving():
      return any(int(name.split('.')[0]) > max(last, 2) for name in tmp_entries(workdir))
    run.wait_for_path(saving, 'a checkpoint save')
    run.send(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL
    left = [name for name in tmp_entries(workdir) if int(name.split('.')[0]) > max(last, 2)]
    if left:
      hit = int(left[0].split('.')[0])
      break
  assert hit is not None, 'three kills all missed the save in progress'
  steps = complete_steps(workdir)
  assert hit not in steps and steps and steps[-1] == hit - 2, (hit, steps, checkpoint_entries(workdir))
  assert_resumes_to_the_end(workdir, reference.result(), steps[-1])


def largest_data_file(workdir, step: int) -> tuple:
  """(path, 0, size) of the largest array data file of checkpoint `step` (OCDBT: .../state/**/d/*)."""
  state = os.path.join(workdir, 'checkpoints', str(step), 'state')
  files = [os.path.join(folder, name) for folder, _, names in os.walk(state) for name in names
           if os.path.basename(folder) == 'd']
  assert files, f'no array data files under {state}'
  path = max(files, key=os.path.getsize)
  return path, 0, os.path.getsize(path)


def sampled_array_bytes(workdir, step: int) -> tuple:
  """(data file, offset, length) of the stored bytes of the largest array of the first sampling EMA (what
  `cm_jax.sample` reads by default), from the OCDBT B-tree of checkpoint `step` (tensorstore.ocdbt.dump)."""
  import tensorstore  # pylint: disable=g-import-not-at-top
  state = os.path.join(workdir, 'checkpoints', str(step), 'state')
  base = tensorstore.KvStore.open(f'file://{state}/').result()
  found = []

  def walk(location: str) -> None:
    for entry in tensorstore.ocdbt.dump(base, location).result()['entries']:
      if 'node' in entry:  # An interior node (a bigger tree than the tiny model's single leaf node).
        walk(entry['node'] if isinstance(entry['node'], str) else entry['node']['location'])
      elif entry.get('indirect_value') and bytes(entry['key']).startswith(b'ema_params.0.'):
        # 'value:PREFIX:FILE:OFFSET:LENGTH', PREFIX relative to state/ (e.g. 'ocdbt.process_0/').
        head, offset, length = entry['indirect_value'][len('value:'):].rsplit(':', 2)
        prefix, name = head.split(':', 1)
        found.append((int(length), os.path.join(state, prefix, name), int(offset)))

  for version in tensorstore.ocdbt.dump(base).result()['versions']:
    walk(version['root']['location'])
  assert found, f'no stored arrays of ema_params.0 in {state}'
  length, path, offset = max(found)
  assert os.path.getsize(path) >= offset + length, (path, offset, length)
  return path, offset, length


def damaged_copy(root, reference, name: str, how: str, where: Callable[[str, int], tuple]) -> str:
  """A copy of the finished reference run with step 8 damaged at `where` (data file, offset, length):
  the file truncated in the middle of that range, or 64 bytes in its middle inverted."""
  reference.result()
  workdir = os.path.join(root, name)
  shutil.copytree(os.path.join(root, 'reference'), workdir)
  path, offset, length = where(workdir, 8)
  middle = offset + length // 2
  if how == 'truncate':
    os.truncate(path, middle)
  else:
    with open(path, 'r+b') as f:
      f.seek(middle - 32)
      data = f.read(64)
      f.seek(middle - 32)
      f.write(bytes(b ^ 0xFF for b in data))
  return workdir


def damaged_checkpoint_sample(root, reference, how: str):
  """cm_jax.sample on a run whose step 8 is damaged where sampling reads (the first EMA's largest array): by
  default it warns about step 8 and samples step 6; asked for step 8 it refuses in one line naming step 8 and
  the steps there are. The workdir is untouched (sampling is read-only)."""
  workdir = damaged_copy(root, reference, f'{how}_sample', how, sampled_array_bytes)
  before = snapshot(workdir)
  out_default, out_8 = os.path.join(root, f'{how}_default.npz'), os.path.join(root, f'{how}_8.npz')
  default, explicit = sampler(workdir, out_default), sampler(workdir, out_8, ('--checkpoint_step=8',))
  default_code, explicit_code = default.finish(), explicit.finish()
  assert snapshot(workdir) == before, 'sampling changed the workdir'
  assert default_code == 0, f'exit {default_code}:\n{default.tail()}'
  assert 'Traceback' not in default.stderr, default.tail()
  warnings = [line for line in default.lines if line[:1] in 'WE' and re.search(r'\bstep 8\b', line)]
  assert warnings, f'no warning about the damaged step 8:\n{default.tail()}'
  assert re.search(r'Sampling \d+ images .* from step 6 ', default.stderr), default.tail()
  assert np.load(out_default)['arr_0'].shape == (4, 28, 28, 1)
  assert explicit_code == 1, f'exit {explicit_code} for --checkpoint_step=8:\n{explicit.tail()}'
  line = one_error_line(explicit, 'cm_jax.sample')
  named = line.replace(workdir, 'WORKDIR')
  assert re.search(r'\bstep 8\b', named) and re.search(r'\b6\b', named), line  # And the steps there are.
  assert not os.path.exists(out_8)


def damaged_checkpoint_train(root, reference, how: str):
  """Training on a run whose step 8 has its largest array data file damaged: it warns about step 8, resumes
  from step 6, moves step 8 to WORKDIR/unreadable_checkpoints/, keeps steps 4 and 6 unchanged, and trains
  step 8 again bit-identically."""
  workdir = damaged_copy(root, reference, f'{how}_train', how, largest_data_file)
  older = of_steps(snapshot(workdir), (4, 6))
  run = trainer(workdir)
  code = run.finish()
  assert code == 0, f'exit {code}:\n{run.tail()}'
  assert_clean_log(run)
  assert [line for line in run.lines if line[:1] == 'W' and re.search(r'\bstep 8\b', line)], run.tail()
  assert 'Resuming from the checkpoint at step 6 ' in run.stderr, run.tail()
  aside = os.listdir(os.path.join(workdir, 'unreadable_checkpoints'))
  assert len(aside) == 1 and aside[0].startswith('8-'), aside
  assert complete_steps(workdir) == [4, 6, 8]
  assert of_steps(snapshot(workdir), (4, 6)) == older, 'the older checkpoints changed'
  assert_bit_identical(workdir, reference.result())


def non_finite_loss(root, reference):
  """optim.lr = 1e6: the parameters explode and the loss turns NaN. The run stops with exit 1 and one line
  naming the checkpoint to resume from; no checkpoint left behind holds non-finite or exploded parameters; the
  advised restart (a lower lr, same workdir) trains to the end."""
  del reference
  workdir = os.path.join(root, 'non_finite')
  run = trainer(workdir, extra=('--config.optim.lr=1e6',))
  code = run.finish()
  assert code == 1, f'exit {code}:\n{run.tail()}'
  line = one_error_line(run)
  steps = complete_steps(workdir)
  if steps:
    assert re.search(rf'\bstep {steps[-1]}\b', line), (steps, line)
  else:
    assert re.search(r'\bstep 0\b', line), line
  for step in steps:
    _, leaves = restored_state(workdir, step)
    for key, value in leaves.items():
      assert np.all(np.isfinite(value)), f'step {step}: {key} is not finite'
      if key.startswith(('.params', '.target_params', '.ema_params')):
        assert np.max(np.abs(value), initial=0.0) <= 1e4, f'step {step}: {key} exploded ({np.abs(value).max():.3g})'
  again = trainer(workdir, extra=('--config.optim.lr=1e-4',))
  code = again.finish()
  assert code == 0, f'the advised restart failed (exit {code}):\n{again.tail()}'
  assert_clean_log(again)
  step, leaves = restored_state(workdir)
  assert step == STEPS and all(np.all(np.isfinite(v)) for v in leaves.values())


FILE_SIZE_LIMIT = 32 * 1024  # Lock, metadata and TensorBoard files fit; the checkpoint's arrays do not.


def full_disk(root, reference):
  """A run at its step-4 checkpoint (the reference run's workdir without steps 6 and 8) resumed where no file
  can grow past 32 KiB (writes fail with EFBIG, as on a full disk): one clear error line naming the workdir,
  exit 1, step 4 untouched, no half-written step listed as a checkpoint; the next run without the limit
  resumes from step 4 and ends bit-identical."""
  reference.result()
  workdir = os.path.join(root, 'full_disk')
  shutil.copytree(os.path.join(root, 'reference'), workdir)
  for step in (6, 8):
    shutil.rmtree(os.path.join(workdir, 'checkpoints', str(step)))
  assert complete_steps(workdir) == [4]
  before = of_steps(snapshot(workdir), (4,))
  full = trainer(workdir, file_size_limit=FILE_SIZE_LIMIT)
  code = full.finish()
  assert 'Resuming from the checkpoint at step 4 ' in full.stderr, full.tail()
  steps = complete_steps(workdir)
  assert steps == [4], (steps, checkpoint_entries(workdir))  # No half-written step 6 or 8 passes as valid.
  assert of_steps(snapshot(workdir), (4,)) == before, 'the saved checkpoint changed'
  assert code == 1, f'exit {code}:\n{full.tail()}'
  line = one_error_line(full)
  assert workdir in line and any(w in line.lower() for w in ('too large', 'space', 'disk')), line
  assert_resumes_to_the_end(workdir, reference.result(), 4)


def two_trainers(root, reference):
  """Two trainers started together on one new workdir: one trains, the other is refused in one line naming
  the holder's host and pid. The holder is then paused (SIGSTOP) after its step-2 checkpoint, and a third
  trainer is refused the same way without changing a file; resumed, the holder ends bit-identical."""
  workdir = os.path.join(root, 'two_trainers')
  runs = [trainer(workdir), trainer(workdir)]
  lock = os.path.join(workdir, 'LOCK.json')
  holder = None
  try:
    deadline = time.time() + RUN_TIMEOUT
    while holder is None:
      assert time.time() < deadline, 'no trainer took the lock'
      try:
        with open(lock) as f:
          pid = int(json.load(f)['pid'])
        holder = next(r for r in runs if r.pid == pid)
      except (FileNotFoundError, ValueError, KeyError, StopIteration):
        assert not all(r.proc.poll() is not None for r in runs), [r.tail() for r in runs]
        time.sleep(0.01)
    other = runs[1 - runs.index(holder)]
    holder.wait_for_path(lambda: '2' in checkpoint_entries(workdir), 'the step-2 checkpoint', poll_s=0.01)
    holder.send(signal.SIGSTOP)
    code = other.finish()
    assert code == 1, f'the second trainer exited {code}:\n{other.tail()}'
    refusal = f'host {socket.gethostname()}, pid {holder.pid}'
    line = one_error_line(other)
    assert 'in use' in line and refusal in line, line
    before = snapshot(workdir)
    third = trainer(workdir)
    code = third.finish()
    assert code == 1, f'the third trainer exited {code}:\n{third.tail()}'
    line = one_error_line(third)
    assert 'in use' in line and refusal in line, line
    assert snapshot(workdir) == before, 'the refused trainer changed the workdir'
  finally:
    if holder is not None and holder.proc.poll() is None:
      holder.proc.send_signal(signal.SIGCONT)
  code = holder.finish()
  assert code == 0, f'the holder failed (exit {code}):\n{holder.tail()}'
  assert_clean_log(holder)
  assert not os.path.exists(lock)
  assert_bit_identical(workdir, reference.result())


SCENARIOS = {  # In the order the tests report them.
    'startup_sigint_then_kill9_at_resume': startup_sigint_then_kill9_at_resume,
    'sigint_mid_training_then_at_resume': sigint_mid_training_then_at_resume,
    'sigint_then_kill9_right_after_saves': sigint_then_kill9_right_after_saves,
    'sigterm_then_kill9_mid_training': sigterm_then_kill9_mid_training,
    'kill9_mid_save': kill9_mid_save,
    'two_trainers': two_trainers,
    'truncated_checkpoint_train': functools.partial(damaged_checkpoint_train, how='truncate'),
    'flipped_checkpoint_train': functools.partial(damaged_checkpoint_train, how='flip'),
    'truncated_checkpoint_sample': functools.partial(damaged_checkpoint_sample, how='truncate'),
    'flipped_checkpoint_sample': functools.partial(damaged_checkpoint_sample, how='flip'),
    'full_disk': full_disk,
    'non_finite_loss': non_finite_loss,
}
# The order they start in (two at a time): the longest chains of runs first.
START_ORDER = ('sigint_mid_training_then_at_resume', 'non_finite_loss', 'sigint_then_kill9_right_after_saves',
               'sigterm_then_kill9_mid_training', 'startup_sigint_then_kill9_at_resume', 'two_trainers',
               'kill9_mid_save', 'full_disk', 'truncated_checkpoint_train', 'flipped_checkpoint_train',
               'truncated_checkpoint_sample', 'flipped_checkpoint_sample')
assert sorted(START_ORDER) == sorted(SCENARIOS)


@pytest.fixture(scope='module')
def scenarios(request, tmp_path_factory):
  """Starts the reference run and every selected scenario (two at a time); yields {name: Future}."""
  selected = {item.callspec.params['name'] for item in request.session.items
              if item.module is sys.modules[__name__] and hasattr(item, 'callspec')}
  root = str(tmp_path_factory.mktemp('faults'))
  pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix='fault')
  reference = pool.submit(reference_run, root)
  futures = {'reference': reference}
  futures.update({name: pool.submit(SCENARIOS[name], root, reference) for name in START_ORDER
                  if name in selected})
  yield futures
  _ABORT.set()
  pool.shutdown(wait=False, cancel_futures=True)
  with _LIVE_LOCK:
    procs = list(_LIVE)
  for proc in procs:  # Left running by a failed scenario (or stopped by SIGSTOP): end them.
    if proc.poll() is None:
      proc.send_signal(signal.SIGCONT)
      proc.kill()
  concurrent.futures.wait([f for f in futures.values() if not f.cancelled()], timeout=120)


def test_reference_run(scenarios):
  scenarios['reference'].result()


@pytest.mark.parametrize('name', list(SCENARIOS))
def test_fault(scenarios, name):
  scenarios[name].result()
