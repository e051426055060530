"""Orbax checkpoints of a run: the whole train state plus the config as JSON, one checkpoint per step.

The data position is the step itself (the batch of step k is a function of (seed, k); see
input_pipeline.batch_indices), and the step rng is fold_in(state.rng, step), so the saved state is all a
resume needs.

Every checkpoint also carries a checksum of each array of the state (item 'checksums'), computed on the devices
when it is saved and checked against the arrays read back by every restore: TensorStore stores the chunk bytes
of Orbax's arrays without a checksum, so flipped bytes on disk would otherwise load as wrong numbers. A
mismatch is handled like an unreadable checkpoint: training moves it aside and resumes from an older step, the
read-only tools fall back to an older step with a warning, and an explicitly requested one is refused.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import importlib
import json
import os
import re
import time
from typing import Any, Callable, Iterable, Optional, TypeVar

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from cm_jax.configs import common as config_lib
from cm_jax.runtime import errors
from cm_jax.runtime import multihost
from cm_jax.runtime import paths
from cm_jax.runtime import sharding

CHECKPOINT_SUBDIR = 'checkpoints'
# What a damaged checkpoint raises on restore is not one type: OS errors, TensorStore's ValueErrors, the JSON
# decoder's, and Orbax's plain Exception around them. What it never raises are the errors of a program bug or of
# a full device; those propagate rather than condemn a good checkpoint (see `is_damage`).
_NOT_DAMAGE = (TypeError, AttributeError, NameError, AssertionError, ImportError, NotImplementedError,
               RecursionError, MemoryError)


def is_damage(e: BaseException) -> bool:
  """Whether a restore error may come from the checkpoint's files (else: a bug, or out of device memory)."""
  if isinstance(e, multihost.ErrorOnAnotherProcess):
    return e.kind == _DAMAGE
  return (isinstance(e, Exception) and not isinstance(e, _NOT_DAMAGE)
          and 'RESOURCE_EXHAUSTED' not in str(e) and 'Out of memory' not in str(e))


_DAMAGE, _STOP = 1, 2  # Kinds of a read error that every process agrees on (multihost.agreed).


def _read_kind(e: BaseException) -> int:
  return _DAMAGE if is_damage(e) else _STOP


def agreed_read(read: Callable[[], T]) -> T:
  """read() of checkpoint files on every process, failing on all of them if it fails on any (a transient
  read error on one host): so that all skip the same step, or all stop, and none computes checksums (a
  collective) alone. Call it at the same point on every process."""
  return multihost.agreed(read, kind_of=_read_kind)
# The JSON item {leaf path: 'dtype:checksum'} written with each state, plus one entry per JSON item ('#config',
# '#data': 'json:sha256 prefix'); checkpoints without it predate it.
CHECKSUMS_ITEM = 'checksums'
JSON_ITEMS = ('config', 'data')
ITEM_NAMES = ('state', 'config', 'data', CHECKSUMS_ITEM)

T = TypeVar('T')


class CorruptCheckpointError(errors.InputFileError):
  """A checkpoint whose arrays, config or data record read back with other checksums than they were saved with,
  or whose checksums are missing where its run's other checkpoints carry them (damaged on disk)."""

  def __init__(self, directory: str, step: int, reason: str, bad: tuple[str, ...] = ()):
    self.step, self.bad, self.reason = step, list(bad), reason
    super().__init__(f'The checkpoint of step {step} in {directory} is corrupt ({reason}); it was not loaded.')


