"""Notebook API: load a run's checkpoint read-only and sample from it in two lines.

    from cm_jax import inference
    images = inference.load('WORKDIR').sample(64, steps=2, seed=0)   # uint8 (64, H, W, C)

Consistency models (loss 'ct', 'cd', 'ect') use CM Algorithm 1 ('consistency' sampler, 1 or more steps);
EDM teachers (loss 'edm') use the EDM ODE sampler ('heun' or 'euler', default 18 Karras steps).
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
from cm_jax import karras
from cm_jax import models
from cm_jax import sampling
from cm_jax import train_state as ts
from cm_jax.denoiser import Denoiser


def is_diffusion_model(config: ml_collections.ConfigDict) -> bool:
  """True for an EDM denoiser (loss 'edm'), False for a consistency model."""
  return config.loss.name == 'edm'


def make_denoiser(config: ml_collections.ConfigDict) -> Denoiser:
  """The network of a run with its preconditioning: the consistency function f_theta (eps-shifted), or for an
  EDM teacher the denoiser D (eps = 0)."""
  cc = config.consistency
  sigma_min = 0.0 if is_diffusion_model(config) else cc.sigma_min
  return Denoiser(models.create_model(config.model), sigma_data=cc.sigma_data, sigma_min=sigma_min)


@dataclasses.dataclass(frozen=True)
class Sampler:
  """How to sample: 'consistency' (CM Algorithm 1 with intermediate `times`) or 'heun'/'euler' (EDM ODE)."""
  name: str
  steps: int
  times: tuple[float, ...] = ()

  def describe(self) -> str:
    if self.name == 'consistency':
      return f'{self.steps}-step consistency sampling' + (f', times {self.times}' if self.times else '')
    calls = 2 * self.steps - 1 if self.name == 'heun' else self.steps
    return f'EDM {self.name} sampler, {self.steps} steps ({calls} network calls)'


def make_sampler(config: ml_collections.ConfigDict, sampler: Optional[str] = None, steps: Optional[int] = None,
                 ts_: Optional[Sequence[float]] = None) -> Sampler:
  """Resolves (and checks) a sampler for the model `config` describes; None picks the config's defaults."""
  if is_diffusion_model(config):
    sampler = config.sampling.diffusion_solver if sampler is None else sampler
    if sampler not in sampling.ODE_SOLVERS:
      raise ValueError(f"sampler {sampler!r}: this run is an EDM diffusion model (loss.name = 'edm'); sample it "
                       f"with {' or '.join(repr(name) for name in sampling.ODE_SOLVERS)}.")
    if ts_ is not None:
      raise ValueError('Intermediate times (--ts) are for consistency sampling; the EDM sampler uses the '
                       'Karras grid of --steps points.')
    steps = config.sampling.diffusion_steps if steps is None else steps
    if steps < 1:
      raise ValueError(f'steps must be >= 1, got {steps}.')
    return Sampler(sampler, int(steps))
  sampler = 'consistency' if sampler is None else sampler
  if sampler != 'consistency':
    raise ValueError(f"sampler {sampler!r}: this run is a consistency model (loss.name = "
                     f"{config.loss.name!r}); sample it with 'consistency' (the Heun and Euler samplers need an "
                     "EDM denoiser).")
  steps = 1 if steps is None else steps
  return Sampler('consistency', int(steps), sampling_times(config, steps, ts_))


def grid_samplers(config: ml_collections.ConfigDict) -> tuple[Sampler, Sampler]:
  """The two panels of the training-time sample grids: one and two steps, or Heun and Euler for EDM."""
  if is_diffusion_model(config):
    return make_sampler(config, 'heun'), make_sampler(config, 'euler')
  return make_sampler(config, steps=1), make_sampler(config, steps=2)


