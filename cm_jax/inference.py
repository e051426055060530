"""Notebook API: load a run's checkpoint read-only and sample from it in two lines.

    from cm_jax import inference
    images = inference.load('WORKDIR').sample(64, steps=2, seed=0)   # uint8 (64, H, W, C)

Consistency models (loss 'ct', 'cd', 'ect') use CM Algorithm 1 ('consistency' sampler, 1 or more steps);
EDM teachers (loss 'edm') use the EDM ODE sampler ('heun' or 'euler', default 18 Karras steps); MeanFlow runs
(loss 'meanflow') jump from t = 1 to 0 ('meanflow' sampler, 1 or more steps).
This module only composes: checkpoints from cm_jax/checkpointing.py, sampler specs and sharded sampling from
cm_jax/samplers.py, the network from cm_jax/core/denoiser.py.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence, Union

from absl import logging
import jax
import ml_collections
import numpy as np

from cm_jax import checkpointing
from cm_jax import samplers
from cm_jax import train_state as ts
from cm_jax.core import pixels
from cm_jax.core.denoiser import Denoiser, is_diffusion_model, is_flow_model, make_denoiser
from cm_jax.data import catalog
from cm_jax.runtime import errors
from cm_jax.runtime import sharding
from cm_jax.runtime import xla_flags
# Notebooks sample through this module: give them cm_jax's XLA CPU settings too (a no-op once a backend runs).
xla_flags.apply()


@dataclasses.dataclass
class LoadedModel:
  """A consistency model restored from a workdir: config, chosen parameters and where they came from."""
  config: ml_collections.ConfigDict
  params: Any
  step: int
  which_params: str  # 'ema_0.999' or 'online'.
  workdir: str = ''

  @functools.cached_property
  def denoiser(self) -> Denoiser:
    return make_denoiser(self.config)

  @functools.cached_property
  def _sample_fn(self):
    return samplers.make_sample_fn(self.denoiser)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return catalog.image_shape(self.config.data)

  @property
  def is_diffusion_model(self) -> bool:
    return is_diffusion_model(self.config)

  @property
  def is_flow_model(self) -> bool:
    """A MeanFlow flow map (loss.name = 'meanflow'): sampled by jumps from t = 1 to 0; no editing."""
    return is_flow_model(self.config)

  @property
  def num_classes(self) -> int:
    """Classes of a class-conditional model; 0 for an unconditional one."""
    return samplers.num_classes(self.config.model)

  def labels(self, num: int, seed: int = 0, labels: samplers.LabelsArg = None) -> Optional[np.ndarray]:
    """The class labels int32 (num,) that sampling with these arguments uses (None: unconditional model).

    labels: None draws them uniformly (label i depends only on (seed, i)), an int gives every sample that
    class, an array gives one label per sample. A network trained with a null label (model.null_class, MeanFlow's
    guidance) also takes label num_classes: its unconditional, unguided samples.
    """
    return samplers.resolve_labels(self.num_classes, num, seed, labels, samplers.null_label(self.config.model))

  def sample_float(self, num: int, steps: Optional[int] = None, ts: Optional[Sequence[float]] = None,
                   seed: int = 0, batch_size: int = 256, sampler: Optional[str] = None,
                   labels: samplers.LabelsArg = None) -> np.ndarray:
    """num samples in [-1, 1], float32 (num, H, W, C). Sample i depends only on (seed, i, its label, params,
    sampler).

    sampler: None for the model's default ('consistency', or config.sampling.diffusion_solver for an EDM
    model), else 'consistency' | 'heun' | 'euler'. steps: None for 1 (consistency) or
    config.sampling.diffusion_steps (EDM). ts: intermediate times of consistency sampling. labels: for a
    class-conditional model, None (uniform; see `labels`), a class, or one label per sample.
    """
    spec = samplers.make_sampler(self.config, sampler, steps, ts)
    return samplers.sample_in_batches(self._sample_fn, self.params, spec, num, seed, batch_size, self.image_shape,
                                      self.labels(num, seed, labels))

  def sample(self, num: int, steps: Optional[int] = None, ts: Optional[Sequence[float]] = None, seed: int = 0,
             batch_size: int = 256, sampler: Optional[str] = None, labels: samplers.LabelsArg = None) -> np.ndarray:
    """num samples as uint8 (num, H, W, C), the layout of the OpenAI evaluation suite's npz files."""
    return pixels.to_uint8(self.sample_float(num, steps, ts, seed, batch_size, sampler, labels))


def load(workdir: str, step: Optional[int] = None, ema: Union[None, float, str] = None) -> LoadedModel:
  """Restores a checkpoint of `workdir` read-only (default: the latest step that reads and verifies).

  ema: None for the first sampling EMA of config.training.ema_rates, a rate from that tuple, or 'online'
  for the raw training parameters.

  A damaged newest checkpoint (unreadable files, or arrays that fail their checksums) is skipped with a warning
  naming it, in favour of the newest one that loads; nothing in the workdir is moved or changed. An explicit
  `step` that is damaged raises checkpointing.UnreadableCheckpointError naming it and the other steps there.
  """
  manager = checkpointing.make_manager(workdir, read_only=True)
  try:
    steps = manager.all_steps()
    if not steps:
      raise FileNotFoundError(f'No checkpoint in {checkpointing.checkpoint_dir(workdir)}; train first with '
                              f'`python -m cm_jax.train --config=... --workdir={workdir}`.')
    if step is not None and step not in steps:
      raise FileNotFoundError(f'No checkpoint for step {step} in {checkpointing.checkpoint_dir(workdir)}; '
                              f'available steps: {sorted(steps)}.')
    step, (config, state) = checkpointing.restore_read_only(
        manager, functools.partial(_restore_parameters, manager), step)
  finally:
    manager.close()

  rates = tuple(config.training.ema_rates)
  if ema == 'online':
    params, which = state['params'], 'online'
  else:
    rate = rates[0] if ema is None else float(ema)
    if rate not in rates:
      raise errors.UsageError(f'ema={ema!r}: this run keeps EMAs {rates} (config.training.ema_rates); '
                       "pick one of them or 'online'.")
    params, which = state['ema_params'][rates.index(rate)], f'ema_{rate}'
  return LoadedModel(config=config, params=params, step=int(step), which_params=which, workdir=workdir)


def _restore_parameters(manager, step: int) -> tuple[ml_collections.ConfigDict, dict]:
  """(config, {'params', 'ema_params'}) of checkpoint `step`, replicated over every device, checksums verified."""
  checkpointing.agreed_read(lambda: checkpointing.check_no_links(manager, step))  # Before the step is read.
  config = checkpointing.restore_config(manager, step)
  # A path read from a checkpoint never decides where files are written: the evaluation cache is the user's
  # (--cache_dir, $CM_JAX_CACHE or ~/.cache/cm_jax), not the one recorded by whoever trained the run.
  if config.evaluation.cache_dir:
    logging.info('Not using evaluation.cache_dir = %r recorded in the checkpoint (pass --cache_dir to use it).',
                 config.evaluation.cache_dir)
    config.evaluation.cache_dir = None
  tx = ts.make_optimizer(config)
  replicated = sharding.replicated(sharding.make_mesh())  # The mesh make_sample_fn shards batches over.
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          jax.eval_shape(functools.partial(ts.init_state, config, tx)))
  return config, checkpointing.restore_parameters(manager, abstract, step)
