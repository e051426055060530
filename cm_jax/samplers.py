"""Samplers: specs resolved once from a run's config, and sharded batched sampling on every device.

The sampling maths (CM Algorithm 1, the EDM ODE solvers) is cm_jax/core/sampling.py; the sample CLI is
cm_jax/sample.py; the notebook API that composes these (`inference.load(...).sample(...)`) is
cm_jax/inference.py.

    spec = samplers.make_sampler(config, steps=2)                    # Everything sampling needs, no config.
    run = samplers.make_sample_fn(denoiser)                          # jit over every device of every process.
    x = samplers.sample_in_batches(run, params, spec, num=1000, seed=0, batch_size=256, image_shape=(28, 28, 1))
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np

from cm_jax.core import karras
from cm_jax.core import meanflow
from cm_jax.core import sampling
from cm_jax.core.denoiser import Denoiser, boundary, is_diffusion_model, is_flow_model
from cm_jax.runtime import device_map
from cm_jax.runtime import sharding

# Class labels of a class-conditional model: None (drawn uniformly), one class for all samples, or one each.
LabelsArg = Union[None, int, Sequence[int], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Sampler:
  """How to sample: 'consistency' (CM Algorithm 1 with intermediate `times`) or 'heun'/'euler' (EDM ODE).

  start_t: consistency sampling's first time, x = start_t z and f(x, start_t) (None: sigma_max).
  sigma_min, sigma_max, rho: the run's noise range and Karras grid (config.consistency; for consistency
  sampling sigma_min is the consistency function's boundary, denoiser.boundary: 0 for sCM); clip: clip the
  result to [-1, 1] (config.sampling.clip). A spec is hashable: jit takes it as a static argument.
  """
  name: str
  steps: int
  times: tuple[float, ...] = ()
  start_t: Optional[float] = None
  sigma_min: float = dataclasses.field(kw_only=True)
  sigma_max: float = dataclasses.field(kw_only=True)
  rho: float = dataclasses.field(kw_only=True)
  clip: bool = dataclasses.field(kw_only=True)

  def describe(self) -> str:
    if self.name == 'meanflow':
      return f'{self.steps}-step MeanFlow sampling' + (f', times {self.times}' if self.times else '')
    if self.name == 'consistency':
      return (f'{self.steps}-step consistency sampling' + (f', times {self.times}' if self.times else '') +
              (f', from t = {self.start_t:g}' if self.start_t is not None else ''))
    calls = 2 * self.steps - 1 if self.name == 'heun' else self.steps
    return f'EDM {self.name} sampler, {self.steps} steps ({calls} network calls)'

  @property
  def first_time(self) -> float:
    """The time of the first network call: start_t, else sigma_max."""
    return self.sigma_max if self.start_t is None else self.start_t


def make_sampler(config: ml_collections.ConfigDict, sampler: Optional[str] = None, steps: Optional[int] = None,
                 ts_: Optional[Sequence[float]] = None) -> Sampler:
  """Resolves (and checks) a sampler for the model `config` describes; None picks the config's defaults."""
  cc = config.consistency
  noise = dict(sigma_min=float(cc.sigma_min), sigma_max=float(cc.sigma_max), rho=float(cc.rho),
               clip=bool(config.sampling.clip))
  if is_flow_model(config):
    if sampler not in (None, 'meanflow'):
      raise ValueError(f"sampler {sampler!r}: this run is a MeanFlow flow map (loss.name = 'meanflow'); sample it "
                       "with 'meanflow' (jumps z_r = z_t - (t - r) u(z_t, r, t) from t = 1 to 0).")
    if config.sampling.start_t is not None:
      raise ValueError('sampling.start_t (--start_t) is for consistency sampling; a MeanFlow model samples from '
                       't = 1.')
    steps = 1 if steps is None else steps
    return Sampler('meanflow', int(steps), flow_times(config, steps, ts_), None,
                   **dict(noise, sigma_min=0.0, sigma_max=1.0))
  if is_diffusion_model(config):
    sampler = config.sampling.diffusion_solver if sampler is None else sampler
    if sampler not in sampling.ODE_SOLVERS:
      raise ValueError(f"sampler {sampler!r}: this run is an EDM diffusion model (loss.name = 'edm'); sample it "
                       f"with {' or '.join(repr(name) for name in sampling.ODE_SOLVERS)}.")
    if ts_ is not None:
      raise ValueError('Intermediate times (--ts) are for consistency sampling; the EDM sampler uses the '
                       'Karras grid of --steps points.')
    if config.sampling.start_t is not None:
      raise ValueError('sampling.start_t (--start_t) is for consistency sampling; the EDM sampler starts at '
                       'consistency.sigma_max.')
    steps = config.sampling.diffusion_steps if steps is None else steps
    if steps < 1:
      raise ValueError(f'steps must be >= 1, got {steps}.')
    return Sampler(sampler, int(steps), **noise)
  sampler = 'consistency' if sampler is None else sampler
  if sampler == 'meanflow':
    raise ValueError(f"sampler 'meanflow' is for MeanFlow runs; this run is a consistency model (loss.name = "
                     f"{config.loss.name!r}): sample it with 'consistency'.")
  if sampler != 'consistency':
    raise ValueError(f"sampler {sampler!r}: this run is a consistency model (loss.name = "
                     f"{config.loss.name!r}); sample it with 'consistency' (the Heun and Euler samplers need an "
                     "EDM denoiser).")
  steps = 1 if steps is None else steps
  start_t = None if config.sampling.start_t is None else start_time(config)
  # The re-noising sqrt(t^2 - eps^2) of later steps uses the boundary of the run's consistency function
  # (0 for sCM runs, trained without the sigma_min shift).
  noise['sigma_min'] = boundary(config)
  return Sampler('consistency', int(steps), sampling_times(config, steps, ts_), start_t, **noise)


