"""MeanFlow (Geng et al. 2025, arXiv 2505.13447): one-step generation from the average velocity of a flow.

The flow-matching (linear) path from data (t = 0) to noise (t = 1):
    z_t = (1 - t) x + t e,  e ~ N(0, I),   conditional velocity v = dz_t/dt = e - x.
The network u(z_t, r, t) models the AVERAGE velocity of the probability-flow ODE over [r, t] (r <= t):
    u(z_t, r, t) = (z_t - z_r) / (t - r),   z_r the ODE's solution at r from z_t,
so z_r = z_t - (t - r) u(z_t, r, t) jumps along the ODE, and one step from noise is x = z_1 - u(z_1, 0, 1).
Differentiating (t - r) u = integral_r^t v ds in t (r fixed) gives the MeanFlow identity
    u = v - (t - r) du/dt,   du/dt = v . d_z u + d_t u   (the total derivative along the trajectory),
so the network is trained towards the target sg(v - (t - r) du/dt), with du/dt from ONE forward-mode jax.jvp of
the network along the tangent (v, 0, 1) in (z, r, t); the conditional velocity v stands in for the marginal one,
as in flow matching. At r = t the target is v: flow matching.

Loss per example (official code, Gsunshine/meanflow and Gsunshine/py-meanflow): the squared error SUMMED over
pixels, divided by sg((||err||^2 + c)^p) (adaptive weighting; p = 1 is a normalised L2, p = 0 plain L2); the
mean over the batch.

Times: t and r from logit-normal proposals sigmoid(N(mean, std^2)). Two orders are published: 'sort' (the
paper's CIFAR-10 and ImageNet runs: both drawn from one proposal, t the larger) and 'min' (py-meanflow's improved
CIFAR-10 recipe: t from its own proposal, r from another, r = min(r, t)); r = t for a fraction 1 - ratio_r_neq_t of
the batch, drawn per example (with 'min' also wherever the draw of r exceeds t, as in py-meanflow).

The network sees (t, t - r) (the paper's choice, its Table 1c), each embedded by cm_jax's UNet (model.two_times),
with no preconditioning: the raw output is u. Pure functions; the train step closes over MeanFlowSettings
resolved once from the config (losses.make_loss).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

TIME_ORDERS = ('sort', 'min')


def _bcast(v_B, like):
  return jnp.reshape(v_B, (-1,) + (1,) * (like.ndim - 1))


# --------------------------------------------------------------------------------------------------
# The path and its average velocity
# --------------------------------------------------------------------------------------------------
def interpolate(x0, e, t_B):
  """z_t = (1 - t) x + t e."""
  return _bcast(1.0 - t_B, x0) * x0 + _bcast(t_B, x0) * e


def conditional_velocity(x0, e):
  """v = dz_t/dt = e - x for fixed (x, e)."""
  return e - x0


def step(u, z_t, r_B, t_B):
  """z_r = z_t - (t - r) u: one jump of the flow map from t to r given the average velocity u."""
  return z_t - _bcast(t_B - r_B, z_t) * u


# --------------------------------------------------------------------------------------------------
# Times
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MeanFlowSettings:
  """loss.name = 'meanflow', resolved from config.loss (losses.make_loss)."""
  t_mean: float                  # t ~ sigmoid(N(t_mean, t_std^2)) (order 'sort': r too).
  t_std: float
  r_mean: float                  # Order 'min': r ~ sigmoid(N(r_mean, r_std^2)), then r = min(r, t).
  r_std: float
  ratio_r_neq_t: float           # Probability that r differs from t (the rest: r = t, flow matching).
  order: str                     # 'sort' | 'min' (see the module docstring).
  norm_p: float                  # Adaptive weight 1 / (||err||^2 + norm_c)^norm_p.
  norm_c: float
  # Classifier-free guidance folded into training (class-conditional networks with a null label; see guided_velocity).
  class_dropout: float = 0.0     # Fraction of rows trained with the null label (and the plain target).
  cfg_omega: float = 1.0         # v_g = omega v + kappa u(z, t, t | c) + (1 - omega - kappa) u(z, t, t | null)
  cfg_kappa: float = 0.0
  cfg_t_min: float = 0.0         # Guidance only where cfg_t_min <= t <= cfg_t_max.
  cfg_t_max: float = 1.0
  null_label: int = -1           # The null label (model.num_classes); -1: the network has none.

  @property
  def guided(self) -> bool:
    return self.cfg_omega != 1.0 or self.cfg_kappa != 0.0


def logit_normal(rng, shape, mean: float, std: float, dtype=jnp.float32):
  """sigmoid(N(mean, std^2))."""
  return jax.nn.sigmoid(mean + std * jax.random.normal(rng, shape, dtype))


def sample_times(rng, batch: int, settings: MeanFlowSettings, dtype=jnp.float32):
  """(t_B, r_B) with 0 < r <= t < 1, r = t for a fraction 1 - ratio_r_neq_t of the rows (drawn per row)."""
  s = settings
  if s.order not in TIME_ORDERS:
    raise ValueError(f'config.loss.mf_time_order = {s.order!r} is not one of {TIME_ORDERS}.')
  rng_t, rng_r, rng_mask = jax.random.split(rng, 3)
  a = logit_normal(rng_t, (batch,), s.t_mean, s.t_std, dtype)
  if s.order == 'sort':
    b = logit_normal(rng_r, (batch,), s.t_mean, s.t_std, dtype)
    t, r = jnp.maximum(a, b), jnp.minimum(a, b)
  else:
    t = a
    r = jnp.minimum(logit_normal(rng_r, (batch,), s.r_mean, s.r_std, dtype), t)
  different = jax.random.uniform(rng_mask, (batch,)) < s.ratio_r_neq_t
  return t, jnp.where(different, r, t)


# --------------------------------------------------------------------------------------------------
# The network as a flow map
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FlowMap:
  """u(params, z, r, t): a network of (z, t, t - r) (model.two_times) read as the average velocity over [r, t]
  (no preconditioning). A dropout rng switches the network to training mode; labels_B for class-conditional
  networks. The output is float32 whatever the network's compute dtype."""
  model: nn.Module

  def __call__(self, params: Any, z_BHWC, r_B, t_B, dropout_rng=None, labels_B=None):
    train = dropout_rng is not None
    rngs = {'dropout': dropout_rng} if train else {}
    return self.model.apply({'params': params}, z_BHWC, t_B, labels_B=labels_B, train=train, rngs=rngs,
                            c_noise2_B=t_B - r_B)

  def in_float32(self) -> 'FlowMap':
    """The same flow map computing in float32 (the jvp under training.precision = 'bfloat16')."""
    if getattr(self.model, 'dtype', None) not in (None, jnp.float32):
      return dataclasses.replace(self, model=self.model.clone(dtype=jnp.float32))
    return self