class UnreadableCheckpointError(errors.InputFileError):
  """A checkpoint that was asked for (or the only ones there) cannot be read, or fails its checksums."""


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints: absolute for a local workdir, unchanged for a URI (gs://bucket/run/checkpoints)."""
  return os.fspath(epath.Path(paths.absolute(workdir)) / CHECKPOINT_SUBDIR)


def require_gcs_client(workdir: str) -> None:
  """Raises ImportError with the fix for a gs:// workdir without google-cloud-storage, which Orbax needs there."""
  if not os.fspath(workdir).startswith('gs://'):
    return
  try:
    importlib.import_module('google.cloud.storage')
  except ImportError as e:
    raise ImportError(f"The workdir {workdir} is on GCS, where Orbax needs google-cloud-storage: pip install "
                      "'cm_jax[gcs]' (or google-cloud-storage).") from e


def make_manager(workdir: str, config: Optional[ml_collections.ConfigDict] = None,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """Manager for WORKDIR/checkpoints: async saves, keeps the latest few plus every keep_every-th step."""
  require_gcs_client(workdir)
  if read_only:
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  else:
    tc = config.training
    options = ocp.CheckpointManagerOptions(
        max_to_keep=tc.keep_checkpoints, keep_period=tc.keep_every or None, create=True,
        enable_async_checkpointing=True, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEM_NAMES)


def save(manager: ocp.CheckpointManager, state: Any, config: ml_collections.ConfigDict, data: dict) -> None:
  """Starts an async save of `state` at its step (call `wait(manager)` before exit).

  The checksums of its arrays go into the same save, so a checkpoint never exists without them. A save that
  failed in the background (a full disk) raises here, at the next save, as errors.OutputPathError.
  """
  step = int(jax.device_get(state.step))
  items = {'config': config.to_dict(), 'data': data}
  sums = checksums(state) | {f'#{name}': json_checksum(items[name]) for name in JSON_ITEMS}
  args = ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(items['config']),
                            data=ocp.args.JsonSave(items['data']), checksums=ocp.args.JsonSave(sums))
  with _disk_errors_explained(manager):
    manager.save(step, args=args, force=True)
  _UNCOLLECTED.add(id(manager))


def check_saves(manager: ocp.CheckpointManager) -> None:
  """Raises errors.OutputPathError if a finished background save failed for lack of space or permission (cheap:
  call it every step, so that a run stops soon after its disk fills up rather than at the next save)."""
  with _disk_errors_explained(manager):
    manager.check_for_errors()
    # Orbax's finalize thread holds a failed save's error: collect it once that save is over (once per save).
    if id(manager) in _UNCOLLECTED and not manager.is_saving_in_progress():
      _UNCOLLECTED.discard(id(manager))
      manager.wait_until_finished()


_UNCOLLECTED: set[int] = set()  # Managers with a save whose outcome check_saves has not collected yet.


def wait(manager: ocp.CheckpointManager) -> None:
  """manager.wait_until_finished(), with a failed write reported as errors.OutputPathError."""
  with _disk_errors_explained(manager):
    manager.wait_until_finished()


# Errors of a write that the disk refused: Python's OSErrors, and TensorStore's, which carry the OS error code.
_DISK_ERRNOS = {errno.ENOSPC: 'no space left on the device', errno.EDQUOT: 'disk quota exceeded',
                errno.EFBIG: 'file too large for the file system or the process limit (ulimit -f)',
                errno.EROFS: 'read-only file system', errno.EACCES: 'permission denied',
                errno.EPERM: 'operation not permitted'}


def disk_error_reason(e: BaseException) -> Optional[str]:
  """Why the disk refused a write, if `e` (or an exception it wraps) says so; None for any other error."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
      return _DISK_ERRNOS[e.errno]
    match = re.search(r"os_error_code='?(\d+)", str(e))
    if match and int(match.group(1)) in _DISK_ERRNOS:
      return _DISK_ERRNOS[int(match.group(1))]
    e = e.__cause__ or e.__context__
  return None


@contextlib.contextmanager
def _disk_errors_explained(manager: ocp.CheckpointManager):
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    reason = disk_error_reason(e)
    if reason is None:
      raise
    where = os.fspath(manager.directory)
    try:
      manager.reload()
      latest = manager.latest_step()
    except Exception:  # pylint: disable=broad-except
      latest = None
    resume = (f'it resumes from step {latest}, the newest complete checkpoint' if latest is not None else
              'no checkpoint is complete, so it starts from step 0')
    raise errors.OutputPathError(
        f'Could not write a checkpoint in {where}: {reason}. The partial checkpoint is not used. Free space '
        f'there (or fix its permissions), then run the same command again: {resume}.') from e


# --------------------------------------------------------------------------------------------------
# Checksums of the saved arrays.
# --------------------------------------------------------------------------------------------------
def _fmix32(h: jax.Array) -> jax.Array:
  """The murmur3 finaliser: a bijection of uint32 whose every output bit depends on every input bit."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
  """The bits of x as uint32 words in x's own shape (no reshape, so a sharded array stays where it is): narrower
  dtypes are widened, and 64-bit or complex ones get a trailing axis of their words."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    x = jnp.stack([x.real, x.imag], axis=-1)
  bits = x.dtype.itemsize * 8
  if bits < 32:
    return jax.lax.bitcast_convert_type(x, jnp.dtype(f'uint{bits}')).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.uint32)


def _row_major_index(shape: tuple[int, ...]) -> jax.Array:
  """uint32 array of `shape` holding each element's position in row-major order (mod 2^32)."""
  index, stride = jnp.zeros(shape, jnp.uint32), 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
    stride *= shape[axis]
  return index


@jax.jit
def _leaf_checksum(x: jax.Array) -> jax.Array:
  """uint32 (2,): two wrapping sums over the words w_i of x, sum fmix(w_i) * (2i + 1) and
  sum fmix(w_i ^ c) * (fmix(i) | 1), i the row-major position.

  Each term is a bijection of w_i (an odd multiplier is invertible mod 2^32), so changing any one word (any
  set of bit flips within it) always changes both sums; the position-dependent multipliers make a swap of two
  elements change them too (but for chance 2^-32 per sum). Integer sums do not depend on the order of the
  reduction, so a sharded array gives the same value as a gathered one, bit for bit. One small program per leaf
  shape, dtype and sharding (jit's cache; about 30 for a UNet state): cheaper to compile than one program over
  the whole state, and it never copies or reshards an array.
  """
  w = _words(x)
  i = _row_major_index(w.shape)
  first = jnp.sum(_fmix32(w) * (2 * i + 1), dtype=jnp.uint32)
  second = jnp.sum(_fmix32(w ^ jnp.uint32(0x5BD1E995)) * (_fmix32(i) | 1), dtype=jnp.uint32)
  return jnp.stack([first, second])


def leaf_name(path: tuple) -> str:
  """'params/Conv_0/kernel', 'ema_params/0/...': the same name for a leaf of the state and of a partial restore."""
  return jax.tree_util.keystr(path, simple=True, separator='/')


# At most this many checksum programs are dispatched before their results are read. With several CPU devices
# in one process (--xla_force_host_platform_device_count), XLA:CPU (jaxlib 0.10) deadlocks when ~100 small
# programs holding all-reduces are queued at once: one device's all-reduce waits for a partner whose launch is
# blocked behind the per-device limit of 32 computations in flight, and after 40 s XLA aborts the process
# (tests/test_checkpoint_integrity.py has the case). A group of 8 keeps far below that limit and costs nothing
# measurable: the programs are tiny.
_CHECKSUMS_IN_FLIGHT = 8


def checksums(tree: Any) -> dict[str, str]:
  """{leaf name: 'dtype:16 hex digits'} of every array in `tree`, computed on its devices (no gather to host).

  In a multi-process run every process must call it (the sums of a sharded array are collectives).
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  sums = []
  for start in range(0, len(flat), _CHECKSUMS_IN_FLIGHT):
    # Dispatched asynchronously, a group at a time. A full reduction is replicated on the devices of its
    # array: every process reads its own copy.
    group = [_leaf_checksum(leaf) for _, leaf in flat[start:start + _CHECKSUMS_IN_FLIGHT]]
    sums += jax.device_get([x.addressable_data(0) if x.sharding.is_fully_replicated else sharding.to_host(x)
                            for x in group])
  return {leaf_name(path): f'{leaf.dtype}:{int(a):08x}{int(b):08x}' for (path, leaf), (a, b) in zip(flat, sums)}


def json_checksum(value: Any) -> str:
  """'json:' + the first 16 hex digits of the SHA-256 of `value` as canonical JSON (sorted keys; tuples as
  lists, as the saved JSON holds them), so the value saved and the value read back hash alike."""
  text = json.dumps(value, sort_keys=True, separators=(',', ':'))
  return 'json:' + hashlib.sha256(text.encode()).hexdigest()[:16]


_UNVERIFIED_LOGGED: set[str] = set()


def saved_checksums(manager: ocp.CheckpointManager, step: int) -> Optional[dict]:
  """The checksums saved with checkpoint `step`, or None for a checkpoint written before cm_jax saved them.

  Raises CorruptCheckpointError when they are missing although another checkpoint of the run carries them:
  every checkpoint cm_jax writes has them, so a missing folder is damage, not age.
  """
  root = epath.Path(manager.directory)
  if (root / str(step) / CHECKSUMS_ITEM).exists():
    return manager.restore(step, args=ocp.args.Composite(checksums=ocp.args.JsonRestore())).checksums
  others = [s for s in sorted(manager.all_steps()) if s != step and (root / str(s) / CHECKSUMS_ITEM).exists()]
  if others:
    raise CorruptCheckpointError(os.fspath(manager.directory), step,
                                 f'its {CHECKSUMS_ITEM} item is missing, while the checkpoints of steps '
                                 f'{others} carry theirs', bad=(CHECKSUMS_ITEM,))
  return None


def verify(manager: ocp.CheckpointManager, step: int, restored: Any) -> None:
  """Raises CorruptCheckpointError unless every array of `restored` (all or part of checkpoint `step`'s state)
  has the checksum it was saved with. A checkpoint without checksums passes, logged once per directory, when
  no checkpoint of the run has them (written before cm_jax saved them)."""
  saved = agreed_read(lambda: saved_checksums(manager, step))
  if saved is None:
    where = os.fspath(manager.directory)
    if where not in _UNVERIFIED_LOGGED:
      _UNVERIFIED_LOGGED.add(where)
      logging.info('The checkpoints in %s (step %d) carry no checksums (written before cm_jax saved them): '
                   'restored without verifying their arrays.', where, step)
    return
  now = checksums(restored)
  bad = sorted(name for name, value in now.items() if saved.get(name) != value)
  if bad:
    raise CorruptCheckpointError(os.fspath(manager.directory), step,
                                 f'{len(bad)} of its {len(now)} arrays read back differ from their saved '
                                 f'checksums: {", ".join(bad[:3])}{", ..." if len(bad) > 3 else ""}', bad=bad)


def verify_json(manager: ocp.CheckpointManager, step: int, name: str, value: Any,
                saved: Optional[dict] = None) -> Any:
  """Returns `value`, the JSON item `name` ('config' or 'data') read from checkpoint `step`, after checking it
  against its saved checksum (CorruptCheckpointError on a mismatch). Checkpoints from before such checksums
  were saved pass. `saved`: the step's saved_checksums when the caller has read them already."""
  saved = saved_checksums(manager, step) if saved is None else saved
  expected = None if saved is None else saved.get(f'#{name}')
  if expected is not None and json_checksum(value) != expected:
    raise CorruptCheckpointError(os.fspath(manager.directory), step,
                                 f'its saved {name} reads back with another checksum than it was saved with',
                                 bad=(name,))
  return value


def describe_error(e: BaseException) -> str:
  """Why a checkpoint did not load, in one short line for a warning or an error message.

  For a read error that is the root cause's first line: Orbax wraps TensorStore's one-line reason ('OUT_OF_RANGE:
  Error reading "params.Conv_0.kernel/0.0.0.0" ...') in a message that ends in a many-line spec dump.
  """
  if isinstance(e, CorruptCheckpointError):
    return e.reason
  while e.__cause__ is not None:
    e = e.__cause__
  lines = str(e).strip().splitlines()
  first = lines[0] if lines else ''
  return f'{type(e).__name__}: {first[:300]}{"..." if len(first) > 300 else ""}'


def newest_readable(steps: Iterable[int], read: Callable[[int], T], on_bad: Callable[[int, Exception], None],
                    is_bad: Callable[[BaseException], bool] = is_damage) -> Optional[tuple[int, T]]:
  """(step, read(step)) of the newest of `steps` whose read succeeds; None if none does.

  A read that fails with an error `is_bad` accepts (by default one that may come from the checkpoint's files)
  calls on_bad(step, error) and tries the next older step; any other error propagates.
  """
  for step in sorted(steps, reverse=True):
    try:
      return step, read(step)
    except Exception as e:  # pylint: disable=broad-except
      if not is_bad(e):
        raise
      on_bad(step, e)  # What a failed read held (a whole state) is freed with `e`, before an older one is read.
  return None


def restore_for_resume(manager: ocp.CheckpointManager, abstract_state: Any, config: ml_collections.ConfigDict,
                       data: dict, workdir: str) -> Any:
  """The state of the newest readable checkpoint, after checking that `config` and `data` can resume it.

  An unreadable checkpoint (a truncated file, a failed disk) or one whose arrays fail their checksums (bytes
  flipped on disk) is skipped with a warning in favour of the next older one, never loaded, and moved to
  WORKDIR/unreadable_checkpoints/ (kept for inspection) so that the resumed run can save that step again. A
  config or data mismatch is the user's to fix and raises ValueError at once.
  """
  problems, unreadable, refused = [], [], []

  def skip(step: int, e: Exception) -> None:
    problems.append(f'step {step}: {describe_error(e)}')
    unreadable.append(step)
    logging.warning('Checkpoint at step %d is unreadable or corrupt (%s); trying an older one.', step,
                    problems[-1])

  def read_files(step: int) -> Any:
    check_no_links(manager, step)
    meta = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore(), data=ocp.args.JsonRestore()))
    saved = saved_checksums(manager, step)  # Read once for both items.
    for name in JSON_ITEMS:
      verify_json(manager, step, name, getattr(meta, name), saved)
    try:
      check_compatible(config_lib.config_from_json_dict(meta.config), config, workdir)
      check_same_data(meta.data, data, workdir)
    except Exception as e:  # pylint: disable=broad-except
      refused.append(e)  # A mismatch is the user's to fix: it propagates, never skipped as damage.
      raise
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))).state

  def read(step: int) -> Any:
    # Every process decides alike: a step that fails to read on one host is skipped (and moved aside) by all.
    state = multihost.agreed(lambda: read_files(step), kind_of=lambda e: _STOP if e in refused else _read_kind(e))
    verify(manager, step, state)
    return state

  found = newest_readable(sorted(manager.all_steps()), read, skip,
                          is_bad=lambda e: is_damage(e) and e not in refused)
  if found is None:
    raise UnreadableCheckpointError(
        f'No readable checkpoint in {checkpoint_dir(workdir)} ({"; ".join(problems)}); none was loaded or moved. '
        'Restore the checkpoints from a backup, or move that directory away to start again from step 0.')
  if unreadable:
    multihost.on_process_zero(lambda: move_aside(workdir, unreadable))
  multihost.barrier('cm_jax_checkpoint_restored')  # No process lists a checkpoint that is being moved away.
  manager.reload()
  return found[1]