def flow_times(config: ml_collections.ConfigDict, steps: int,
               ts_: Optional[Sequence[float]] = None) -> tuple[float, ...]:
  """The descending intermediate flow times in (0, 1) of `steps`-step MeanFlow sampling: ts_ if given, else
  sampling.two_step_t for two steps and equal jumps (meanflow.uniform_times) otherwise."""
  if steps < 1:
    raise ValueError(f'steps must be >= 1, got {steps}.')
  if ts_ is None:
    ts_ = (config.sampling.two_step_t,) if steps == 2 else tuple(meanflow.uniform_times(steps)[1:-1])
  ts_ = tuple(float(t) for t in ts_)
  if len(ts_) != steps - 1:
    raise ValueError(f'{steps}-step sampling needs {steps - 1} intermediate times, got {len(ts_)}: {ts_}.')
  grid = (1.0,) + ts_ + (0.0,)
  if any(a <= b for a, b in zip(grid, grid[1:])):
    raise ValueError(f'MeanFlow intermediate times must descend strictly inside (0, 1) (noise at 1, data at 0), '
                     f'got {ts_}.')
  return ts_


def start_time(config: ml_collections.ConfigDict) -> float:
  """Consistency sampling's first time: sampling.start_t (checked to lie in (sigma_min, sigma_max]), else
  consistency.sigma_max."""
  cc = config.consistency
  if config.sampling.start_t is None:
    return float(cc.sigma_max)
  start_t = float(config.sampling.start_t)
  if not cc.sigma_min < start_t <= cc.sigma_max:
    raise ValueError(f'sampling.start_t = {start_t:g} must lie in (sigma_min, sigma_max] = '
                     f'({cc.sigma_min:g}, {cc.sigma_max:g}].')
  return start_t


def set_start_time(config: ml_collections.ConfigDict, start_t: Optional[float]) -> None:
  """Sets config.sampling.start_t (the --start_t of the CLIs; None keeps the run's) and checks it."""
  if start_t is not None and is_flow_model(config):
    raise ValueError('is for consistency sampling; a MeanFlow model samples from t = 1 (leave --start_t out).')
  if start_t is not None:
    config.sampling.start_t = start_t
    start_time(config)


