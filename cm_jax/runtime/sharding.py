"""How arrays are laid out over the devices: one ('data',) mesh axis, batches split along it.

config.training.sharding picks the layout of the train state:

- 'replicated': every device holds the whole state (plain data parallelism).
- 'fsdp': the parameters, target parameters, EMAs and optimizer state are split over the devices (each
  device stores 1/n of every large array), for models whose state does not fit on one device replicated.
  The compiler gathers the weights where a step needs them and reduce-scatters the gradients.

Both layouts compute the same step (up to the order of float reductions); checkpoints restored with these
shardings come back in the same layout.

The last section holds the host-side helpers that split a batch over the devices of all processes and bring
results back (`shard_batch`, `replicate`, `to_host`), used by sampling, editing and feature extraction.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = 'data'

# Fields of the train state that 'fsdp' shards; every other field (step, rng) stays replicated.
SHARDED_FIELDS = ('params', 'target_params', 'ema_params', 'opt_state')

# Arrays with fewer elements stay replicated under 'fsdp' (2**14 float32 = 64 KiB): biases and norm scales
# weigh little, and gathering each of them every step would cost more than storing it.
FSDP_MIN_SIZE = 2**14


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh with axis 'data' over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over 'data'; the other dimensions whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def fsdp_spec(shape: Sequence[int], num_shards: int, min_size: int = FSDP_MIN_SIZE) -> P:
  """The 'fsdp' partition of one array: its largest dimension divisible by `num_shards`, split over 'data'.

  Of equally large divisible dimensions the last wins (the output features of a Dense or Conv kernel).
  Arrays with fewer than `min_size` elements, or without a divisible dimension, stay replicated (P()).
  """
  if math.prod(shape) < min_size:
    return P()
  axis = None
  for i, dim in enumerate(shape):
    if dim > 0 and dim % num_shards == 0 and (axis is None or dim >= shape[axis]):
      axis = i
  if axis is None:
    return P()
  spec = [None] * len(shape)
  spec[axis] = DATA_AXIS
  return P(*spec)


def _replicated_state(abstract_state: Any, mesh: Mesh, min_size: int) -> Any:
  del min_size
  return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def _fsdp_state(abstract_state: Any, mesh: Mesh, min_size: int) -> Any:
  num_shards = mesh.shape[DATA_AXIS]
  shard = lambda x: NamedSharding(mesh, fsdp_spec(x.shape, num_shards, min_size))
  layout = _replicated_state(abstract_state, mesh, min_size)
  return layout.replace(**{field: jax.tree.map(shard, getattr(abstract_state, field))
                           for field in SHARDED_FIELDS})


_MODES: dict[str, Callable[[Any, Mesh, int], Any]] = {
    'replicated': _replicated_state,
    'fsdp': _fsdp_state,
}
MODES = tuple(sorted(_MODES))  # The values of config.training.sharding.


def state_shardings(abstract_state: Any, mesh: Mesh, mode: str, min_size: int = FSDP_MIN_SIZE) -> Any:
  """A NamedSharding for every array of the train state: a TrainState of shardings.

  Args:
    abstract_state: the TrainState, e.g. from jax.eval_shape (only shapes are read).
    mesh: a mesh with axis 'data' (make_mesh).
    mode: config.training.sharding, 'replicated' or 'fsdp' (see the module docstring).
    min_size: 'fsdp' keeps arrays with fewer elements replicated (fsdp_spec).

  Raises:
    ValueError: for an unknown mode.
  """
  if mode not in _MODES:
    raise ValueError(f'config.training.sharding = {mode!r} is not one of {list(MODES)}.')
  return _MODES[mode](abstract_state, mesh, min_size)


@dataclasses.dataclass(frozen=True)
class Footprint:
  """Bytes of a tree of arrays: what one device stores under its shardings, and one full copy."""
  per_device: int
  total: int

  def describe(self) -> str:
    return f'{self.per_device / 1e6:.1f} MB of {self.total / 1e6:.1f} MB per device'


def footprint(abstract_state: Any, shardings: Any) -> Footprint:
  """The Footprint of `abstract_state` under `shardings` (a tree of the same structure)."""
  nbytes = lambda x, shape: math.prod(shape) * np.dtype(x.dtype).itemsize
  per_device = jax.tree.map(lambda x, s: nbytes(x, s.shard_shape(x.shape)), abstract_state, shardings)
  total = jax.tree.map(lambda x: nbytes(x, x.shape), abstract_state)
  return Footprint(sum(jax.tree.leaves(per_device)), sum(jax.tree.leaves(total)))


def describe(abstract_state: Any, shardings: Any) -> str:
  """A log line, e.g. '12.3 MB of 45.6 MB per device'."""
  return footprint(abstract_state, shardings).describe()


# --------------------------------------------------------------------------------------------------
# Batches split over the devices of every process. Every process runs the same code with the same full batch
# on its host; each device computes only its rows, and every process gets the whole result back.
# --------------------------------------------------------------------------------------------------
def padded_batch_size(batch: int, mesh: Mesh) -> int:
  """batch rounded up to a multiple of the mesh's device count (every device gets as many rows)."""
  return math.ceil(batch / mesh.size) * mesh.size