def sample_from_keys(denoiser: Denoiser, params: Any, keys: jax.Array, shape_BHWC: tuple[int, ...],
                     sampler: Sampler, config: ml_collections.ConfigDict,
                     times: Optional[jax.Array] = None) -> jax.Array:
  """Samples in [-1, 1], one per key (example i depends only on keys[i]); jit-able with `sampler` static.

  times: None for sampler.times, else a (steps - 1,) array of intermediate times used instead (traced).
  """
  cc = config.consistency
  denoise_fn = functools.partial(denoiser, params)
  z, noise = sampling.draw_noise(keys, shape_BHWC, len(sampler.times))
  if sampler.name == 'consistency':
    times = sampler.times if times is None else times
    return sampling.multistep_sample(denoise_fn, z, noise, times, sigma_min=cc.sigma_min,
                                     sigma_max=cc.sigma_max, clip=config.sampling.clip)
  sigmas = karras.edm_sampling_sigmas(sampler.steps, cc.sigma_min, cc.sigma_max, cc.rho)
  return sampling.diffusion_sample(denoise_fn, z, sigmas, sampler.name, clip=config.sampling.clip)


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
  workdir: str = ''

  @functools.cached_property
  def denoiser(self) -> Denoiser:
    return make_denoiser(self.config)

  @functools.cached_property
  def _sample_fn(self):
    return make_sample_fn(self.denoiser, self.config)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return ts.image_shape(self.config)

  @property
  def is_diffusion_model(self) -> bool:
    return is_diffusion_model(self.config)

  def sample_float(self, num: int, steps: Optional[int] = None, ts: Optional[Sequence[float]] = None,
                   seed: int = 0, batch_size: int = 256, sampler: Optional[str] = None) -> np.ndarray:
    """num samples in [-1, 1], float32 (num, H, W, C). Sample i depends only on (seed, i, params, sampler).

    sampler: None for the model's default ('consistency', or config.sampling.diffusion_solver for an EDM
    model), else 'consistency' | 'heun' | 'euler'. steps: None for 1 (consistency) or
    config.sampling.diffusion_steps (EDM). ts: intermediate times of consistency sampling.
    """
    spec = make_sampler(self.config, sampler, steps, ts)
    return sample_in_batches(self._sample_fn, self.params, spec, num, seed, batch_size, self.image_shape)

  def sample(self, num: int, steps: Optional[int] = None, ts: Optional[Sequence[float]] = None, seed: int = 0,
             batch_size: int = 256, sampler: Optional[str] = None) -> np.ndarray:
    """num samples as uint8 (num, H, W, C), the layout of the OpenAI evaluation suite's npz files."""
    return input_pipeline.to_uint8(self.sample_float(num, steps, ts, seed, batch_size, sampler))


def make_sample_fn(denoiser: Denoiser, config: ml_collections.ConfigDict):
  """jit(sample_from_keys) as fn(params, keys, sampler, shape_BHWC).

  Compiled once per (sampler name, steps, shape): the intermediate times are a traced argument, so trying
  many times (the two-step search) does not recompile.
  """
  @functools.partial(jax.jit, static_argnames=('sampler', 'shape'))
  def traced(params, keys, times, sampler, shape):
    return sample_from_keys(denoiser, params, keys, shape, sampler, config, times=times)

  def run(params, keys, sampler: Sampler, shape):
    times = np.asarray(sampler.times, np.float32)
    placeholder = dataclasses.replace(sampler, times=(0.0,) * len(sampler.times))  # The static part only.
    return traced(params, keys, times, placeholder, shape)
  return run


def sample_in_batches(sample_fn, params: Any, spec: Sampler, num: int, seed: int, batch_size: int,
                      image_shape: tuple[int, ...]) -> np.ndarray:
  """num samples in [-1, 1] as float32 numpy, from `sample_fn(params, keys, spec, shape)` (a jitted
  `sample_from_keys`). Sample i uses key fold_in(PRNGKey(seed), i), whatever the batch size."""
  if num < 1 or batch_size < 1:
    raise ValueError(f'num and batch_size must be >= 1, got {num}, {batch_size}.')
  batch_size = min(batch_size, num)
  seed_key = jax.random.PRNGKey(seed)
  out = []
  for start in range(0, num, batch_size):
    keys = sampling.example_keys(seed_key, start, batch_size)  # The last batch is padded, then cut.
    x = sample_fn(params, keys, spec, (batch_size,) + tuple(image_shape))
    out.append(np.asarray(jax.device_get(x))[:num - start])
  return np.concatenate(out)[:num]


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
  return LoadedModel(config=config, params=params, step=int(step), which_params=which, workdir=workdir)
