"""Multi-process set-up and preemption: every process (one per host, or per GPU) runs the same code.

Every CLI calls `initialize(...)` (through `define_flags()` / `initialize_from_flags()`) before it touches a
device: JAX's own cluster detection on TPU pods and SLURM, explicit --coordinator_address / --num_processes /
--process_id anywhere else, and a plain single process when there is neither.

`StopSignal` turns SIGTERM (the notice that TPU and cloud VMs get before preemption) and SIGINT (Ctrl-C) into
a request to stop at a step that every process agrees on, so that they all save the same checkpoint.
"""

from __future__ import annotations

import atexit
import signal
import threading
from typing import Any, Callable, Optional, TypeVar

from absl import flags
from absl import logging
import jax
import numpy as np

from cm_jax.runtime import errors

T = TypeVar('T')


# ------------------------------------------------------------------------------------------------
# jax.distributed.
# ------------------------------------------------------------------------------------------------
def detected_cluster() -> Optional[tuple[str, int]]:
  """(name, process count) of the cluster environment JAX's automatic initialisation would use (SLURM, a
  Cloud TPU pod, ...), or None. Uses JAX's own registry of cluster environments, the one
  jax.distributed.initialize() reads."""
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top
    cluster_types = clusters.ClusterEnv._cluster_types  # pylint: disable=protected-access
  except (ImportError, AttributeError):
    logging.warning('This JAX (%s) does not expose its cluster detection to cm_jax: multi-process runs need '
                    '--coordinator_address, --num_processes and --process_id.', jax.__version__)
    return None
  for env in cluster_types:
    if not getattr(env, 'opt_in_only_method', False) and env.is_env_present():
      return env.__name__, int(env.get_process_count())
  return None


