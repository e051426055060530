"""Multi-process set-up and preemption: every process (one per host, or per GPU) runs the same code.

Every CLI calls `initialize(...)` (through `define_flags()` / `initialize_from_flags()`) before it touches a
device: JAX's own cluster detection on TPU pods and SLURM, explicit --coordinator_address / --num_processes /
--process_id anywhere else, and a plain single process when there is neither.

`StopSignal` turns SIGTERM (the notice that TPU and cloud VMs get before preemption) and SIGINT (Ctrl-C) into
a request to stop at a step that every process agrees on, so that they all save the same checkpoint.
"""

from __future__ import annotations

import signal
import threading
from typing import Callable, Optional, TypeVar

from absl import flags
from absl import logging
import jax
import numpy as np

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


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
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
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
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


def initialize_from_flags() -> None:
  """initialize() with the flags of define_flags(); processes other than 0 then log warnings and errors only
  (process 0 speaks for the run)."""
  f = flags.FLAGS
  initialize(f.coordinator_address, f.num_processes, f.process_id)
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
