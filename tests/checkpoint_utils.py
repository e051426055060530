"""Test helper: restore a whole train state from a workdir's checkpoint on one device, for inspection."""

import functools
from typing import Optional

import jax
import orbax.checkpoint as ocp

from cm_jax import checkpointing
from cm_jax import train_state as ts


def restore_full_state(workdir, step: Optional[int] = None) -> tuple:
  """(step, TrainState) of checkpoint `step` of `workdir` (default: the latest), every array on device 0.

  The config comes from the checkpoint itself, so any run's state restores without knowing its config.
  """
  manager = checkpointing.make_manager(str(workdir), read_only=True)
  try:
    step = manager.latest_step() if step is None else step
    assert step is not None, f'no checkpoint in {workdir}'
    config = checkpointing.restore_config(manager, step)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.eval_shape(functools.partial(ts.init_state, config, ts.make_optimizer(config)))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))).state
  finally:
    manager.close()
  return step, state


def rewrite_saved_config(workdir, edit) -> None:
  """edit(config dict) on the saved config of every checkpoint of `workdir`, with its checksum updated to match
  (a deliberate change, as a test makes one; a change without it is damage that restores refuse)."""
  import json  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  for meta in pathlib.Path(workdir).glob('checkpoints/*/config/metadata'):
    saved = json.loads(meta.read_text())
    edit(saved)
    meta.write_text(json.dumps(saved))
    sums = meta.parent.parent / checkpointing.CHECKSUMS_ITEM / 'metadata'
    if sums.exists():
      record = json.loads(sums.read_text())
      record['#config'] = checkpointing.json_checksum(saved)
      sums.write_text(json.dumps(record))
