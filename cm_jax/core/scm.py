"""Continuous-time consistency models (sCM: Lu & Song 2024, arXiv 2410.11081) on cm_jax's EDM preconditioning.

TrigFlow: x_t = cos t x0 + sin t z with z ~ N(0, sd^2 I), t in [0, pi/2], and the consistency function
    f(x_t, t) = cos t x_t - sd sin t F(x_t / sd, t).
cm_jax keeps its networks, checkpoints, samplers and editing in EDM's variables and reads TrigFlow through the
change of variables sigma = sd tan t, x = x_t / cos t (the same trajectory of the probability-flow ODE, so the
same consistency function). With sigma_min = 0, EDM's preconditioning becomes TrigFlow's:
    c_skip = sd^2 / (sigma^2 + sd^2) = cos^2 t,   c_out = sigma sd / sqrt(sigma^2 + sd^2) = sd sin t,
    c_in x = x / sqrt(sigma^2 + sd^2) = x_t / sd,
so D(x_t / cos t, sd tan t) = cos t x_t + sd sin t F_edm(x_t / sd, c_noise) is f(x_t, t) with
F = -F_edm(x_t / sd, c_noise), c_noise = ln(sigma) / 4 (cm_jax's noise input; TrigFlow's paper feeds t itself).

The objective (the paper's Algorithm 1): sigma ~ lognormal(P_mean, P_std), t = arctan(sigma / sd);
    g = -cos^2 t (sd F^- - dx_t/dt) - w cos t sin t (x_t + sd dF^-/dt),     w = min(1, k / warm-up steps),
which for w = 1 is cos t df^-/dt = sd sin t (1 / (sd tan t)) df^-/dt: the time derivative of the target along
the trajectory (zero exactly when f^- is the consistency function) under the paper's prior weighting
1 / (sd tan t), with dF^-/dt from ONE forward-mode jax.jvp of the network (same dropout mask and labels as the
student call); g <- g / (||g|| / sqrt(D) + c); and the loss per sample
    e^{-phi(t)} ||F_theta - F^- - g||^2 / D + phi(t),
phi the learned adaptive weight (model.adaptive_weight; the paper's w_phi = -phi). Its gradient in theta is
-2 e^-phi g . dF_theta / D at F_theta = F^-: a step of F along the tangent. sCT takes dx_t/dt = cos t z - sin t
x0 (the conditional velocity, unbiased for the ODE's); sCD the teacher's velocity sd F_teacher(x_t / sd, t).

Where cm_jax differs from the paper, and why: the tangent norm is divided by sqrt(D) (the paper's Algorithm 1
writes ||g||; NVIDIA FastGen divides by sqrt(D) so that c = 0.1 means the same at every image size); the
network's noise input stays EDM's ln(sigma) / 4 (the paper uses t with positional features), so that EDM
teachers and every cm_jax checkpoint keep one network; through the jvp's rearranged tangents its time
derivative enters as a constant 1/4 (below), not the 1 / cos t the paper warns of. FastGen's extra 1 / sigma
weight (its `prior_weighting_enabled`) is not applied: the paper's prior weighting is already in g.

Pure functions; the train step closes over an SCMSettings resolved once from the config (losses.make_loss).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from cm_jax.core import karras
from cm_jax.core.denoiser import Denoiser


# --------------------------------------------------------------------------------------------------
# TrigFlow <-> EDM
# --------------------------------------------------------------------------------------------------
def trig_time(sigma, sigma_data: float):
  """t = arctan(sigma / sd): the TrigFlow time of EDM noise level sigma (0 at sigma = 0, pi/2 at infinity)."""
  return jnp.arctan2(sigma, sigma_data)


def edm_sigma(t, sigma_data: float):
  """sigma = sd tan t, EDM's noise level of TrigFlow time t."""
  return sigma_data * jnp.tan(t)


def trig_net(net_fn, x_t, t, sigma_data: float):
  """TrigFlow's F(x_t / sd, t) from cm_jax's raw network net_fn(x_in, c_noise) = F_edm: -F_edm(x_t / sd,
  ln(sd tan t) / 4)."""
  return -net_fn(x_t / sigma_data, 0.25 * jnp.log(edm_sigma(t, sigma_data)))


def consistency_fn(F, x_t, t, sigma_data: float):
  """f(x_t, t) = cos t x_t - sd sin t F (F of shape x_t, t of shape (B,))."""
  return _bcast(jnp.cos(t), x_t) * x_t - sigma_data * _bcast(jnp.sin(t), x_t) * F


def tangent(F_minus, cos_sin_dF_dt, x_t, dx_dt, t, sigma_data: float, warmup):
  """g = -cos^2 t (sd F^- - dx_t/dt) - w (cos t sin t x_t + sd cos t sin t dF^-/dt) (before normalisation).

  cos_sin_dF_dt is cos t sin t dF^-/dt (what the jvp in scm_loss returns); w the tangent warm-up factor.
  For w = 1 this is cos t df^-/dt along the trajectory whose velocity is dx_t/dt.
  """
  cos, sin = _bcast(jnp.cos(t), x_t), _bcast(jnp.sin(t), x_t)
  return -cos**2 * (sigma_data * F_minus - dx_dt) - warmup * (cos * sin * x_t + sigma_data * cos_sin_dF_dt)


def normalize_tangent(g, c: float):
  """g / (||g||_2 / sqrt(D) + c), per sample (the paper's tangent normalisation, with FastGen's sqrt(D) that
  makes c independent of the image size)."""
  rms = jnp.sqrt(jnp.mean(jnp.square(g), axis=tuple(range(1, g.ndim)), keepdims=True))
  return g / (rms + c)


