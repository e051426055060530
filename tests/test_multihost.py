"""Multi-process training (2 processes x 2 CPU devices, gloo on 127.0.0.1), preemption by SIGTERM/SIGINT, and
the schedule horizon pinned when a run starts."""

import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cm_jax import checkpointing
from cm_jax import input_pipeline
from cm_jax import train
from cm_jax import train_state as ts
from cm_jax.configs import test as test_config
from cm_jax.core import losses
from cm_jax.runtime import multihost
import tiny_runs

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 60  # Long enough that a SIGTERM sent after the step-10 checkpoint lands before the end.
# Every run below trains on the same schedules whatever its num_steps, so runs of different lengths compare.
COMMON = ['--config=configs/test.py', '--config.data.name=fashion_mnist', '--config.data.source=local',
          f'--config.loss.total_steps={STEPS}', f'--config.optim.decay_steps={STEPS}',
          '--config.training.log_every=5', '--config.training.checkpoint_every=10',
          '--config.training.eval_every=1000']


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch(workdir, num_processes: int, devices_per_process: int, num_steps: int, log_dir, extra=()) -> list:
  """Starts `num_processes` trainers of one run (each with `devices_per_process` fake CPU devices)."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices_per_process}',
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or '',
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.5')
  cmd = [sys.executable, '-m', 'cm_jax.train', f'--workdir={workdir}', *COMMON,
         f'--config.training.num_steps={num_steps}', *extra]
  if num_processes > 1:
    cmd += [f'--coordinator_address=127.0.0.1:{free_port()}', f'--num_processes={num_processes}']
  procs = []
  for i in range(num_processes):
    log = open(os.path.join(log_dir, f'{os.path.basename(workdir)}_{time.time_ns()}_{i}.log'), 'w')
    extra = [f'--process_id={i}'] if num_processes > 1 else []
    procs.append((subprocess.Popen(cmd + extra, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
                  log))
  return procs


def wait(procs, timeout: float = 300) -> list:
  """Exit codes; the logs of failed processes go into the assertion message."""
  codes = []
  for p, log in procs:
    try:
      codes.append(p.wait(timeout=timeout))
    except subprocess.TimeoutExpired:
      p.kill()
      codes.append('timeout')
    log.close()
  if any(c != 0 for c in codes):
    tails = '\n'.join(open(log.name).read()[-3000:] for _, log in procs)
    raise AssertionError(f'exit codes {codes}:\n{tails}')
  return codes


def saved_state(workdir):
  """(latest step, its whole train state as numpy) of a run of COMMON's config."""
  config = test_config.get_config()
  manager = checkpointing.make_manager(str(workdir), read_only=True)
  step = manager.latest_step()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.eval_shape(functools.partial(ts.init_state, config, ts.make_optimizer(config)))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))).state
  manager.close()
  return step, jax.device_get(state)


def leaves(state):
  return jax.tree.leaves((state.params, state.target_params, state.ema_params, state.opt_state))


def assert_same_up_to_reduction_order(state, expected) -> None:
  """Every leaf within 1e-5 of its largest magnitude, except attention key biases: adding the same bias to
  every key leaves the softmax unchanged, so their true gradient is 0 and they hold only rounding noise (which
  Adam scales up to learning-rate-sized steps), different for every reduction order."""
  tree = lambda s: (s.params, s.target_params, s.ema_params, s.opt_state)
  flat, _ = jax.tree_util.tree_flatten_with_path(tree(state))
  for (path, a), b in zip(flat, jax.tree.leaves(tree(expected))):
    name = jax.tree_util.keystr(path)
    if "['key']['bias']" in name:
      continue
    a, b = np.asarray(a), np.asarray(b)
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale, err_msg=name)