def grid_samplers(config: ml_collections.ConfigDict) -> tuple[Sampler, Sampler]:
  """The two panels of the training-time sample grids: one and two steps (consistency and MeanFlow models), or
  Heun and Euler for EDM."""
  if is_diffusion_model(config):
    return make_sampler(config, 'heun'), make_sampler(config, 'euler')
  return make_sampler(config, steps=1), make_sampler(config, steps=2)


def sample_from_keys(denoiser: Denoiser, params: Any, keys: jax.Array, shape_BHWC: tuple[int, ...],
                     sampler: Sampler, times: Optional[jax.Array] = None,
                     labels_B: Optional[jax.Array] = None) -> jax.Array:
  """Samples in [-1, 1], one per key (example i depends only on keys[i] and labels_B[i]); jit-able with
  `sampler` static.

  times: None for sampler.times, else a (steps - 1,) array of intermediate times used instead (traced).
  labels_B: the class of each sample for a class-conditional model, else None.
  """
  flow = sampler.name == 'meanflow'  # Its jumps re-noise nothing: only z (the same z whatever the count).
  z, noise = sampling.draw_noise(keys, shape_BHWC, 0 if flow else len(sampler.times))
  if flow:  # denoiser is the run's meanflow.FlowMap; z is the noise at t = 1.
    times = jnp.asarray(sampler.times if times is None else times, z.dtype)
    grid = jnp.concatenate([jnp.ones((1,), z.dtype), times, jnp.zeros((1,), z.dtype)])
    for i in range(sampler.steps):
      t_B, r_B = jnp.full((z.shape[0],), grid[i]), jnp.full((z.shape[0],), grid[i + 1])
      z = meanflow.step(denoiser(params, z, r_B, t_B, labels_B=labels_B), z, r_B, t_B)
    return jnp.clip(z, -1.0, 1.0) if sampler.clip else z

  def denoise_fn(x_BHWC, sigma_B):
    return denoiser(params, x_BHWC, sigma_B, labels_B=labels_B)

  if sampler.name == 'consistency':
    times = sampler.times if times is None else times
    return sampling.multistep_sample(denoise_fn, z, noise, times, sigma_min=sampler.sigma_min,
                                     sigma_max=sampler.first_time, clip=sampler.clip)
  sigmas = karras.edm_sampling_sigmas(sampler.steps, sampler.sigma_min, sampler.sigma_max, sampler.rho)
  return sampling.diffusion_sample(denoise_fn, z, sigmas, sampler.name, clip=sampler.clip)


def sampling_times(config: ml_collections.ConfigDict, steps: int,
                   ts_: Optional[Sequence[float]] = None) -> tuple[float, ...]:
  """The descending intermediate times of `steps`-step sampling: ts_ if given, else the config's defaults.

  Two steps default to config.sampling.two_step_t; other counts to the interior of a Karras grid.
  """
  cc = config.consistency
  two_step_default = ts_ is None and steps == 2
  if two_step_default:
    ts_ = (config.sampling.two_step_t,)
  elif ts_ is None:
    ts_ = sampling.default_times(steps, cc.sigma_min, cc.sigma_max, cc.rho)
  if len(ts_) != steps - 1:
    raise ValueError(f'{steps}-step sampling needs {steps - 1} intermediate times, got {len(ts_)}: {ts_}.')
  first = start_time(config)
  try:
    return sampling.validate_times(ts_, cc.sigma_min, first)
  except ValueError as e:
    if not two_step_default:
      raise
    # E.g. a --start_t below the run's two-step time: name the config field, not --ts.
    raise ValueError(f'sampling.two_step_t = {ts_[0]:g} does not lie in (sigma_min, start time) = '
                     f'({cc.sigma_min:g}, {first:g}); give two-step sampling\'s time with --ts.') from e