def conditional_velocity(x0, z, t):
  """dx_t/dt of x_t = cos t x0 + sin t z for fixed (x0, z): cos t z - sin t x0 (z already scaled by sd)."""
  return _bcast(jnp.cos(t), x0) * z - _bcast(jnp.sin(t), x0) * x0


def _bcast(v_B, like):
  return jnp.reshape(v_B, (-1,) + (1,) * (like.ndim - 1))


# --------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SCMSettings:
  """sCT / sCD, resolved from config.loss, config.consistency and config.model (losses.make_loss)."""
  sigma_data: float
  p_mean: float                  # ln sigma ~ N(p_mean, p_std^2), t = arctan(sigma / sd) (sCM: -1.0, 1.4).
  p_std: float
  warmup_steps: int              # Tangent warm-up: w = min(1, k / warmup_steps); 0: w = 1 from the start.
  tangent_c: float               # Tangent normalisation constant c (sCM: 0.1).
  adaptive_weight: bool          # The network returns phi(t) (model.adaptive_weight); else phi = 0.


def tangent_warmup(step, warmup_steps: int):
  """w = min(1, k / warmup_steps), float32; 1 when warmup_steps is 0."""
  if warmup_steps <= 0:
    return jnp.ones((), jnp.float32)
  return jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / float(warmup_steps))


def scm_loss(params, target_params, x0_BHWC, step, rng, teacher_params=None, labels_B=None, *,
             denoiser: Denoiser, settings: SCMSettings, teacher: Optional[Denoiser] = None):
  """sCT (teacher None) or sCD loss, mean over the batch; returns (loss, metrics).

  target_params is unused (the target is the online network under stop_gradient). The student call, the
  target's jvp and (sCD) the teacher see the same labels; student and jvp the same dropout mask. The jvp, the
  tangent and the loss are float32 whatever the network's compute dtype.
  """
  del target_params
  s, sd = settings, settings.sigma_data
  batch = x0_BHWC.shape[0]
  rng_sigma, rng_noise, rng_dropout = jax.random.split(rng, 3)
  dtype = jnp.promote_types(x0_BHWC.dtype, jnp.float32)  # float32 (float64 in the oracle tests), never bf16.
  x0_BHWC = x0_BHWC.astype(dtype)
  sigma_B = jnp.exp(s.p_mean + s.p_std * jax.random.normal(rng_sigma, (batch,), dtype))
  t_B = trig_time(sigma_B, sd)
  c_noise_B = 0.25 * jnp.log(sigma_B)
  z_BHWC = sd * jax.random.normal(rng_noise, x0_BHWC.shape, dtype)
  x_t = _bcast(jnp.cos(t_B), x0_BHWC) * x0_BHWC + _bcast(jnp.sin(t_B), x0_BHWC) * z_BHWC

  x_in = x_t / sd
  if teacher is None:
    dx_dt = conditional_velocity(x0_BHWC, z_BHWC, t_B)
  else:  # The teacher's probability-flow velocity sd F_teacher(x_t / sd, t), without dropout, in float32.
    dx_dt = -sd * teacher.in_float32().network(teacher_params, x_in, c_noise_B, labels_B=labels_B).astype(dtype)
    dx_dt = jax.lax.stop_gradient(dx_dt)

  out = denoiser.network(params, x_in, c_noise_B, rng_dropout, labels_B, return_adaptive_weight=s.adaptive_weight)
  out, phi_B = out if s.adaptive_weight else (out, jnp.zeros((batch,), dtype))
  F_theta = -out.astype(dtype)

  # cos t sin t dF^-/dt in one jvp: F^- is a function of (x_t / sd, c_noise); along the trajectory
  # d(x_t / sd)/dt = dx_dt / sd and d c_noise / dt = 1 / (4 sin t cos t), so the tangents times cos t sin t
  # are (cos t sin t dx_dt / sd, 1/4): no tan or log in the tangent at any t. Same dropout key: same mask.
  target, frozen = denoiser.in_float32(), jax.lax.stop_gradient(params)

  def F_minus_fn(x_in_, c_noise_):
    return -target.network(frozen, x_in_, c_noise_, rng_dropout, labels_B)

  cos_sin_B = jnp.cos(t_B) * jnp.sin(t_B)
  F_minus, cos_sin_dF_dt = jax.jvp(F_minus_fn, (x_in, c_noise_B),
                                   (_bcast(cos_sin_B, x_t) * dx_dt / sd, jnp.full((batch,), 0.25, dtype)))
  F_minus, cos_sin_dF_dt = F_minus.astype(dtype), cos_sin_dF_dt.astype(dtype)
  warmup = tangent_warmup(step, s.warmup_steps).astype(dtype)
  g_raw = jax.lax.stop_gradient(tangent(F_minus, cos_sin_dF_dt, x_t, dx_dt, t_B, sd, warmup))
  g = normalize_tangent(g_raw, s.tangent_c)

  residual_B = karras.l2_distance(F_theta - jax.lax.stop_gradient(F_theta), g)
  phi_B = phi_B.astype(dtype)
  loss_B = jnp.exp(-phi_B) * residual_B + phi_B
  loss = jnp.mean(loss_B)
  metrics = {
      'loss': loss,
      'l2': jnp.mean(residual_B),
      'tangent_rms': jnp.mean(jnp.sqrt(jnp.mean(jnp.square(g_raw), axis=(1, 2, 3)))),
      'tangent_warmup': warmup,
      'adaptive_weight': jnp.mean(phi_B),
      'mean_sigma': jnp.mean(sigma_B),
  }
  return loss, metrics