def move_aside(workdir: str, steps: list[int]) -> str:
  """Moves the checkpoints of `steps` to WORKDIR/unreadable_checkpoints/STEP-TIME; returns that folder."""
  aside = epath.Path(paths.absolute(workdir)) / 'unreadable_checkpoints'
  if aside.exists() and not aside.is_dir():
    raise errors.OutputPathError(f'{aside} is a file, where cm_jax keeps the checkpoints it moves aside; move or '
                                 'rename that file, then run again.')
  aside.mkdir(parents=True, exist_ok=True)
  for bad in steps:
    (epath.Path(checkpoint_dir(workdir)) / str(bad)).rename(aside / f'{bad}-{time.time():.0f}')
    logging.warning('Moved the unreadable checkpoint of step %d to %s.', bad, aside)
  return os.fspath(aside)


def _newest_that_reads(manager: ocp.CheckpointManager, read: Callable[[int], T]) -> Optional[T]:
  """read(step) of the newest checkpoint where it succeeds (None without one); any error skips a step silently:
  restore_for_resume reports and sets aside unreadable checkpoints."""
  found = newest_readable(manager.all_steps(), lambda step: agreed_read(lambda: read(step)),
                          on_bad=lambda step, e: None, is_bad=lambda e: True)
  return None if found is None else found[1]