def pad_rows(x: Any, size: int) -> Any:
  """x (numpy or jax, batch axis 0) padded to `size` rows by repeating its last row."""
  pad = size - x.shape[0]
  if pad <= 0:
    return x
  xp = jnp if isinstance(x, jax.Array) else np
  return xp.concatenate([x, xp.repeat(x[-1:], pad, axis=0)])




def _global_array(x: Any, sharding: NamedSharding) -> jax.Array:
  """x, the same value on every process (host or local device data), as a global array with `sharding`; each
  process supplies only the slices of its own devices."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return jax.device_put(x, sharding)  # Already global: a reshard at most.
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_batch(x: Any, mesh: Mesh) -> jax.Array:
  """x (the full batch, the same on every process; its batch axis 0 a multiple of mesh.size) split over the
  mesh's 'data' axis: device k holds rows [k B/n, (k + 1) B/n)."""
  if x.shape[0] % mesh.size:
    raise ValueError(f'A batch of {x.shape[0]} rows does not split over {mesh.size} devices; pad it first '
                     '(padded_batch_size, pad_rows).')
  sharding = batch_sharding(mesh)
  if mesh.is_multi_process:
    return _global_array(x, sharding)
  return jax.device_put(x, sharding)  # No copy when x is already so placed.


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Every array of tree on every device of the mesh (no copy for arrays already so placed)."""
  sharding = replicated(mesh)
  if not mesh.is_multi_process:
    return jax.device_put(tree, sharding)

  def one(x):
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
      return x
    return _global_array(x, sharding)
  return jax.tree.map(one, tree)


def to_host(x: jax.Array) -> np.ndarray:
  """The whole of x as numpy on every process: a device_get when this process holds all of it, else a
  gather of the other processes' rows (a collective: every process must call it)."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def split_over_processes(fn: Callable[[np.ndarray], Any], x: np.ndarray) -> Any:
  """fn(x) for a per-row host function (outputs: arrays with one row per input row), each process computing
  an equal share of the rows and every process getting all of them. A collective when there are several
  processes (every process must call it with the same x); fn(x) itself when there is one."""
  count = jax.process_count()
  if count == 1:
    return fn(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  n = x.shape[0]
  share = max(1, math.ceil(n / count))
  padded = pad_rows(np.asarray(x), share * count) if n else np.zeros((share * count,) + x.shape[1:], x.dtype)
  index = jax.process_index()
  mine = fn(padded[index * share:(index + 1) * share])
  gathered = multihost_utils.process_allgather(mine, tiled=True)  # Process-major: rows in order.
  return jax.tree.map(lambda a: np.asarray(a)[:n], gathered)
