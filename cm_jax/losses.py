"""Training losses: pure functions (params, target_params, x0, step, rng) -> (loss, metrics).

Strings from the config are resolved into functions here, once, by `make_ct_settings`; nothing inside a
traced loss dispatches on strings.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cm_jax import karras
from cm_jax.denoiser import Denoiser


@dataclasses.dataclass(frozen=True)
class CTSettings:
  """Consistency-training loss, fully resolved from config.loss and config.consistency."""
  sigma_min: float
  sigma_max: float
  rho: float
  max_points: int                         # static upper bound on N(k)
  num_points: Callable[[Any], Any]        # step -> N(k), int32
  index_logits: Callable[[Any], Any]      # N -> log p(n), shape (max_points - 1,)
  distance: Callable[[Any, Any], Any]     # (student, target) -> per-sample distance (B,)
  weight: Callable[[Any, Any], Any]       # (sigma_n, sigma_{n+1}) -> (B,)
  target_decay: Optional[Callable[[Any], Any]]  # step -> mu(k); None: target = stopgrad(params) (mu = 0)
  huber_c: float


def schedule_total_steps(config: ml_collections.ConfigDict) -> int:
  """K of the N(k) / mu(k) schedules: config.loss.total_steps, or training.num_steps when it is None."""
  total = config.loss.total_steps
  return int(config.training.num_steps if total is None else total)


def make_ct_settings(config: ml_collections.ConfigDict, image_shape: tuple[int, int, int]) -> CTSettings:
  """Resolves config.loss (every string field) into a CTSettings. Raises ValueError naming bad fields."""
  lc, cc = config.loss, config.consistency
  total = schedule_total_steps(config)
  schedules = {
      'exponential': functools.partial(karras.ict_num_points, total_steps=total, s0=lc.s0, s1=lc.s1),
      'adaptive': functools.partial(karras.ct_num_points, total_steps=total, s0=lc.s0, s1=lc.s1),
  }
  grid = dict(sigma_min=cc.sigma_min, sigma_max=cc.sigma_max, rho=cc.rho)
  max_points = int(lc.s1) + 1
  index_dists = {
      'lognormal': functools.partial(karras.lognormal_index_logits, max_points=max_points, p_mean=lc.p_mean,
                                     p_std=lc.p_std, **grid),
      'uniform': functools.partial(karras.uniform_index_logits, max_points=max_points),
  }
  huber_c = (karras.pseudo_huber_constant(int(np.prod(image_shape))) if lc.huber_c is None
             else float(lc.huber_c))
  distances = {
      'pseudo_huber': functools.partial(karras.pseudo_huber_distance, c=huber_c),
      'l2': karras.l2_distance,
      'l1': karras.l1_distance,
  }
  weights = {
      'inverse_delta': karras.inverse_delta_weight,
      'uniform': lambda lo, hi: jnp.ones_like(lo),
  }
  num_points = _choose(schedules, lc.schedule, 'loss.schedule')
  targets = {
      'stopgrad': None,
      'ema': lambda step: karras.ct_target_decay(num_points(step), lc.s0, lc.mu0, lc.mu_variant),
  }
  if lc.target == 'ema':
    _choose({'paper': 0, 'official': 0}, lc.mu_variant, 'loss.mu_variant')
  return CTSettings(
      max_points=max_points, num_points=num_points,
      index_logits=_choose(index_dists, lc.index_distribution, 'loss.index_distribution'),
      distance=_choose(distances, lc.distance, 'loss.distance'),
      weight=_choose(weights, lc.weighting, 'loss.weighting'),
      target_decay=_choose(targets, lc.target, 'loss.target'),
      huber_c=huber_c, **grid)


def _choose(options: dict, key: str, field: str):
  if key not in options:
    raise ValueError(f'config.{field} = {key!r} is not one of {sorted(options)}.')
  return options[key]


def consistency_training_loss(params, target_params, x0_BHWC, step, rng, *, denoiser: Denoiser,
                              settings: CTSettings):
  """CT loss: lambda(sigma_n) d(f(x + s_{n+1} z, s_{n+1}), stopgrad f^-(x + s_n z, s_n)), mean over batch.

  target_params=None means mu = 0: the target is the online network under stop_gradient (iCT).
  Student and target share z and the dropout rng. Returns (loss, metrics).
  """
  s = settings
  batch = x0_BHWC.shape[0]
  rng_index, rng_noise, rng_dropout = jax.random.split(rng, 3)
  num_points = s.num_points(step)
  n_B = jax.random.categorical(rng_index, s.index_logits(num_points), shape=(batch,))
  sigma_lo_B = karras.karras_sigma(n_B, num_points, s.sigma_min, s.sigma_max, s.rho)
  sigma_hi_B = karras.karras_sigma(n_B + 1, num_points, s.sigma_min, s.sigma_max, s.rho)
  z_BHWC = jax.random.normal(rng_noise, x0_BHWC.shape, x0_BHWC.dtype)

  def expand(v_B):
    return v_B[:, None, None, None]

  student_BHWC = denoiser(params, x0_BHWC + expand(sigma_hi_B) * z_BHWC, sigma_hi_B, rng_dropout)
  target_params = params if target_params is None else target_params
  target_BHWC = jax.lax.stop_gradient(
      denoiser(target_params, x0_BHWC + expand(sigma_lo_B) * z_BHWC, sigma_lo_B, rng_dropout))

  weight_B = s.weight(sigma_lo_B, sigma_hi_B)
  loss = jnp.mean(weight_B * s.distance(student_BHWC, target_BHWC))
  metrics = {
      'loss': loss,
      'l2': jnp.mean(karras.l2_distance(student_BHWC, target_BHWC)),
      'l1': jnp.mean(karras.l1_distance(student_BHWC, target_BHWC)),
      'pseudo_huber': jnp.mean(karras.pseudo_huber_distance(student_BHWC, target_BHWC, s.huber_c)),
      'num_points': num_points,
      'mean_sigma': jnp.mean(sigma_hi_B),
  }
  return loss, metrics