def saved_data(manager: ocp.CheckpointManager) -> Optional[dict]:
  """The `data` record (data fingerprint, and the teacher of CD/ECT runs) of the newest checkpoint that reads."""
  return _newest_that_reads(manager, lambda step: verify_json(
      manager, step, 'data', manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data))


def saved_config(manager: ocp.CheckpointManager) -> Optional[ml_collections.ConfigDict]:
  """The config of the newest checkpoint that reads (None without one)."""
  return _newest_that_reads(manager, functools.partial(restore_config, manager))


def check_same_data(saved: dict, data: dict, workdir: str) -> None:
  """Refuses to resume on a different dataset array: the same step would then index other examples.

  The 'teacher' entry of CD/ECT runs is checked by teacher.check_same_teacher, not here.
  """
  saved = {k: v for k, v in saved.items() if k != 'teacher'}
  data = {k: v for k, v in data.items() if k != 'teacher'}
  if saved != data:
    raise ValueError(
        f'The checkpoint in {checkpoint_dir(workdir)} was trained on a different training array ({saved}) than '
        f'the one loaded now ({data}), so resuming would replay or skip examples. This happens when the data '
        'source changes (e.g. TFDS-prepared data, whose order differs, instead of the IDX files): set '
        'config.data.source / data.manual_dir to what the run used, or start a new --workdir.')