# --------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------
def meanflow_target(u_fn: Callable, z_t, r_B, t_B, v):
  """(u, sg(v - (t - r) du/dt)) with du/dt from one jvp of u_fn(z, r, t) along (v, 0, 1): the prediction (the
  jvp's primal, so it shares the jvp's dropout mask) and the MeanFlow target."""
  u, du_dt = jax.jvp(u_fn, (z_t, r_B, t_B), (v, jnp.zeros_like(r_B), jnp.ones_like(t_B)))
  return u, jax.lax.stop_gradient(v - _bcast(t_B - r_B, z_t) * du_dt)


def guided_velocity(v, u_cond, u_null, omega: float, kappa: float):
  """MeanFlow's training-time guidance (its Eq. 21): omega v + kappa u_cond + (1 - omega - kappa) u_null, where
  u_cond = u(z_t, t, t | c) and u_null = u(z_t, t, t | null) are the network's instantaneous velocities (r = t).
  With the network at the guided field's fixed point (u_cond = v_g at r = t), v_g = omega v + kappa v_g +
  (1 - omega - kappa) u_null, i.e. v_g = u_null + omega / (1 - kappa) (v - u_null): guidance of scale
  omega / (1 - kappa). u_cond may be None when kappa = 0."""
  out = omega * v + (1.0 - omega - kappa) * u_null
  return out if kappa == 0.0 else out + kappa * u_cond


