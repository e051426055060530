"""Orbax checkpoints of a run: the whole train state plus the config as JSON, one checkpoint per step.

The data position is the step itself (the batch of step k is a function of (seed, k); see
input_pipeline.batch_indices), and the step rng is fold_in(state.rng, step), so the saved state is all a
resume needs.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp

CHECKPOINT_SUBDIR = 'checkpoints'


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)


def make_manager(workdir: str, config: Optional[ml_collections.ConfigDict] = None,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """Manager for WORKDIR/checkpoints: async saves, keeps the latest few plus every keep_every-th step."""
  if read_only:
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  else:
    tc = config.training
    options = ocp.CheckpointManagerOptions(
        max_to_keep=tc.keep_checkpoints, keep_period=tc.keep_every or None, create=True,
        enable_async_checkpointing=True, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=('state', 'config'))


def save(manager: ocp.CheckpointManager, state: Any, config: ml_collections.ConfigDict) -> None:
  """Starts an async save of `state` at its step (call manager.wait_until_finished() before exit)."""
  step = int(jax.device_get(state.step))
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             config=ocp.args.JsonSave(config.to_dict())), force=True)


def restore_state(manager: ocp.CheckpointManager, abstract_state: Any, step: Optional[int] = None) -> Any:
  """Restores the state at `step` (default: latest) into the shapes and shardings of abstract_state."""
  step = manager.latest_step() if step is None else step
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  return restored.state


def restore_config(manager: ocp.CheckpointManager, step: Optional[int] = None) -> ml_collections.ConfigDict:
  """The config a checkpoint was written with."""
  step = manager.latest_step() if step is None else step
  restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return config_from_json_dict(restored.config)


def config_from_json_dict(d: dict) -> ml_collections.ConfigDict:
  """ConfigDict from its JSON form; lists become tuples again (configs use tuples for sequences)."""
  def fix(v):
    if isinstance(v, dict):
      return {k: fix(x) for k, x in v.items()}
    if isinstance(v, list):
      return tuple(fix(x) for x in v)
    return v
  return ml_collections.ConfigDict(fix(d))