def check_no_links(manager: ocp.CheckpointManager, step: int) -> None:
  """Refuses a local checkpoint directory that holds a symbolic link: Orbax never writes one, and following it
  would read (or, on cleanup, delete) files outside the checkpoint. URIs (gs://) have no links."""
  root = os.fspath(epath.Path(manager.directory) / str(step))
  if paths.is_remote(root):
    return
  if os.path.islink(root):
    raise UnreadableCheckpointError(f'The checkpoint of step {step} in {os.fspath(manager.directory)} is a symbolic '
                                    f'link (-> {os.readlink(root)}); cm_jax does not follow links out of a '
                                    'checkpoint. It was not loaded.')
  for folder, dirs, files in os.walk(root):
    for name in dirs + files:
      path = os.path.join(folder, name)
      if os.path.islink(path):
        raise UnreadableCheckpointError(
            f'The checkpoint of step {step} in {os.fspath(manager.directory)} holds a symbolic link '
            f'{os.path.relpath(path, root)} -> {os.readlink(path)}; cm_jax does not follow links out of a '
            'checkpoint. It was not loaded.')


def restore_parameters(manager: ocp.CheckpointManager, abstract_state: Any, step: int) -> dict:
  """Only `params` and `ema_params` of a checkpoint (a partial restore: no optimizer state is read), verified
  against their checksums (CorruptCheckpointError on a mismatch)."""
  agreed_read(lambda: check_no_links(manager, step))
  item = {'params': abstract_state.params, 'ema_params': abstract_state.ema_params}
  args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                partial_restore=True)
  restored = agreed_read(lambda: manager.restore(step, args=ocp.args.Composite(state=args)).state)
  verify(manager, step, restored)
  return restored