def adaptive_weighted(sq_err_B, p: float, c: float):
  """sq_err / sg((sq_err + c)^p), per example."""
  return sq_err_B / jax.lax.stop_gradient(jnp.power(sq_err_B + c, p))


def meanflow_loss(params, target_params, x0_BHWC, step_, rng, teacher_params=None, labels_B=None, *,
                  flow: FlowMap, settings: MeanFlowSettings):
  """The MeanFlow loss (mean over the batch) and metrics. target_params and teacher_params are unused (the
  target is the online network under stop_gradient; no teacher).

  In float32 the prediction is the jvp's primal (one network call, as the official code). Under bfloat16 the
  prediction is a separate call in the compute dtype with the SAME dropout key (same mask), and the jvp, the
  target and the loss run in float32 on the parameters under stop_gradient.

  Class-conditional runs (labels_B) may fold classifier-free guidance into training (settings.class_dropout,
  cfg_*; the paper's ImageNet recipe): the dropped rows take the null label and the plain velocity; in the other
  rows inside the guidance interval v becomes guided_velocity(...) (float32 network calls without dropout under
  stop-gradient), as the jvp's tangent and in the target.
  """
  del target_params, teacher_params, step_
  batch = x0_BHWC.shape[0]
  rng_times, rng_noise, rng_dropout = jax.random.split(rng, 3)
  rng_labels = jax.random.fold_in(rng, 3)  # Its own stream: runs without class dropout draw as before.
  dtype = jnp.promote_types(x0_BHWC.dtype, jnp.float32)  # float32 (float64 in the oracle tests), never bf16.
  x0 = x0_BHWC.astype(dtype)
  t_B, r_B = sample_times(rng_times, batch, settings, dtype)
  e = jax.random.normal(rng_noise, x0.shape, dtype)
  z_t, v = interpolate(x0, e, t_B), conditional_velocity(x0, e)
  v_plain = v

  exact = flow.in_float32()
  frozen = jax.lax.stop_gradient(params)
  dropped_B = jnp.zeros((batch,), bool)
  if labels_B is not None and settings.class_dropout > 0:  # The null label trains the unconditional field.
    dropped_B = jax.random.uniform(rng_labels, (batch,)) < settings.class_dropout
    labels_B = jnp.where(dropped_B, settings.null_label, labels_B)
  if settings.guided:  # v -> v_g in the rows that keep their label and whose t lies in the guidance interval.
    null_B = jnp.full((batch,), settings.null_label, jnp.int32)
    u_null = exact(frozen, z_t, t_B, t_B, None, null_B)
    u_cond = exact(frozen, z_t, t_B, t_B, None, labels_B) if settings.cfg_kappa != 0.0 else None
    v_g = guided_velocity(v, u_cond, u_null, settings.cfg_omega, settings.cfg_kappa)
    inside_B = (t_B >= settings.cfg_t_min) & (t_B <= settings.cfg_t_max) & ~dropped_B
    v = jax.lax.stop_gradient(jnp.where(_bcast(inside_B, v), v_g.astype(dtype), v))

  if exact is flow:  # float32 network: one call gives the prediction and the tangent.
    u, target = meanflow_target(lambda z, r, t: flow(params, z, r, t, rng_dropout, labels_B), z_t, r_B, t_B, v)
  else:
    _, target = meanflow_target(lambda z, r, t: exact(frozen, z, r, t, rng_dropout, labels_B), z_t, r_B, t_B, v)
    u = flow(params, z_t, r_B, t_B, rng_dropout, labels_B)
  err = u.astype(dtype) - target.astype(dtype)
  sq_B = jnp.sum(jnp.square(err), axis=tuple(range(1, err.ndim)))
  loss = jnp.mean(adaptive_weighted(sq_B, settings.norm_p, settings.norm_c))
  metrics = {
      'loss': loss,
      'sq_err': jnp.mean(sq_B),  # Unweighted ||u - target||^2, summed over pixels.
      'v_err': jnp.mean(jnp.sum(jnp.square(u.astype(dtype) - v_plain), axis=tuple(range(1, err.ndim)))),
      'frac_r_eq_t': jnp.mean((r_B == t_B).astype(dtype)),
      'mean_t': jnp.mean(t_B),
      'mean_t_minus_r': jnp.mean(t_B - r_B),
  }
  if settings.class_dropout > 0 and labels_B is not None:
    metrics['frac_null_label'] = jnp.mean(dropped_B.astype(dtype))
  return loss, metrics


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------
def sample(u_fn: Callable, noise_BHWC, times: Sequence[float]):
  """Jumps along descending `times` (first 1.0, last 0.0): z <- z - (t_i - t_{i+1}) u(z, t_{i+1}, t_i), starting
  from z = noise. u_fn(z, r_B, t_B) -> u. One step is times (1, 0): x = z_1 - u(z_1, 0, 1)."""
  times = [float(t) for t in times]
  if len(times) < 2 or any(a <= b for a, b in zip(times, times[1:])) or times[-1] != 0.0 or times[0] > 1.0:
    raise ValueError(f'MeanFlow sampling times must descend from at most 1 to 0, got {times}.')
  z = noise_BHWC
  batch = z.shape[0]
  for t, r in zip(times, times[1:]):
    t_B, r_B = jnp.full((batch,), t, z.dtype), jnp.full((batch,), r, z.dtype)
    z = step(u_fn(z, r_B, t_B), z, r_B, t_B)
  return z


