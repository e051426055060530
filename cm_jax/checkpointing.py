"""Orbax checkpoints of a run: the whole train state plus the config as JSON, one checkpoint per step.

The data position is the step itself (the batch of step k is a function of (seed, k); see
input_pipeline.batch_indices), and the step rng is fold_in(state.rng, step), so the saved state is all a
resume needs.
"""

from __future__ import annotations

import importlib
import os
import time
from typing import Any, Optional

from absl import logging
from etils import epath
import jax
import ml_collections
import orbax.checkpoint as ocp

from cm_jax import multihost
from cm_jax import paths
from cm_jax.configs import default as default_config

CHECKPOINT_SUBDIR = 'checkpoints'


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
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=('state', 'config', 'data'))


def save(manager: ocp.CheckpointManager, state: Any, config: ml_collections.ConfigDict, data: dict) -> None:
  """Starts an async save of `state` at its step (call manager.wait_until_finished() before exit)."""
  step = int(jax.device_get(state.step))
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             config=ocp.args.JsonSave(config.to_dict()),
                                             data=ocp.args.JsonSave(data)), force=True)


def restore_for_resume(manager: ocp.CheckpointManager, abstract_state: Any, config: ml_collections.ConfigDict,
                       data: dict, workdir: str) -> Any:
  """The state of the newest readable checkpoint, after checking that `config` and `data` can resume it.

  An unreadable checkpoint (a truncated file, a failed disk) is skipped with a warning in favour of the
  next older one, and moved to WORKDIR/unreadable_checkpoints/ (kept for inspection) so that the resumed run
  can save that step again. A config or data mismatch is the user's to fix and raises ValueError at once.
  """
  problems, unreadable = [], []

  def skip(step: int, e: Exception) -> None:
    problems.append(f'step {step}: {type(e).__name__}: {e}')
    unreadable.append(step)
    logging.warning('Checkpoint at step %d is unreadable (%s); trying an older one.', step, problems[-1])

  for step in sorted(manager.all_steps(), reverse=True):
    try:
      meta = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore(),
                                                           data=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      skip(step, e)
      continue
    check_compatible(config_from_json_dict(meta.config), config, workdir)
    check_same_data(meta.data, data, workdir)
    try:
      state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))).state
    except Exception as e:  # pylint: disable=broad-except
      skip(step, e)
      continue
    if unreadable and jax.process_index() == 0:
      move_aside(workdir, unreadable)
    multihost.barrier('cm_jax_checkpoint_restored')  # No process lists a checkpoint that is being moved away.
    manager.reload()
    return state
  raise RuntimeError(f'No readable checkpoint in {checkpoint_dir(workdir)}: {problems}. Move the directory '
                     'away to start afresh.')


def move_aside(workdir: str, steps: list[int]) -> str:
  """Moves the checkpoints of `steps` to WORKDIR/unreadable_checkpoints/STEP-TIME; returns that folder."""
  aside = epath.Path(paths.absolute(workdir)) / 'unreadable_checkpoints'
  aside.mkdir(parents=True, exist_ok=True)
  for bad in steps:
    (epath.Path(checkpoint_dir(workdir)) / str(bad)).rename(aside / f'{bad}-{time.time():.0f}')
    logging.warning('Moved the unreadable checkpoint of step %d to %s.', bad, aside)
  return os.fspath(aside)


def saved_data(manager: ocp.CheckpointManager) -> Optional[dict]:
  """The `data` record (data fingerprint, and the teacher of CD/ECT runs) of the newest checkpoint that reads."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data
    except Exception:  # pylint: disable=broad-except
      continue  # restore_for_resume reports and sets aside unreadable checkpoints.
  return None


def saved_config(manager: ocp.CheckpointManager) -> Optional[ml_collections.ConfigDict]:
  """The config of the newest checkpoint that reads (None without one)."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return restore_config(manager, step)
    except Exception:  # pylint: disable=broad-except
      continue  # restore_for_resume reports and sets aside unreadable checkpoints.
  return None


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


def restore_parameters(manager: ocp.CheckpointManager, abstract_state: Any, step: int) -> dict:
  """Only `params` and `ema_params` of a checkpoint (a partial restore: no optimizer state is read)."""
  item = {'params': abstract_state.params, 'ema_params': abstract_state.ema_params}
  args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                partial_restore=True)
  return manager.restore(step, args=ocp.args.Composite(state=args)).state


def restore_config(manager: ocp.CheckpointManager, step: Optional[int] = None) -> ml_collections.ConfigDict:
  """The config a checkpoint was written with."""
  step = manager.latest_step() if step is None else step
  restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return config_from_json_dict(restored.config)


# Fields that decide the shapes in the train state (or the data): a resumed run must keep them.
# training.batch_size and seed fix the data stream: the batch of step k is a function of (seed, k, batch size).
STRUCTURAL_FIELDS = ('model', 'data.name', 'data.pad_to', 'data.image_size', 'data.tfds_config',
                     'loss.name', 'loss.target', 'training.ema_rates', 'optim.name', 'training.batch_size', 'seed')


def check_compatible(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises ValueError if `config` cannot resume the checkpoint written with `saved`; logs other changes."""
  old, new = flatten_dict(saved.to_dict()), flatten_dict(config.to_dict())
  changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
  fatal = [k for k in changed if any(k == f or k.startswith(f + '.') for f in STRUCTURAL_FIELDS)]
  if fatal:
    details = '; '.join(f'{k}: checkpoint {old.get(k)!r}, now {new.get(k)!r}' for k in fatal)
    raise ValueError(f'The checkpoint in {checkpoint_dir(workdir)} was written with a different config '
                     f'({details}). Resume with the same values, or use a new --workdir.')
  for k in changed:
    logging.warning('Resuming with config.%s = %r (the checkpoint was written with %r).', k, new.get(k),
                    old.get(k))


def flatten_dict(d: dict, prefix: str = '') -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}; lists become tuples."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten_dict(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = tuple(v) if isinstance(v, list) else v
  return out


def config_from_json_dict(d: dict) -> ml_collections.ConfigDict:
  """ConfigDict from its JSON form, on top of cm_jax/configs/default.py.

  Lists become tuples again (configs use tuples for sequences); fields added to cm_jax after the
  checkpoint was written take their defaults, so older runs stay loadable.
  """
  def fix(v):
    if isinstance(v, dict):
      return {k: fix(x) for k, x in v.items()}
    if isinstance(v, list):
      return tuple(fix(x) for x in v)
    return v

  def merge(base: dict, saved: dict) -> dict:
    out = dict(base)
    for k, v in saved.items():
      out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out

  return ml_collections.ConfigDict(merge(default_config.get_config().to_dict(), fix(d)))
