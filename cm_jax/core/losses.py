"""Training losses: pure functions (params, target_params, x0, step, rng, teacher_params, labels) -> (loss, metrics).

- 'ct':  consistency training (CM 2023 and iCT).
- 'edm': the EDM diffusion loss that trains a teacher (a denoiser with eps = 0).
- 'cd':  consistency distillation from an EDM teacher (one teacher ODE step per pair of grid points).
- 'ect': easy consistency tuning (Geng et al. 2024): continuous (t, r) pairs, the gap shrinking by stages.
- 'sct' / 'scd': continuous-time consistency training / distillation (sCM, Lu & Song 2024; cm_jax/core/scm.py).

`make_loss` resolves every string of the config into functions, once; nothing inside a traced loss
dispatches on strings. teacher_params is None for every loss but 'cd' and 'scd'; labels (int (B,)) are the class labels
of a class-conditional model, passed to every network call (student, target and teacher), else None.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cm_jax.core import karras
from cm_jax.core import meanflow
from cm_jax.core import sampling
from cm_jax.core import scm
from cm_jax.core.denoiser import Denoiser


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
  # Plain values, read once: the functions below must not see later edits of the config.
  fixed_points, s0, mu0, mu_variant, sigma_data = (int(lc.num_points), int(lc.s0), float(lc.mu0), lc.mu_variant,
                                                   float(cc.sigma_data))
  schedules = {
      'exponential': functools.partial(karras.ict_num_points, total_steps=total, s0=lc.s0, s1=lc.s1),
      'adaptive': functools.partial(karras.ct_num_points, total_steps=total, s0=lc.s0, s1=lc.s1),
      'fixed': lambda step: jnp.asarray(fixed_points, jnp.int32),
  }
  grid = dict(sigma_min=cc.sigma_min, sigma_max=cc.sigma_max, rho=cc.rho)
  max_points = fixed_points if lc.schedule == 'fixed' else int(lc.s1) + 1
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
      'l2_norm': karras.l2_norm_distance,
  }
  weights = {
      'inverse_delta': karras.inverse_delta_weight,
      'uniform': lambda lo, hi: jnp.ones_like(lo),
      'edm': lambda lo, hi: karras.edm_weight(hi, sigma_data),
  }
  num_points = _choose(schedules, lc.schedule, 'loss.schedule')
  target_decays = {
      'paper': lambda step: karras.ct_target_decay(num_points(step), s0, mu0, 'paper'),
      'official': lambda step: karras.ct_target_decay(num_points(step), s0, mu0, 'official'),
      'constant': lambda step: jnp.asarray(mu0, jnp.float32),
  }
  targets = {'stopgrad': lambda: None,
             'ema': lambda: _choose(target_decays, mu_variant, 'loss.mu_variant')}
  return CTSettings(
      max_points=max_points, num_points=num_points,
      index_logits=_choose(index_dists, lc.index_distribution, 'loss.index_distribution'),
      distance=_choose(distances, lc.distance, 'loss.distance'),
      weight=_choose(weights, lc.weighting, 'loss.weighting'),
      target_decay=_choose(targets, lc.target, 'loss.target')(),
      huber_c=huber_c, **grid)


def _choose(options: dict, key: str, field: str):
  if key not in options:
    raise ValueError(f'config.{field} = {key!r} is not one of {sorted(options)}.')
  return options[key]


def consistency_training_loss(params, target_params, x0_BHWC, step, rng, teacher_params=None, labels_B=None, *,
                              denoiser: Denoiser, settings: CTSettings):
  """CT loss: lambda(sigma_n) d(f(x + s_{n+1} z, s_{n+1}), stopgrad f^-(x + s_n z, s_n)), mean over batch.

  target_params=None means mu = 0: the target is the online network under stop_gradient (iCT).
  Student and target share z and the dropout rng. teacher_params is unused. Returns (loss, metrics).
  """
  del teacher_params
  return _consistency_pair_loss(params, target_params, x0_BHWC, step, rng, labels_B, denoiser=denoiser,
                                settings=settings, target_input=lambda x_hi, sigma_hi, x_lo, sigma_lo: x_lo)


def consistency_distillation_loss(params, target_params, x0_BHWC, step, rng, teacher_params, labels_B=None, *,
                                  denoiser: Denoiser, teacher: Denoiser, ode_step_fn: Callable[..., Any],
                                  settings: CTSettings):
  """CD loss (CM eq. 7): lambda(sigma_n) d(f(x + s_{n+1} z, s_{n+1}), stopgrad f^-(x_hat, s_n)), batch mean.

  x_hat is one step of the teacher's probability-flow ODE (ode_step_fn: sampling.heun_step or euler_step)
  from (x + s_{n+1} z, s_{n+1}) down to s_n; the teacher runs without dropout. Otherwise as
  consistency_training_loss.
  """
  teacher_fn = lambda x, sigma: teacher(teacher_params, x, sigma, labels_B=labels_B)

  def target_input(x_hi, sigma_hi, x_lo, sigma_lo):
    del x_lo
    return jax.lax.stop_gradient(ode_step_fn(teacher_fn, x_hi, sigma_hi, sigma_lo))

  return _consistency_pair_loss(params, target_params, x0_BHWC, step, rng, labels_B, denoiser=denoiser,
                                settings=settings, target_input=target_input)


def _consistency_pair_loss(params, target_params, x0_BHWC, step, rng, labels_B, *, denoiser: Denoiser,
                           settings: CTSettings, target_input):
  """Shared body of CT and CD; target_input(x_hi, sigma_hi, x_lo, sigma_lo) is where the target is evaluated."""
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

  student_BHWC = denoiser(params, x0_BHWC + expand(sigma_hi_B) * z_BHWC, sigma_hi_B, rng_dropout, labels_B)
  target_params = params if target_params is None else target_params
  x_target = target_input(x0_BHWC + expand(sigma_hi_B) * z_BHWC, sigma_hi_B,
                          x0_BHWC + expand(sigma_lo_B) * z_BHWC, sigma_lo_B)
  target_BHWC = jax.lax.stop_gradient(denoiser(target_params, x_target, sigma_lo_B, rng_dropout, labels_B))

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


def edm_loss(params, target_params, x0_BHWC, step, rng, teacher_params=None, labels_B=None, *, denoiser: Denoiser,
             p_mean: float, p_std: float, sigma_data: float):
  """EDM: ln sigma ~ N(p_mean, p_std^2); mean of w(sigma) |D(x + sigma z, sigma) - x|^2 (pixel mean).

  w(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, so that the weighted target of the raw
  network has unit variance at every sigma. `denoiser` has eps = 0 (an EDM denoiser, not a consistency model).
  """
  del target_params, step, teacher_params
  rng_sigma, rng_noise, rng_dropout = jax.random.split(rng, 3)
  sigma_B = karras.edm_training_sigma(rng_sigma, x0_BHWC.shape[0], p_mean, p_std)
  z_BHWC = jax.random.normal(rng_noise, x0_BHWC.shape, x0_BHWC.dtype)
  denoised_BHWC = denoiser(params, x0_BHWC + sigma_B[:, None, None, None] * z_BHWC, sigma_B, rng_dropout, labels_B)
  mse_B = karras.l2_distance(denoised_BHWC, x0_BHWC)
  loss = jnp.mean(karras.edm_weight(sigma_B, sigma_data) * mse_B)
  return loss, {'loss': loss, 'l2': jnp.mean(mse_B), 'mean_sigma': jnp.mean(sigma_B)}


@dataclasses.dataclass(frozen=True)
class ECTSettings:
  """Easy consistency tuning (Geng et al. 2024), resolved from config.loss."""
  p_mean: float                           # ln t ~ N(p_mean, p_std^2) (ECT: -1.1, 2.0)
  p_std: float
  q: float                                # The gap t - r shrinks by q per stage ...
  k: float                                # ... times 1 + k sigmoid(-b t).
  b: float
  stage_steps: int                        # Steps per stage.
  distance: Callable[[Any, Any], Any]     # (student, target) -> (B,)
  weight: Callable[[Any, Any], Any]       # (r, t) -> (B,)
  huber_c: float


def easy_consistency_tuning_loss(params, target_params, x0_BHWC, step, rng, teacher_params=None, labels_B=None, *,
                                 denoiser: Denoiser, settings: ECTSettings):
  """ECT: w(t, r) d(f(x + t z, t), stopgrad f(x + r z, r)), t lognormal, r = ect_r(t, stage); batch mean.

  The target is the online network under stop_gradient (no target EMA), with the same z and dropout mask;
  where r = 0 the target is the clean image. Start from an EDM teacher's weights (teacher.init_student).
  `denoiser` is make_denoiser(config, training=True): EDM's unshifted preconditioning (sigma_min = 0), as ECT's
  code trains (locuslab/ect ECMPrecond), so f(x, 0) = x is the boundary the r = 0 targets assume; the eps shift
  applies at sampling.
  """
  del target_params, teacher_params
  s = settings
  rng_t, rng_noise, rng_dropout = jax.random.split(rng, 3)
  t_B = karras.edm_training_sigma(rng_t, x0_BHWC.shape[0], s.p_mean, s.p_std)
  stage = karras.ect_stage(step, s.stage_steps)
  r_B = karras.ect_r(t_B, stage, s.q, s.k, s.b)
  z_BHWC = jax.random.normal(rng_noise, x0_BHWC.shape, x0_BHWC.dtype)

  def expand(v_B):
    return v_B[:, None, None, None]

  student_BHWC = denoiser(params, x0_BHWC + expand(t_B) * z_BHWC, t_B, rng_dropout, labels_B)
  at_zero_B = r_B <= 0.0
  r_safe_B = jnp.where(at_zero_B, t_B, r_B)  # Keeps ln(0) out of the network; those targets are x0 anyway.
  target_BHWC = jax.lax.stop_gradient(jnp.where(
      expand(at_zero_B), x0_BHWC,
      denoiser(params, x0_BHWC + expand(r_safe_B) * z_BHWC, r_safe_B, rng_dropout, labels_B)))
  loss = jnp.mean(s.weight(r_B, t_B) * s.distance(student_BHWC, target_BHWC))
  metrics = {
      'loss': loss,
      'l2': jnp.mean(karras.l2_distance(student_BHWC, target_BHWC)),
      'pseudo_huber': jnp.mean(karras.pseudo_huber_distance(student_BHWC, target_BHWC, s.huber_c)),
      'stage': stage,
      'mean_gap_ratio': jnp.mean((t_B - r_B) / t_B),
      'fraction_r_zero': jnp.mean(at_zero_B.astype(jnp.float32)),
  }
  return loss, metrics


def make_ect_settings(config: ml_collections.ConfigDict, image_shape: tuple[int, int, int]) -> ECTSettings:
  ct = make_ct_settings(config, image_shape)  # Resolves (and checks) loss.distance, weighting and huber_c.
  lc = config.loss
  return ECTSettings(p_mean=lc.p_mean, p_std=lc.p_std, q=lc.ect_q, k=lc.ect_k, b=lc.ect_b,
                     stage_steps=int(lc.ect_stage_steps), distance=ct.distance, weight=ct.weight, huber_c=ct.huber_c)


@dataclasses.dataclass(frozen=True)
class Loss:
  """A resolved training objective: loss_fn(params, target_params, x0, step, rng, teacher_params, labels)."""
  loss_fn: Callable[..., Any]
  target_decay: Optional[Callable[[Any], Any]]  # step -> mu(k) when the state has target params, else None.


def make_loss(config: ml_collections.ConfigDict, image_shape: tuple[int, int, int], denoiser: Denoiser,
              teacher: Optional[Denoiser] = None) -> Loss:
  """The objective config.loss.name describes, bound to `denoiser` (make_denoiser(config, training=True): ECT's
  is unshifted) and the teacher's denoiser for 'cd' and 'scd'."""
  def ct():
    settings = make_ct_settings(config, image_shape)
    return Loss(functools.partial(consistency_training_loss, denoiser=denoiser, settings=settings),
                settings.target_decay)

  def cd():
    if teacher is None:
      raise ValueError("config.loss.name = 'cd' needs a teacher: set config.teacher.workdir.")
    settings = make_ct_settings(config, image_shape)
    step_fn = _choose(sampling.ODE_SOLVERS, config.teacher.solver, 'teacher.solver')
    return Loss(functools.partial(consistency_distillation_loss, denoiser=denoiser, teacher=teacher,
                                  ode_step_fn=step_fn, settings=settings), settings.target_decay)

  def edm():
    lc = config.loss
    return Loss(functools.partial(edm_loss, denoiser=denoiser, p_mean=lc.edm_p_mean, p_std=lc.edm_p_std,
                                  sigma_data=config.consistency.sigma_data), None)

  def ect():
    return Loss(functools.partial(easy_consistency_tuning_loss, denoiser=denoiser,
                                  settings=make_ect_settings(config, image_shape)), None)

  def scm_objective(distill: bool):
    if distill and teacher is None:
      raise ValueError("config.loss.name = 'scd' needs a teacher: set config.teacher.workdir.")
    lc = config.loss
    settings = scm.SCMSettings(sigma_data=float(config.consistency.sigma_data), p_mean=float(lc.p_mean),
                               p_std=float(lc.p_std), warmup_steps=int(lc.tangent_warmup_steps),
                               tangent_c=float(lc.tangent_c), adaptive_weight=bool(config.model.adaptive_weight))
    return Loss(functools.partial(scm.scm_loss, denoiser=denoiser, settings=settings,
                                  teacher=teacher if distill else None), None)

  def meanflow_objective():
    lc = config.loss
    settings = meanflow.MeanFlowSettings(
        t_mean=float(lc.mf_t_mean), t_std=float(lc.mf_t_std), r_mean=float(lc.mf_r_mean), r_std=float(lc.mf_r_std),
        ratio_r_neq_t=float(lc.mf_ratio_r_neq_t), order=str(lc.mf_time_order), norm_p=float(lc.mf_norm_p),
        norm_c=float(lc.mf_norm_c), class_dropout=float(lc.get('mf_class_dropout', 0.0)),
        cfg_omega=float(lc.get('mf_cfg_omega', 1.0)), cfg_kappa=float(lc.get('mf_cfg_kappa', 0.0)),
        cfg_t_min=float(lc.get('mf_cfg_t_min', 0.0)), cfg_t_max=float(lc.get('mf_cfg_t_max', 1.0)),
        null_label=int(config.model.num_classes) if config.model.get('null_class', False) else -1)
    flow = denoiser if isinstance(denoiser, meanflow.FlowMap) else meanflow.FlowMap(denoiser.model)
    return Loss(functools.partial(meanflow.meanflow_loss, flow=flow, settings=settings), None)

  return _choose({'ct': ct, 'cd': cd, 'edm': edm, 'ect': ect, 'sct': lambda: scm_objective(False),
                  'scd': lambda: scm_objective(True), 'meanflow': meanflow_objective}, config.loss.name,
                 'loss.name')()