def stop_with_sigterm(workdir, root, process: int, after_checkpoint: int):
  """Starts the 2 x 2 run in `workdir`, sends SIGTERM to one process once the step-`after_checkpoint`
  checkpoint exists; returns (the step both stopped at, both logs)."""
  procs = launch(workdir, 2, 2, STEPS, root)
  deadline = time.time() + 240
  while not (workdir / 'checkpoints' / str(after_checkpoint)).exists() and time.time() < deadline:
    if any(p.poll() is not None for p, _ in procs):
      break
    time.sleep(0.05)
  procs[process][0].send_signal(signal.SIGTERM)
  wait(procs)
  return saved_state(workdir)[0], [open(log.name).read() for _, log in procs]


@pytest.fixture(scope='module')
def two_by_two(tmp_path_factory):
  """The same run three ways: 1 process x 4 devices; 2 processes x 2 devices; and 2 x 2 stopped by a SIGTERM
  to process 1 (after its step-10 checkpoint), restarted with the same command, stopped again by a SIGTERM to
  process 0 (after its next checkpoint), and restarted to the end."""
  root = tmp_path_factory.mktemp('multihost')
  one, two, stopped = root / 'one_by_four', root / 'two_by_two', root / 'two_by_two_sigterm'
  wait(launch(one, 1, 4, STEPS, root))
  wait(launch(two, 2, 2, STEPS, root))
  stop_step, logs = stop_with_sigterm(stopped, root, 1, 10)
  next_checkpoint = (stop_step // 10 + 1) * 10
  second_stop, second_logs = stop_with_sigterm(stopped, root, 0, next_checkpoint)
  restarted = launch(stopped, 2, 2, STEPS, root)
  wait(restarted)
  return {'workdir': two, 'root': root,
          'one': saved_state(one), 'two': saved_state(two), 'stopped': saved_state(stopped),
          'stop_step': stop_step, 'sigterm_logs': logs, 'second_stop': second_stop, 'second_logs': second_logs,
          'resumed_log': ''.join(second_logs) + ''.join(open(log.name).read() for _, log in restarted)}


def test_two_processes_train_like_one_process_with_the_same_devices(two_by_two):
  (step_one, one), (step_two, two) = two_by_two['one'], two_by_two['two']
  assert step_one == step_two == STEPS
  assert_same_up_to_reduction_order(two, one)  # Cross-process reductions add in another order.


def test_sigterm_to_one_process_stops_both_at_one_step_with_a_checkpoint(two_by_two):
  stop_step, second_stop = two_by_two['stop_step'], two_by_two['second_stop']
  assert 10 < stop_step < second_stop < STEPS, (
      f'the runs stopped at steps {stop_step}, {second_stop}; a SIGTERM was not acted on in time')
  for step, logs in ((stop_step, two_by_two['sigterm_logs']), (second_stop, two_by_two['second_logs'])):
    for log in logs:  # Both exited 0 (wait() checked) and report the same stop.
      assert f'after step {step}; saved its checkpoint' in log


def test_two_process_run_resumes_its_sigterm_checkpoint_bit_identically(two_by_two):
  step, resumed = two_by_two['stopped']
  assert step == STEPS
  for step in (two_by_two['stop_step'], two_by_two['second_stop']):
    assert f'Resuming from the checkpoint at step {step}' in two_by_two['resumed_log']
  for a, b in zip(leaves(resumed), leaves(two_by_two['two'][1])):
    np.testing.assert_array_equal(a, b)


def test_sample_cli_on_two_processes_writes_once_what_one_process_samples(two_by_two, tmp_path):
  """cm_jax.sample with --coordinator_address/--num_processes/--process_id: the batch is split over the 2 x 2
  devices, process 0 alone writes the npz, and the images are those of a single-process sample."""
  from cm_jax import inference  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'samples.npz'
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or '')
  port = free_port()
  procs = []
  for i in range(2):
    log = open(tmp_path / f'sample_{i}.log', 'w')
    cmd = [sys.executable, '-m', 'cm_jax.sample', f'--workdir={two_by_two["workdir"]}', '--num=10', '--seed=3',
           '--batch_size=6', '--grid=0', f'--out={out}', f'--coordinator_address=127.0.0.1:{port}',
           '--num_processes=2', f'--process_id={i}']
    procs.append((subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
  wait(procs)
  assert sorted(os.listdir(tmp_path)) == ['sample_0.log', 'sample_1.log', 'samples.npz']
  expected = inference.load(str(two_by_two['workdir'])).sample(10, seed=3, batch_size=6)
  got = np.load(out)['arr_0']
  assert got.shape == expected.shape == (10, 28, 28, 1)
  assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1  # Float order only (4 vs 2 devices).


# ------------------------------------------------------------------------------------------------
# One process: SIGTERM / SIGINT inside train_and_evaluate (in-process: the handlers live in the main thread).
# ------------------------------------------------------------------------------------------------
def signal_at_step(monkeypatch, step: int, signum: int, where: str = 'batch') -> None:
  """Sends `signum` to this process when the training loop asks for batch `step` (or writes a grid)."""
  if where == 'batch':
    get = input_pipeline.BatchStream.get

    def get_then_signal(self, k):
      if k == step:
        os.kill(os.getpid(), signum)
      return get(self, k)
    monkeypatch.setattr(input_pipeline.BatchStream, 'get', get_then_signal)
  else:
    write = train.images.save_png

    def save_then_signal(*args, **kwargs):
      os.kill(os.getpid(), signum)
      return write(*args, **kwargs)
    monkeypatch.setattr(train.images, 'save_png', save_then_signal)


def tiny(num_steps: int, **overrides):
  return tiny_runs.tiny_config(local_data=True, **{'training.num_steps': num_steps,
                                                   'training.checkpoint_every': 100, 'training.eval_every': 100,
                                                   **overrides})


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  return train.train_and_evaluate(tiny(8), workdir)


@pytest.mark.parametrize('signum,where,stop_step', [(signal.SIGTERM, 'batch', 3), (signal.SIGINT, 'batch', 5),
                                                    (signal.SIGTERM, 'grid', 5)])
def test_signal_saves_the_step_reached_and_resume_is_bit_identical(uninterrupted, tmp_path, monkeypatch, signum,
                                                                   where, stop_step):
  """The signal arrives while step k's batch is read (the stop comes after step k + 1 = stop_step), or while
  the step-4 grid is written (the stop comes after the next step)."""
  workdir = str(tmp_path)
  config = tiny(8, **({'training.eval_every': 4} if where == 'grid' else {}))
  signal_at_step(monkeypatch, stop_step - 1, signum, where)
  handler_before = signal.getsignal(signum)
  stopped = train.train_and_evaluate(config, workdir)
  assert signal.getsignal(signum) is handler_before  # Restored on the way out.
  assert int(stopped.step) == stop_step
  manager = checkpointing.make_manager(workdir, read_only=True)
  assert manager.latest_step() == stop_step
  monkeypatch.undo()
  resumed = train.train_and_evaluate(tiny(8), workdir)
  for a, b in zip(leaves(resumed), leaves(uninterrupted)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_signal_during_in_training_evaluation_stops_between_batches(uninterrupted, tmp_path, monkeypatch):
  """A SIGTERM while the step-4 evaluation samples: the evaluation stops before its next batch, step 4 is
  saved (although it is no checkpoint_every step), and resuming trains on bit-identically."""
  from cm_jax.evaluation import evaluator as evaluator_lib  # pylint: disable=g-import-not-at-top
  from cm_jax import samplers  # pylint: disable=g-import-not-at-top

  class NoScores:
    def score(self, samples):
      raise AssertionError('the evaluation should have stopped before scoring')
  monkeypatch.setattr(evaluator_lib, 'make_evaluator_on_all_processes', lambda config: NoScores())
  sample_in_batches = samplers.sample_in_batches
  batches = []

  def signal_at_second_batch(*args, before_batch=None, **kwargs):
    def before():
      batches.append(1)
      if len(batches) == 2:
        os.kill(os.getpid(), signal.SIGTERM)
      before_batch()
    return sample_in_batches(*args, before_batch=before, **kwargs)
  monkeypatch.setattr(samplers, 'sample_in_batches', signal_at_second_batch)
  config = tiny(8)
  config.evaluation.every, config.evaluation.num_samples, config.evaluation.batch_size = 4, 8, 2
  stopped = train.train_and_evaluate(config, str(tmp_path))
  assert int(stopped.step) == 4 and len(batches) == 2
  assert checkpointing.make_manager(str(tmp_path), read_only=True).latest_step() == 4
  monkeypatch.undo()
  resumed = train.train_and_evaluate(tiny(8), str(tmp_path))
  for a, b in zip(leaves(resumed), leaves(uninterrupted)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fsdp_run_trains_like_the_replicated_run(uninterrupted, tmp_path):
  """training.sharding='fsdp' (parameters and optimizer state split over the 2 devices): the same run up to
  float reduction order, with the state really split."""
  fsdp = train.train_and_evaluate(tiny(8, **{'training.sharding': 'fsdp', 'training.fsdp_min_size': 64}),
                                  str(tmp_path))
  split = [x for x in jax.tree.leaves(fsdp.params) if x.sharding.spec != jax.sharding.PartitionSpec()]
  assert split and all(s.data.shape != x.shape for x in split for s in x.addressable_shards)
  assert_same_up_to_reduction_order(jax.device_get(fsdp), jax.device_get(uninterrupted))


def test_evaluation_loop_stops_on_an_agreed_signal(monkeypatch):
  with multihost.StopSignal() as stop:
    stop.check()  # No signal yet: nothing happens.
    os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(multihost.Preempted):
      stop.check()
  assert stop.signal_name == 'SIGTERM'


def test_second_ctrl_c_stops_at_once():
  with pytest.raises(KeyboardInterrupt):
    with multihost.StopSignal():
      os.kill(os.getpid(), signal.SIGINT)
      os.kill(os.getpid(), signal.SIGINT)


# ------------------------------------------------------------------------------------------------
# jax.distributed start-up arguments.
# ------------------------------------------------------------------------------------------------
def test_partial_explicit_flags_are_refused_naming_the_missing_ones():
  with pytest.raises(ValueError, match='--num_processes, --process_id'):
    multihost.initialize(coordinator_address='127.0.0.1:1234')
  with pytest.raises(ValueError, match=r'--process_id=2 must be in \[0, --num_processes=2\)'):
    multihost.initialize('127.0.0.1:1234', 2, 2)


def test_no_cluster_and_no_flags_is_a_single_process(monkeypatch):
  for var in ('SLURM_JOB_ID', 'SLURM_NTASKS', 'OMPI_MCA_orte_hnp_uri', 'TPU_WORKER_HOSTNAMES'):
    monkeypatch.delenv(var, raising=False)
  assert multihost.detected_cluster() is None
  multihost.initialize()
  assert jax.process_count() == 1 and not jax.distributed.is_initialized()


def test_slurm_environment_is_detected_and_a_single_task_stays_a_plain_process(monkeypatch):
  for var, value in {'SLURM_JOB_ID': '1', 'SLURM_STEP_NODELIST': 'node[1-2]', 'SLURM_NTASKS': '2',
                     'SLURM_PROCID': '0', 'SLURM_LOCALID': '0'}.items():
    monkeypatch.setenv(var, value)
  name, count = multihost.detected_cluster()
  assert 'Slurm' in name and count == 2
  monkeypatch.setenv('SLURM_NTASKS', '1')  # `srun -n1`: no jax.distributed, so every local device is used.
  multihost.initialize()
  assert not jax.distributed.is_initialized() and jax.device_count() == 2


# ------------------------------------------------------------------------------------------------
# Schedule horizons.
# ------------------------------------------------------------------------------------------------
def test_extending_a_run_keeps_its_curriculum():
  """configs/fashion_mnist_ct.py: N at its last step K must stay 161 when the run is extended to 2K steps."""
  from cm_jax.configs import fashion_mnist_ct  # pylint: disable=g-import-not-at-top
  first = ts.pin_schedule_horizons(fashion_mnist_ct.get_config(), None)
  steps = first.training.num_steps
  extended = fashion_mnist_ct.get_config()
  extended.training.num_steps = 2 * steps
  pinned = ts.pin_schedule_horizons(extended, first)
  assert pinned.loss.total_steps == pinned.optim.decay_steps == steps
  n_at = lambda c: int(losses.make_ct_settings(c, (28, 28, 1)).num_points(steps))
  assert n_at(first) == n_at(pinned) == 161
  # What an unpinned extension did: step K is 2.5 of the 5 stages of 2K steps, N = 10 * 2^2 + 1.
  assert n_at(ts.pin_schedule_horizons(extended, None)) == 41
  asked = fashion_mnist_ct.get_config()
  asked.training.num_steps, asked.loss.total_steps = 2 * steps, 2 * steps
  assert ts.pin_schedule_horizons(asked, first).loss.total_steps == 2 * steps  # The user's explicit value wins.


def test_checkpoints_written_before_pinning_resume_with_their_own_num_steps():
  old = test_config.get_config()
  old.training.num_steps = 300  # Its horizons were None, i.e. 300.
  now = test_config.get_config()
  now.training.num_steps = 900
  pinned = ts.pin_schedule_horizons(now, old)
  assert pinned.loss.total_steps == pinned.optim.decay_steps == 300


# --------------------------------------------------------------------------------------------------
# Every process decides the same thing (2 processes of tests/multihost_agreement_worker.py).
# --------------------------------------------------------------------------------------------------
def run_workers(case: str, root) -> list:
  """The JSON line of each of the 2 processes of `case`; fails on a hang (a process left waiting in a
  collective for one that stopped) or a crash."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', XLA_FLAGS='--xla_force_host_platform_device_count=1',
             PYTHONPATH=REPO_ROOT)
  worker = os.path.join(REPO_ROOT, 'tests', 'multihost_agreement_worker.py')
  coordinator = f'127.0.0.1:{free_port()}'
  procs = [subprocess.Popen([sys.executable, worker, case, str(root), coordinator, str(i)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
  outs = []
  for p in procs:
    try:
      stdout, stderr = p.communicate(timeout=180)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise AssertionError(f'{case}: a process hung')
    assert p.returncode == 0, stderr[-3000:]
    outs.append(json.loads(stdout.strip().splitlines()[-1]))
  return outs


def test_agreed_makes_every_process_end_with_the_same_error(tmp_path):
  zero, one = run_workers('agreed', tmp_path)
  assert zero['ok'] == {'result': 0} and one['ok'] == {'result': 1}
  # Process 1 failed: it raises its own error, process 0 the same message with the same exit code.
  assert one['one_fails']['error'] == 'InputFileError' and zero['one_fails']['error'] == 'ErrorOnAnotherProcess'
  assert zero['one_fails']['message'] == one['one_fails']['message'] == 'bad file on process 1'
  assert zero['one_fails']['exit_code'] == 1
  # Damage on 0 (kind 1), a bug on 1 (kind 2): both stop on the bug, none skips it as damage.
  assert one['worst_kind_wins']['error'] == 'TypeError'
  assert zero['worst_kind_wins'] == {'error': 'ErrorOnAnotherProcess', 'message': 'TypeError: a bug there',
                                     'kind': 2, 'exit_code': 1}
  # Process-0-only work: its failure reaches process 1 (usage exit code kept); its result stays on process 0.
  assert zero['zero_fails']['error'] == 'OutputPathError'
  assert one['zero_fails']['message'] == '--out=/x: not writable' and one['zero_fails']['exit_code'] == 1
  assert zero['zero_result'] == {'result': 'written'} and one['zero_result'] == {'result': None}


def test_a_read_failure_on_one_process_makes_every_process_resume_from_the_same_older_step(tmp_path):
  zero, one = run_workers('resume', tmp_path)
  assert zero['state'] == one['state'] == {'result': [2.0, 2.0]}
  assert zero['steps'] == one['steps'] == [1, 2]  # Step 3 moved aside once, by agreement.
  assert zero['aside'] == ['3']


def test_read_only_restores_agree_on_the_step_when_one_process_cannot_read_the_newest(tmp_path):
  zero, one = run_workers('read_only', tmp_path)
  assert zero['read_only'] == one['read_only'] == {'result': [2, test_config.get_config().seed]}
  assert os.listdir(tmp_path / 'checkpoints') and not (tmp_path / 'unreadable_checkpoints').exists()


@pytest.mark.parametrize('how, victim', [('kill', 1), ('kill', 0), ('stop', 1)])
def test_a_lost_process_stops_the_others_in_seconds_with_one_line(tmp_path, how, victim):
  """kill -9 of a process (its TCP connections reset), of the coordinator (which serves the key-value store),
  or SIGSTOP (a vanished VM: no reset, the collective just waits): the survivor ends within seconds, exit 1,
  with one line naming what was lost and the step a rerun resumes from; no wait for JAX's heartbeat timeout,
  no C++ abort."""
  workdir = tmp_path / 'run'
  procs = launch(workdir, 2, 1, 400, tmp_path, extra=['--lost_process_timeout=5'])
  try:
    deadline = time.time() + 240
    while not (workdir / 'checkpoints' / '10').exists():
      assert time.time() < deadline and all(p.poll() is None for p, _ in procs), 'no step-10 checkpoint'
      time.sleep(0.1)
    lost, survivor = procs[victim][0], procs[1 - victim][0]
    lost.send_signal(signal.SIGKILL if how == 'kill' else signal.SIGSTOP)
    start = time.time()
    code = survivor.wait(timeout=90)
    took = time.time() - start
  finally:
    for p, log in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGCONT)
        p.kill()
        p.wait()
      log.close()
  output = open(procs[1 - victim][1].name).read()
  last = output.strip().splitlines()[-1]
  assert code == 1, output[-3000:]
  assert took < 30, took  # JAX's own heartbeat timeout would be 35 s here, its default 100 s.
  assert last.startswith('cm_jax.train: error: ') and re.search(r'resumes from step \d+', last), last
  assert ('process 1' if victim == 1 else 'process 0') in last, last
  assert 'Fatal Python error' not in output and 'Check failure' not in output, output[-3000:]


class _SlowStore:
  """A key-value store whose first read blocks for a while (a starved coordinator); records every call."""

  def __init__(self, block_s: float):
    self.calls, self.block_s, self.blocked = [], block_s, False
    self.lock = threading.Lock()

  def key_value_set(self, key, value, allow_overwrite=False):
    with self.lock:
      self.calls.append(('set', key, value))

  def key_value_try_get(self, key):
    with self.lock:
      self.calls.append(('get', key))
      first = not self.blocked
      self.blocked = True
    if first:
      time.sleep(self.block_s)
    return '1'


def test_watchdog_makes_no_store_call_after_its_finished_mark():
  """finish() (at exit, before jax.distributed shuts its client down) waits for a round of store calls in flight
  even past the thread's join timeout: its FINISHED mark is the last call the store sees."""
  store = _SlowStore(block_s=1.5)
  dog = multihost.Watchdog(timeout_s=60, interval_s=0.01, join_timeout_s=0.1)
  dog.watch(store, me=0, count=4)  # Three others: a round reads three keys.
  deadline = time.time() + 10
  while not store.blocked:
    assert time.time() < deadline
    time.sleep(0.01)
  dog.finish()
  time.sleep(0.3)  # Any call the thread would still make lands here.
  assert store.calls[-1] == ('set', 'cm_jax/alive/0', 'finished'), store.calls[-5:]
  assert sum(1 for c in store.calls if c[0] == 'get') == 3  # The round in flight completed; no new round.