# With lost_process_s > 0 a process that goes silent (a vanished VM) is noticed by the others' watchdog after
# that many seconds; JAX's own heartbeat timeout, which ends a process with a fatal C++ error instead, is then set
# HEARTBEAT_MARGIN_S later. 0 (the default): no watchdog, JAX's heartbeat timeout (100 s). A process whose
# connections reset (kill -9, a crash) is noticed at once either way, by the error of the next collective.
LOST_PROCESS_S = 0
JAX_HEARTBEAT_TIMEOUT_S = 100
HEARTBEAT_MARGIN_S = 30
SHUTDOWN_TIMEOUT_S = 300  # JAX's default: under load a process may reach the end minutes after another.


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, lost_process_s: float = LOST_PROCESS_S,
               shutdown_timeout_s: int = SHUTDOWN_TIMEOUT_S) -> None:
  """Starts jax.distributed when this is (or may be) one process of many; call before any device use.

  With all three arguments: explicit start (any machines that reach each other over TCP). With none: JAX's
  cluster detection (TPU pod slices, SLURM, Open MPI, Kubernetes TPU jobs), else a single process. A second
  call, or a call after jax.distributed.initialize, does nothing.
  """
  explicit = {'coordinator_address': coordinator_address, 'num_processes': num_processes,
              'process_id': process_id}
  given = {k for k, v in explicit.items() if v is not None}
  if given and len(given) < 3:
    missing = ', '.join(f'--{k}' for k in explicit if k not in given)
    raise ValueError(f'Multi-process start: {", ".join("--" + k for k in sorted(given))} given without {missing}; '
                     'give all three (or none, on a TPU pod or under SLURM).')
  if given:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f'--process_id={process_id} must be in [0, --num_processes={num_processes}).')
  if jax.distributed.is_initialized():
    return
  if not given:
    cluster = detected_cluster()
    if cluster is None:
      return
    name, count = cluster
    if count == 1:  # One task (e.g. `srun -n1`): a plain process keeps all local devices.
      logging.info('%s environment with a single process: not starting jax.distributed.', name)
      return
    logging.info('Starting jax.distributed from the %s environment (%d processes).', name, count)
  # CPU processes talk through gloo over TCP (GPUs and TPUs use their own interconnect).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  heartbeat_s = int(lost_process_s + HEARTBEAT_MARGIN_S) if lost_process_s else JAX_HEARTBEAT_TIMEOUT_S
  jax.distributed.initialize(coordinator_address, num_processes, process_id, heartbeat_timeout_seconds=heartbeat_s,
                             shutdown_timeout_seconds=int(shutdown_timeout_s))
  if lost_process_s:
    Watchdog(lost_process_s).start()
  # jax.distributed catches SIGTERM for its own preemption service, which cm_jax does not use (StopSignal
  # agrees on a stop step itself): give SIGTERM back its usual effect, so `kill` and `scancel` stop a CLI.
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
  logging.info('Process %d of %d; %d local devices of %d.', jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def define_flags() -> None:
  """--coordinator_address, --num_processes and --process_id for a CLI's main module."""
  flags.DEFINE_string('coordinator_address', None, 'Multi-process runs outside TPU pods and SLURM: HOST:PORT of '
                      'process 0, the same on every process (e.g. 10.0.0.1:8476).')
  flags.DEFINE_integer('num_processes', None, 'Multi-process runs: how many processes (one per host or per GPU).')
  flags.DEFINE_integer('process_id', None, 'Multi-process runs: this process\'s index in [0, --num_processes).')
  flags.DEFINE_float('lost_process_timeout', LOST_PROCESS_S, 'Multi-process runs: seconds without a sign of life '
                     'from another process (a host that vanished) before every other process stops with one line '
                     'naming it, e.g. 30 on preemptible pods; JAX\'s heartbeat timeout is then set %d s later. 0: '
                     'off (JAX\'s heartbeat timeout, %d s, then a C++ abort). A killed process is noticed at once '
                     'either way.' % (HEARTBEAT_MARGIN_S, JAX_HEARTBEAT_TIMEOUT_S), lower_bound=0.0)
  flags.DEFINE_integer('shutdown_timeout', SHUTDOWN_TIMEOUT_S, 'Multi-process runs: seconds a finishing process '
                       'waits for the others at the end (jax.distributed\'s shutdown barrier).', lower_bound=1)


def initialize_from_flags() -> None:
  """initialize() with the flags of define_flags(); processes other than 0 then log warnings and errors only
  (process 0 speaks for the run)."""
  f = flags.FLAGS
  initialize(f.coordinator_address, f.num_processes, f.process_id, f.lost_process_timeout, f.shutdown_timeout)
  if jax.process_index() > 0:
    logging.set_verbosity(logging.WARNING)


def barrier(name: str, timeout_s: int = 3600) -> None:
  """Waits until every process got here (a coordination-service barrier: no device collective, so a long wait,
  e.g. for a download or a slow compile on another host, does not time out a collective library)."""
  if jax.process_count() == 1:
    return
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=timeout_s * 1000)


def process_zero_first(fn: Callable[[], T], barrier_name: str) -> T:
  """fn() on process 0, a barrier, then fn() on the other processes.

  For work that fills a cache or downloads data on a shared filesystem: the others then read what process 0
  wrote instead of racing it (without a shared filesystem they repeat the work themselves).
  """
  if jax.process_count() == 1:
    return fn()
  if jax.process_index() > 0:
    barrier(barrier_name)
    return fn()
  try:
    return fn()
  finally:  # Also when fn fails: the others then try themselves (and fail with their own message).
    barrier(barrier_name)


# ------------------------------------------------------------------------------------------------
# A lost process: every other one stops within seconds, in one line, instead of hanging in a collective.
# ------------------------------------------------------------------------------------------------
_RESUME_ADVICE: list[Callable[[], str]] = []  # What a rerun does (set by the trainer: the step it resumes from).


def set_resume_advice(advice: Optional[Callable[[], str]]) -> None:
  """advice() is added to the one-line error of a lost process (e.g. 'a rerun resumes from step 40')."""
  _RESUME_ADVICE[:] = [] if advice is None else [advice]