def restore_read_only(manager: ocp.CheckpointManager, restore: Callable[[int], T],
                      step: Optional[int] = None) -> tuple[int, T]:
  """(step, restore(step)) for the read-only tools, which handle a damaged checkpoint like training does
  but never move it: they may run beside the trainer, which owns the workdir.

  step None: the newest step whose restore succeeds (it must verify the checksums), with a warning naming
  each damaged newer step; a step that disappears while it is read (a trainer beside it rotating checkpoints,
  training.keep_checkpoints) is not damage: the newest step listed then is read instead. An explicit step that
  fails raises UnreadableCheckpointError naming it, the cause
  and the other steps there. `manager` must list at least one step (callers report an empty workdir).
  """
  steps = sorted(manager.all_steps())
  where = os.fspath(manager.directory)
  if step is not None:
    try:
      return step, restore(step)
    except Exception as e:  # pylint: disable=broad-except
      if not is_damage(e):
        raise
      others = [s for s in steps if s != step]
      raise UnreadableCheckpointError(
          f'The checkpoint of step {step} in {where} is unreadable or corrupt ({describe_error(e)}); it was not '
          f'loaded. Other steps there: {others}; ask for one of them, or for none to get the newest readable '
          'one.') from e
  for attempt in range(_ROTATION_RETRIES + 1):
    damaged, problems, vanished = [], [], []

    def skip(candidate: int, e: Exception) -> None:
      if not (epath.Path(manager.directory) / str(candidate)).exists():
        vanished.append(candidate)  # Deleted while being read: the trainer rotated it out (keep_checkpoints).
        logging.info('Checkpoint at step %d in %s was removed while being read (its trainer keeps only the newest '
                     'ones); looking for a newer one.', candidate, where)
        return
      damaged.append(candidate)
      problems.append(f'step {candidate}: {describe_error(e)}')
      logging.warning('Checkpoint at step %d in %s is unreadable or corrupt (%s); trying an older one (its '
                      'files are left as they are).', candidate, where, describe_error(e))

    found = newest_readable(steps, restore, skip)
    if not vanished or attempt == _ROTATION_RETRIES:
      break
    manager.reload()  # The trainer wrote a newer step before deleting the one being read: read that one.
    steps = sorted(manager.all_steps())
  if found is None and vanished and not damaged:
    raise UnreadableCheckpointError(
        f'No readable checkpoint in {where}: a trainer there deleted each checkpoint while it was being read '
        f'({_ROTATION_RETRIES + 1} tries, last step {vanished[-1]}). Run again, or keep more checkpoints '
        '(--config.training.keep_checkpoints).')
  if found is None:
    raise UnreadableCheckpointError(f'No readable checkpoint in {where}: {"; ".join(problems)}. Train again, or '
                                    'restore the checkpoints from a backup.')
  if damaged:
    logging.warning('Using step %d, the newest readable checkpoint in %s, instead of the damaged step(s) %s.',
                    found[0], where, ', '.join(map(str, damaged)))
  return found