def uniform_times(steps: int) -> list[float]:
  """(1, (n-1)/n, ..., 0): n equal jumps (improved MeanFlow's grid; one step is (1, 0))."""
  if steps < 1:
    raise ValueError(f'MeanFlow sampling needs at least one step, got {steps}.')
  return [1.0 - i / steps for i in range(steps)] + [0.0]


# --------------------------------------------------------------------------------------------------
# The Gaussian oracle (tests): x ~ N(mu, s^2) per dimension
# --------------------------------------------------------------------------------------------------
def gaussian_sigma(t, s):
  """Std of z_t for x ~ N(mu, s^2): sqrt((1 - t)^2 s^2 + t^2)."""
  return jnp.sqrt(jnp.square(1.0 - t) * s**2 + jnp.square(t))


def gaussian_flow(z_t, r_B, t_B, mu, s):
  """z_r from z_t along the probability-flow ODE of Gaussian data: (1 - r) mu + (sigma_r / sigma_t)(z_t -
  (1 - t) mu) (the flow keeps each point's standardised coordinate)."""
  sig_t, sig_r = _bcast(gaussian_sigma(t_B, s), z_t), _bcast(gaussian_sigma(r_B, s), z_t)
  return _bcast(1.0 - r_B, z_t) * mu + sig_r / sig_t * (z_t - _bcast(1.0 - t_B, z_t) * mu)


def gaussian_average_velocity(z_t, r_B, t_B, mu, s):
  """u*(z_t, r, t) = (z_t - z_r) / (t - r) for r < t; the marginal velocity v*(z_t, t) where r = t."""
  gap = _bcast(t_B - r_B, z_t)
  safe = jnp.where(gap > 0, gap, 1.0)
  average = (z_t - gaussian_flow(z_t, r_B, t_B, mu, s)) / safe
  return jnp.where(gap > 0, average, gaussian_velocity(z_t, t_B, mu, s))


def gaussian_velocity(z_t, t_B, mu, s):
  """v*(z_t, t) = E[e - x | z_t]: -mu + (dsigma_t/dt / sigma_t)(z_t - (1 - t) mu), dsigma_t/dt = (t - (1 - t)
  s^2) / sigma_t."""
  sig = _bcast(gaussian_sigma(t_B, s), z_t)
  t = _bcast(t_B, z_t)
  return -mu + (t - (1.0 - t) * s**2) / jnp.square(sig) * (z_t - (1.0 - t) * mu)