def make_sample_fn(denoiser: Denoiser, mesh: Optional[Mesh] = None):
  """jit(sample_from_keys) as run(params, keys, sampler, shape_BHWC, labels=None), split over the devices of
  `mesh` (default: every device of every process, sharding.make_mesh()).

  The batch axis of keys, labels and samples is sharded over the mesh's 'data' axis and params are
  replicated, so each of the n devices computes B / n samples. A batch that n does not divide is padded to a
  multiple of n (the last key repeated) and the result cut back to B rows. Returns a global jax.Array
  (`sharding.to_host` brings all of it to every process). In a multi-process run every process calls run
  with the same keys and labels. `run.mesh` is the mesh.

  Compiled once per (sampler name, steps, shape): the intermediate times are a traced argument, so trying
  many times (the two-step search) does not recompile.
  """
  if mesh is not None and not isinstance(mesh, Mesh):  # make_sample_fn(denoiser, config) before samplers.py.
    raise TypeError(f'make_sample_fn(denoiser, mesh=None): mesh must be a jax.sharding.Mesh, got '
                    f'{type(mesh).__name__}; the sampler spec (make_sampler) now carries what the config set.')
  mesh = sharding.make_mesh() if mesh is None else mesh
  replicated, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)

  @functools.partial(jax.jit, static_argnames=('sampler', 'shape'),
                     in_shardings=(replicated, batch, replicated, batch), out_shardings=batch)
  def traced(params, keys, times, labels, sampler, shape):
    return sample_from_keys(denoiser, params, keys, shape, sampler, times=times, labels_B=labels)

  def arguments(params, keys, sampler: Sampler, shape, labels):
    num = keys.shape[0]
    if shape[0] != num:
      raise ValueError(f'{num} keys for a batch of shape {tuple(shape)}.')
    size = sharding.padded_batch_size(num, mesh)
    keys = sharding.shard_batch(sharding.pad_rows(keys, size), mesh)
    if labels is not None:
      labels = labels if isinstance(labels, jax.Array) else np.asarray(labels, np.int32)
      labels = sharding.shard_batch(sharding.pad_rows(labels, size), mesh)
    times = np.asarray(sampler.times, np.float32)
    # Params in another layout (FSDP-sharded) are gathered; already replicated ones are not copied.
    params = sharding.replicate(params, mesh)
    if mesh.is_multi_process:  # jit takes only global arrays there.
      times = sharding.replicate(times, mesh)
    placeholder = dataclasses.replace(sampler, times=(0.0,) * len(sampler.times))  # The static part only.
    return (params, keys, times, labels, placeholder, (size,) + tuple(shape[1:])), num

  def run(params, keys, sampler: Sampler, shape, labels=None):
    args, num = arguments(params, keys, sampler, shape, labels)
    x = traced(*args)
    return x if x.shape[0] == num else x[:num]

  def lower(params, keys, sampler: Sampler, shape, labels=None):
    """The jax.stages.Lowered program that run(...) executes with these arguments (for cost and HLO checks)."""
    return traced.lower(*arguments(params, keys, sampler, shape, labels)[0])

  run.mesh, run.lower = mesh, lower
  return run