# How often a read-only restore looks again after its checkpoint was rotated away while being read.
_ROTATION_RETRIES = 5


def restore_config(manager: ocp.CheckpointManager, step: Optional[int] = None) -> ml_collections.ConfigDict:
  """The config a checkpoint was written with."""
  step = manager.latest_step() if step is None else step

  def read() -> dict:
    restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return verify_json(manager, step, 'config', restored.config)

  return config_lib.config_from_json_dict(agreed_read(read))


# Fields that decide the shapes in the train state (or the data): a resumed run must keep them.
# training.batch_size and seed fix the data stream: the batch of step k is a function of (seed, k, batch size).
STRUCTURAL_FIELDS = ('model', 'data.name', 'data.pad_to', 'data.image_size', 'data.tfds_config',
                     'loss.name', 'loss.target', 'training.ema_rates', 'optim.name', 'training.batch_size', 'seed')


def check_compatible(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises ValueError if `config` cannot resume the checkpoint written with `saved`; logs other changes."""
  old, new = config_lib.flatten_dict(saved.to_dict()), config_lib.flatten_dict(config.to_dict())
  changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
  fatal = [k for k in changed if any(k == f or k.startswith(f + '.') for f in STRUCTURAL_FIELDS)]
  if fatal:
    details = '; '.join(f'{k}: checkpoint {old.get(k)!r}, now {new.get(k)!r}' for k in fatal)
    raise ValueError(f'The checkpoint in {checkpoint_dir(workdir)} was written with a different config '
                     f'({details}). Resume with the same values, or use a new --workdir.')
  for k in changed:
    logging.warning('Resuming with config.%s = %r (the checkpoint was written with %r).', k, new.get(k),
                    old.get(k))
