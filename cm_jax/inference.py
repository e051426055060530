"""Notebook API: load a run's checkpoint read-only and sample from it in two lines.

    from cm_jax import inference
    images = inference.load('WORKDIR').sample(64, steps=2, seed=0)   # uint8 (64, H, W, C)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence, Union

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from cm_jax import checkpointing
from cm_jax import input_pipeline
from cm_jax import models
from cm_jax import sampling
from cm_jax import train_state as ts
from cm_jax.denoiser import Denoiser


def make_denoiser(config: ml_collections.ConfigDict) -> Denoiser:
  """The consistency function f_theta described by config.model and config.consistency."""
  cc = config.consistency
  return Denoiser(models.create_model(config.model), sigma_data=cc.sigma_data, sigma_min=cc.sigma_min)


def sample_from_keys(denoiser: Denoiser, params: Any, keys: jax.Array, shape_BHWC: tuple[int, ...],
                     times: Sequence[float], config: ml_collections.ConfigDict) -> jax.Array:
  """Samples in [-1, 1], one per key (example i depends only on keys[i]); jit-able with times static."""
  cc = config.consistency
  z, noise = sampling.draw_noise(keys, shape_BHWC, len(times))
  return sampling.multistep_sample(functools.partial(denoiser, params), z, noise, times, sigma_min=cc.sigma_min,
                                   sigma_max=cc.sigma_max, clip=config.sampling.clip)


def sampling_times(config: ml_collections.ConfigDict, steps: int,
                   ts_: Optional[Sequence[float]] = None) -> tuple[float, ...]:
  """The descending intermediate times of `steps`-step sampling: ts_ if given, else the config's defaults.

  Two steps default to config.sampling.two_step_t; other counts to the interior of a Karras grid.
  """
  cc = config.consistency
  if ts_ is None:
    if steps == 2:
      ts_ = (config.sampling.two_step_t,)
    else:
      ts_ = sampling.default_times(steps, cc.sigma_min, cc.sigma_max, cc.rho)
  if len(ts_) != steps - 1:
    raise ValueError(f'{steps}-step sampling needs {steps - 1} intermediate times, got {len(ts_)}: {ts_}.')
  return sampling.validate_times(ts_, cc.sigma_min, cc.sigma_max)


@dataclasses.dataclass
class LoadedModel:
  """A consistency model restored from a workdir: config, chosen parameters and where they came from."""
  config: ml_collections.ConfigDict
  params: Any
  step: int
  which_params: str  # 'ema_0.999' or 'online'.

  @functools.cached_property
  def denoiser(self) -> Denoiser:
    return make_denoiser(self.config)

  @functools.cached_property
  def _sample_fn(self):
    @functools.partial(jax.jit, static_argnames=('times', 'shape'))
    def run(params, keys, times, shape):
      return sample_from_keys(self.denoiser, params, keys, shape, times, self.config)
    return run

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return ts.image_shape(self.config)

  def sample_float(self, num: int, steps: int = 1, ts: Optional[Sequence[float]] = None, seed: int = 0,
                   batch_size: int = 256) -> np.ndarray:
    """num samples in [-1, 1], float32 (num, H, W, C). Sample i depends only on (seed, i, params, times)."""
    if num < 1 or batch_size < 1:
      raise ValueError(f'num and batch_size must be >= 1, got {num}, {batch_size}.')
    times = sampling_times(self.config, steps, ts)
    batch_size = min(batch_size, num)
    seed_key = jax.random.PRNGKey(seed)
    out = []
    for start in range(0, num, batch_size):
      keys = sampling.example_keys(seed_key, start, batch_size)  # The last batch is padded, then cut.
      x = self._sample_fn(self.params, keys, times, (batch_size,) + self.image_shape)
      out.append(np.asarray(jax.device_get(x))[:num - start])
    return np.concatenate(out)[:num]

  def sample(self, num: int, steps: int = 1, ts: Optional[Sequence[float]] = None, seed: int = 0,
             batch_size: int = 256) -> np.ndarray:
    """num samples as uint8 (num, H, W, C), the layout of the OpenAI evaluation suite's npz files."""
    return input_pipeline.to_uint8(self.sample_float(num, steps, ts, seed, batch_size))


def load(workdir: str, step: Optional[int] = None, ema: Union[None, float, str] = None) -> LoadedModel:
  """Restores a checkpoint of `workdir` read-only (default: the latest step).

  ema: None for the first sampling EMA of config.training.ema_rates, a rate from that tuple, or 'online'
  for the raw training parameters.
  """
  manager = checkpointing.make_manager(workdir, read_only=True)
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f'No checkpoint in {checkpointing.checkpoint_dir(workdir)}; train first with '
                            f'`python -m cm_jax.train --config=... --workdir={workdir}`.')
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise FileNotFoundError(f'No checkpoint for step {step} in {checkpointing.checkpoint_dir(workdir)}; '
                            f'available steps: {sorted(steps)}.')
  config = checkpointing.restore_config(manager, step)
  tx = ts.make_optimizer(config)
  replicated = NamedSharding(Mesh(np.asarray(jax.devices()), ('data',)), P())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          jax.eval_shape(functools.partial(ts.init_state, config, tx)))
  state = checkpointing.restore_parameters(manager, abstract, step)
  manager.close()

  rates = tuple(config.training.ema_rates)
  if ema == 'online':
    params, which = state['params'], 'online'
  else:
    rate = rates[0] if ema is None else float(ema)
    if rate not in rates:
      raise ValueError(f'ema={ema!r}: this run keeps EMAs {rates} (config.training.ema_rates); '
                       "pick one of them or 'online'.")
    params, which = state['ema_params'][rates.index(rate)], f'ema_{rate}'
  return LoadedModel(config=config, params=params, step=int(step), which_params=which)