def lost_process_exit(what: str) -> None:
  """Prints `PROGRAM: error: WHAT. ADVICE` as one line and ends this process at once, exit 1: without
  jax.distributed's shutdown, which would wait for the lost process and then abort with a C++ stack trace."""
  from cm_jax.runtime import cli  # pylint: disable=g-import-not-at-top
  advice = 'Run the same command again on every host'
  try:
    advice += f': {_RESUME_ADVICE[0]()}' if _RESUME_ADVICE else '.'
  except Exception:  # pylint: disable=broad-except
    advice += '.'
  cli.fail(f'{what}. {advice}', errors.FAILURE, skip_shutdown=True)


# Errors of a collective or of the coordination service when another process is gone.
_LOST_PEER_PATTERNS = ('Gloo', 'Connection closed by peer', 'Connection reset by peer', 'heartbeat timeout',
                       'stopped sending heartbeats', 'coordination service')


def lost_peer_reason(e: BaseException) -> Optional[str]:
  """A short reason if `e` says another process of this multi-process run is gone, else None."""
  if jax.process_count() == 1:
    return None
  text = ' '.join(str(e).split())
  if type(e).__name__ not in ('JaxRuntimeError', 'XlaRuntimeError') and 'heartbeat' not in text:
    return None
  if not any(p.lower() in text.lower() for p in _LOST_PEER_PATTERNS):
    return None
  other = ' (process 1)' if jax.process_index() == 0 and jax.process_count() == 2 else (
      ' (process 0)' if jax.process_count() == 2 else '')
  return f'another process{other} is gone (killed, preempted, or its host lost): {text[:200]}'


_FINISHED = 'finished'