def sample_in_batches(sample_fn, params: Any, spec: Sampler, num: int, seed: int, batch_size: int,
                      image_shape: tuple[int, ...], labels: Optional[np.ndarray] = None,
                      before_batch: Optional[Callable[[], None]] = None,
                      progress_label: Optional[str] = None) -> np.ndarray:
  """num samples in [-1, 1] as float32 numpy, from `sample_fn(params, keys, spec, shape, labels)` (a jitted
  `sample_from_keys`). Sample i uses key fold_in(PRNGKey(seed), i) and labels[i], whatever the batch size.

  For a `make_sample_fn` function each batch is split over its mesh: min(batch_size, num) is rounded up to
  a multiple of the device count (rows past num get the keys of the following indices and are dropped), and
  every process gets all num samples (in a multi-process run every process must call this together).
  before_batch() runs before each batch (training passes its preemption check, which may raise).
  Process 0 logs progress (images/s, ETA; cm_jax.runtime.progress) as `progress_label`, by default 'Sampling (2-step
  consistency, times 0.821)' or the like, so that an evaluation of several samplers says which one is running.
  """
  if num < 1 or batch_size < 1:
    raise ValueError(f'num and batch_size must be >= 1, got {num}, {batch_size}.')
  if labels is not None and len(labels) != num:
    raise ValueError(f'{len(labels)} labels for {num} samples.')
  mesh = getattr(sample_fn, 'mesh', None)
  if mesh is not None:
    params = sharding.replicate(params, mesh)  # Once, not at every batch.
  size = device_map.batch_size_for(batch_size, num, mesh)
  seed_key = jax.random.PRNGKey(seed)
  if progress_label is None:
    times = f", times {', '.join(f'{t:.4g}' for t in spec.times)}" if spec.times else ''
    progress_label = (f'Sampling ({spec.steps}-step consistency{times})' if spec.name == 'consistency' else
                      f'Sampling (EDM {spec.name}, {spec.steps} steps)')

  def batch(start: int, labels_B: Optional[np.ndarray] = None) -> jax.Array:
    keys = sampling.example_keys(seed_key, start, size)  # Rows past num get the following indices' keys.
    return sample_fn(params, keys, spec, (size,) + tuple(image_shape), labels_B)

  arrays = [] if labels is None else [np.asarray(labels, np.int32)]
  return device_map.map_batches(batch, arrays, num, batch_size, mesh, progress_label=progress_label,
                                before_batch=before_batch)


def num_classes(model_config: ml_collections.ConfigDict) -> int:
  """Classes of a class-conditional model (model.num_classes); 0 for an unconditional one."""
  return int(model_config.num_classes) if model_config.class_conditional else 0


def draw_labels(num_classes: int, num: int, seed: int) -> Optional[np.ndarray]:
  """Uniform class labels int32 (num,) for a class-conditional model of `num_classes` classes (None for an
  unconditional one, num_classes = 0); label i depends only on (seed, i), so a longer draw extends a shorter
  one."""
  if not num_classes:
    return None
  return np.random.default_rng((seed, 0x1abe1)).integers(0, num_classes, num).astype(np.int32)


def null_label(model_config: ml_collections.ConfigDict) -> Optional[int]:
  """The label meaning "no class" (model.num_classes) of a network with model.null_class; else None."""
  if model_config.class_conditional and model_config.get('null_class', False):
    return int(model_config.num_classes)
  return None


def resolve_labels(num_classes: int, num: int, seed: int, labels: LabelsArg = None,
                   null: Optional[int] = None) -> Optional[np.ndarray]:
  """The labels of `num` samples: drawn uniformly (None), one class for all (an int), or as given (an array).

  num_classes: the model's (`num_classes(config.model)`; 0 for an unconditional model). null: the model's null
  label (`null_label(config.model)`), also accepted when given. Raises ValueError for labels given to an
  unconditional model and for labels outside [0, num_classes) other than `null`.
  """
  if not num_classes:
    if labels is not None:
      raise ValueError('This model is unconditional (model.class_conditional = False): it takes no class labels.')
    return None
  if labels is None:
    return draw_labels(num_classes, num, seed)
  k = num_classes
  out = np.full((num,), labels, np.int32) if np.ndim(labels) == 0 else np.asarray(labels, np.int32)
  if out.shape != (num,):
    raise ValueError(f'Expected one class label per sample ({num}), got an array of shape {out.shape}.')
  outside = (out < 0) | (out >= k)
  if null is not None:
    outside &= out != null
  if outside.any():
    bad = sorted(set(out[outside].tolist()))[:10]
    also = '' if null is None else f', or be {null}, the null label (unconditional, model.null_class)'
    raise ValueError(f'Class labels must lie in [0, {k}) (model.num_classes = {k}){also}; got {bad}.')
  return out


def grid_labels(num_classes: int, num: int) -> Optional[np.ndarray]:
  """Labels of the training-time sample grids: classes 0, 1, 2, ... in turn (None for unconditional models)."""
  if not num_classes:
    return None
  return (np.arange(num) % num_classes).astype(np.int32)