class Watchdog:
  """A thread that keeps this process's sign of life in jax.distributed's key-value store (a counter it
  increments every second) and watches the others': when one has not moved for `timeout_s`, or the store
  itself is gone (process 0, which serves it, is lost), this process stops with lost_process_exit."""

  def __init__(self, timeout_s: float, interval_s: float = 1.0, join_timeout_s: float = 10.0):
    self.timeout_s, self.interval_s, self.join_timeout_s = timeout_s, interval_s, join_timeout_s

  def start(self) -> None:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    self._client = getattr(distributed.global_state, 'client', None)
    if self._client is None or not hasattr(self._client, 'key_value_set'):
      logging.warning('This JAX (%s) exposes no key-value store: a lost process is noticed only after JAX\'s '
                      'heartbeat timeout.', jax.__version__)
      return
    # Stopped before jax.distributed's own shutdown (atexit runs the last registered first): past the shutdown
    # barrier, process 0 closes the key-value store while the others may still be exiting. A process that ends
    # says so first, so that the others, which may finish minutes later on a loaded host, do not take it for lost.
    atexit.register(self.finish)
    self.watch(self._client, jax.process_index(), jax.process_count())

  def watch(self, client: Any, me: int, count: int) -> None:
    """Starts the thread on `client` (jax.distributed's, or a stand-in in tests) as process `me` of `count`."""
    self._client, self._me, self._count = client, me, count
    self._stop = threading.Event()
    # Held around each of the thread's rounds of store calls: once finish() holds it, the thread makes no further
    # call, so none reaches the client while (or after) jax.distributed shuts it down.
    self._lock, self._closed = threading.Lock(), False
    self._thread = threading.Thread(target=self._run, name='cm_jax_watchdog', daemon=True)
    self._thread.start()

  def finish(self) -> None:
    self._stop.set()
    self._thread.join(timeout=self.join_timeout_s)
    # A thread still inside a store call (a starved or unresponsive coordinator) finishes that call first; after
    # it, _closed stops it for good, and its last write cannot come after ours.
    held = self._lock.acquire(timeout=30)
    self._closed = True
    try:
      self._client.key_value_set(f'cm_jax/alive/{self._me}', _FINISHED, allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except
      pass  # The store is gone (process 0 ended first): nobody is watching any more.
    finally:
      if held:
        self._lock.release()

  def _run(self) -> None:
    import time  # pylint: disable=g-import-not-at-top
    beats = 0
    seen = {p: (None, time.monotonic()) for p in range(self._count) if p != self._me}
    while not self._stop.is_set():
      with self._lock:
        if self._closed:
          return
        self._check(beats := beats + 1, seen)
      self._stop.wait(self.interval_s)

  def _check(self, beats: int, seen: dict) -> None:
    """Writes this process's sign of life and checks the others' (called under self._lock)."""
    import time  # pylint: disable=g-import-not-at-top
    try:
      self._client.key_value_set(f'cm_jax/alive/{self._me}', str(beats), allow_overwrite=True)
      now = time.monotonic()
      for p, (value, since) in list(seen.items()):
        current = self._client.key_value_try_get(f'cm_jax/alive/{p}')
        if current == _FINISHED:  # It ended normally (it is waiting in jax.distributed's shutdown).
          del seen[p]
        elif current != value:
          seen[p] = (current, now)
        elif now - since > self.timeout_s:
          lost_process_exit(f'process {p} of {self._count} stopped responding (no sign of life for '
                            f'{now - since:.0f} s, --lost_process_timeout={self.timeout_s:g}: killed, preempted, '
                            'or its host lost)')
    except Exception as e:  # pylint: disable=broad-except
      if 'NOT_FOUND' in str(e):  # Not yet written by a process still starting: no news yet.
        pass
      elif not self._stop.is_set():
        lost_process_exit(f'lost contact with process 0, which coordinates this run ({" ".join(str(e).split())[:160]})')


# ------------------------------------------------------------------------------------------------
# Decisions every process shares: no process waits in a collective for one that has stopped.
# ------------------------------------------------------------------------------------------------
_MESSAGE_BYTES = 2000  # Of an error message sent to the other processes (longer ones are cut).


class ErrorOnAnotherProcess(errors.UserError):
  """What the other processes raise when one failed: its one-line message, exit code and kind."""

  def __init__(self, process: int, message: str, exit_code: int, kind: int):
    super().__init__(message)
    self.process, self.exit_code, self.kind = process, exit_code, kind


def _exit_code(e: BaseException) -> int:
  return getattr(e, 'exit_code', errors.FAILURE) if isinstance(e, errors.UserError) else errors.FAILURE


def _worst(failures: list[tuple[int, int, int, str]]) -> Optional[tuple[int, int, int, str]]:
  """The failure (process, kind, exit code, message) of the highest kind, the lowest process among those."""
  return min(failures, key=lambda f: (-f[1], f[0])) if failures else None


def _gather_failures(error: Optional[BaseException], kind: int) -> list[tuple[int, int, int, str]]:
  """Every process's (process, kind, exit code, message) for those that failed; the same list everywhere."""
  record = np.zeros(3 * 4 + _MESSAGE_BYTES, np.uint8)
  if error is not None:
    text = (' '.join(str(error).split()) or type(error).__name__)
    if not isinstance(error, errors.UserError):
      text = f'{type(error).__name__}: {text}'
    encoded = text.encode()[:_MESSAGE_BYTES]
    record[:12] = np.array([1, kind, _exit_code(error)], np.int32).view(np.uint8)
    record[12:12 + len(encoded)] = np.frombuffer(encoded, np.uint8)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  gathered = np.asarray(multihost_utils.process_allgather(record)).reshape(jax.process_count(), -1)
  failures = []
  for process, row in enumerate(gathered):
    failed, row_kind, code = (int(v) for v in row[:12].view(np.int32))
    if failed:
      failures.append((process, row_kind, code, bytes(row[12:]).rstrip(b'\0').decode(errors='replace')))
  return failures


def agreed(fn: Callable[[], T], kind_of: Callable[[BaseException], int] = lambda e: 1,
           processes: str = 'all') -> Optional[T]:
  """fn() on every process (processes='all') or on process 0 alone ('zero'), then one shared outcome.

  When fn fails anywhere, every process raises: the failing process its own error (traceback kept), the
  others ErrorOnAnotherProcess with that error's one-line message and exit code, so they end with the same
  line instead of waiting in the next collective for a process that has stopped. `kind_of` ranks errors
  (e.g. 1: a damaged file to skip, 2: an error to stop on): the highest kind decides for everyone, so no
  process skips what another stops on. Returns fn()'s result (None on the processes that did not run it).
  With one process, simply fn().
  """
  if jax.process_count() == 1:
    return fn()
  result, error, kind = None, None, 0
  if processes == 'all' or jax.process_index() == 0:
    try:
      result = fn()
    except Exception as e:  # pylint: disable=broad-except
      error, kind = e, kind_of(e)
  worst = _worst(_gather_failures(error, kind))
  if worst is None:
    return result
  process, worst_kind, code, message = worst
  if error is not None and kind == worst_kind:
    raise error
  if jax.process_index() != process:
    logging.warning('Process %d failed: %s', process, message)
  raise ErrorOnAnotherProcess(process, message, code, worst_kind)


def on_process_zero(fn: Callable[[], T]) -> Optional[T]:
  """fn() on process 0 only (a check or a write of a shared file); if it fails, every process raises the same
  one-line error (see `agreed`). Returns fn()'s result on process 0, None on the others."""
  return agreed(fn, processes='zero')


# ------------------------------------------------------------------------------------------------
# Preemption: SIGTERM and SIGINT.
# ------------------------------------------------------------------------------------------------
class Preempted(Exception):
  """Raised from inside long work (evaluation) when every process has agreed to stop."""


class StopSignal:
  """Turns SIGTERM and SIGINT into an agreed stop; a context manager around training.

  `reached()` is called at the same points on every process (after each train step is dispatched, before each
  evaluation batch) and returns True at the same call on all of them once any process got a signal:
  - one process: the signal handlers set a flag that the next `reached()` returns;
  - several processes: each call dispatches an all-reduce of every process's flag (asynchronously, after the
    step just dispatched) and answers with the previous call's result, so the agreement costs no extra wait
    for the device; the stop comes one call later than with one process.
  A second SIGINT stops at once with KeyboardInterrupt (the last saved checkpoint is kept). Outside the main
  thread (no signal handlers there) it never stops the run.
  """

  def __init__(self):
    self.signal_name: Optional[str] = None  # The first signal received (here, or by another process).
    self._previous = {}
    self._pending = None  # The all-reduce of the previous call (several processes).
    self._any = None

  def __enter__(self) -> 'StopSignal':
    if threading.current_thread() is not threading.main_thread():
      logging.info('Not in the main thread: SIGTERM/SIGINT will not stop this run with a checkpoint.')
      return self
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:  # pylint: disable=unused-argument
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # A second Ctrl-C: stop now.
    self.signal_name = self.signal_name or signal.Signals(signum).name
    logging.warning('Got %s: stopping at a step that every process reaches, with a checkpoint there (Ctrl-C '
                    'again to stop at once without one).', self.signal_name)

  def reached(self) -> bool:
    """Whether to stop here; the same answer on every process at the same call."""
    if jax.process_count() == 1:
      return self.signal_name is not None
    from cm_jax.runtime import sharding  # pylint: disable=g-import-not-at-top
    if self._any is None:
      mesh = sharding.make_mesh()
      self._flags_sharding = sharding.batch_sharding(mesh)
      self._any = jax.jit(lambda flags_D: flags_D.max(), out_shardings=sharding.replicated(mesh))
    local = np.full((jax.local_device_count(),), self.signal_name is not None, np.int32)
    pending, self._pending = self._pending, self._any(
        jax.make_array_from_process_local_data(self._flags_sharding, local))
    stop = pending is not None and bool(jax.device_get(pending))
    if stop and self.signal_name is None:
      self.signal_name = 'a signal to another process'
    return stop

  def check(self) -> None:
    """Raises Preempted if reached(): for loops inside long work such as evaluation."""
    if self.reached():
      raise Preempted(self.signal_name)
