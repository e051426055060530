"""Pure maths of consistency models: the Karras noise grid, preconditioning, schedules.

Conventions (see README, "Maths conventions"):
- The grid is indexed ascending, as in the CM paper: index 0 is sigma_min (eps), index N-1 is sigma_max (T).
  (The official JAX code indexes the same grid descending.)
- A training pair (n, n+1) uses sigma_n < sigma_{n+1}, n in {0, ..., N-2}.
- Every function accepts traced values: the number of grid points N may change with the training step
  inside one compiled train step, so nothing here depends on N being a Python int.

Formulas: CM = Song et al. 2023 (arXiv 2303.01469), iCT = Song & Dhariwal 2023 (arXiv 2310.14189).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


# --------------------------------------------------------------------------------------------------
# Grid
# --------------------------------------------------------------------------------------------------
def karras_sigma(i, num_points, sigma_min: float, sigma_max: float, rho: float):
  """sigma_i of the N-point Karras grid, ascending (i = 0 gives sigma_min, i = N-1 gives sigma_max).

  sigma_i = (eps^(1/rho) + i/(N-1) (T^(1/rho) - eps^(1/rho)))^rho  (CM eq. 5 with i shifted to start at 0).
  """
  i = jnp.asarray(i, jnp.float32)
  num_points = jnp.asarray(num_points, jnp.float32)
  lo = sigma_min ** (1.0 / rho)
  hi = sigma_max ** (1.0 / rho)
  sigma = (lo + i / (num_points - 1.0) * (hi - lo)) ** rho
  # The endpoints exactly (float32 rounding of the power gives 0.0019999996 and 79.999985).
  return jnp.where(i == 0, sigma_min, jnp.where(i == num_points - 1, sigma_max, sigma)).astype(jnp.float32)


def karras_grid(num_points: int, sigma_min: float, sigma_max: float, rho: float) -> jnp.ndarray:
  """The whole ascending grid, shape (num_points,)."""
  return karras_sigma(jnp.arange(num_points), num_points, sigma_min, sigma_max, rho)


# --------------------------------------------------------------------------------------------------
# Preconditioning: f(x, s) = c_skip(s) x + c_out(s) F(c_in(s) x, c_noise(s))
# --------------------------------------------------------------------------------------------------
def c_skip(sigma, sigma_data: float, sigma_min: float):
  """sigma_data^2 / ((sigma - eps)^2 + sigma_data^2); exactly 1 at sigma = eps."""
  return sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)


def c_out(sigma, sigma_data: float, sigma_min: float):
  """sigma_data (sigma - eps) / sqrt(sigma_data^2 + sigma^2); exactly 0 at sigma = eps."""
  return sigma_data * (sigma - sigma_min) * jax.lax.rsqrt(sigma_data**2 + sigma**2)


def c_in(sigma, sigma_data: float):
  """1 / sqrt(sigma^2 + sigma_data^2).

  Both reciprocal square roots are written as rsqrt: XLA rewrites 1 / sqrt(v) to rsqrt(v) in some programs
  and not in others (it did in the one-device sampler and not in the same sampler partitioned over two
  devices), and the two differ by an ulp for some v (sigma = 0.06), so the same sample came out in different
  bits on one device and on several. Spelled rsqrt, every program computes the same thing.
  """
  return jax.lax.rsqrt(sigma**2 + sigma_data**2)


def c_noise(sigma):
  """0.25 ln(sigma): the network's noise conditioning input."""
  return 0.25 * jnp.log(sigma)


def precondition(net_fn, x_BHWC, sigma_B, *, sigma_data: float, sigma_min: float):
  """Consistency function (sigma_min = eps) or EDM denoiser (sigma_min = 0) around a raw network.

  net_fn(x_in_BHWC, c_noise_B) -> F_BHWC. Returns c_skip x + c_out F. At sigma = sigma_min the skip
  weight is exactly 1 and the output weight exactly 0, so f(x, eps) == x bit for bit.
  """
  def expand(v_B):
    return v_B.reshape((-1,) + (1,) * (x_BHWC.ndim - 1))
  sigma_B = jnp.asarray(sigma_B, x_BHWC.dtype)
  f_BHWC = net_fn(expand(c_in(sigma_B, sigma_data)) * x_BHWC, c_noise(sigma_B))
  return (expand(c_skip(sigma_B, sigma_data, sigma_min)) * x_BHWC
          + expand(c_out(sigma_B, sigma_data, sigma_min)) * f_BHWC)


# --------------------------------------------------------------------------------------------------
# Discretisation schedules N(k) and target EMA mu(k); k = training step, K = total steps
# --------------------------------------------------------------------------------------------------
def ct_num_points(step, total_steps: int, s0: int, s1: int):
  """CM appendix C: N(k) = ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1) + 1 (int32), capped at s1 + 1.

  N(0) = s0 and N(K) = s1 + 1. Exact: float32 rounding of the square root misplaces a few jumps (e.g. at
  k = 350783 of the CIFAR schedule), so the steps where N jumps are found on the host in integer arithmetic
  and the traced step is looked up among them. N(k) >= m  <=>  k ((s1+1)^2 - s0^2) > K ((m-1)^2 - s0^2).
  """
  span = (s1 + 1) ** 2 - s0**2
  jumps = np.asarray([total_steps * ((m - 1) ** 2 - s0**2) // span + 1 for m in range(s0 + 1, s1 + 2)],
                     np.int64)
  if jumps.max(initial=0) > np.iinfo(np.int32).max:
    raise ValueError(f'loss.total_steps = {total_steps} is too large for int32 step arithmetic.')
  k = jnp.asarray(step, jnp.int32)
  return (s0 + jnp.searchsorted(jnp.asarray(jumps, jnp.int32), k, side='right')).astype(jnp.int32)


def ict_num_points(step, total_steps: int, s0: int, s1: int):
  """iCT exponential curriculum: N(k) = min(s0 2^floor(k/K'), s1) + 1, K' = floor(K/(log2 floor(s1/s0) + 1)).

  With s0 = 10, s1 = 1280, N goes 11, 21, 41, ..., 1281. Exact integer arithmetic.
  """
  stage_steps = max(1, int(total_steps // (np.log2(s1 // s0) + 1)))
  stage = jnp.asarray(step, jnp.int32) // stage_steps
  max_stage = int(np.ceil(np.log2(max(s1 / s0, 1.0))))  # s0 2^max_stage >= s1, and no int32 overflow.
  stage = jnp.minimum(stage, max_stage)
  return jnp.minimum(s0 * 2**stage, s1) + 1


def ct_target_decay(num_points, s0: int, mu0: float, variant: str):
  """Target-network EMA rate mu(k) of CM (2023) consistency training.

  'paper':    mu = exp(s0 ln(mu0) / N(k))      (CM appendix C); mu(0) = mu0 when N(0) = s0.
  'official': mu = exp(s0 ln(mu0) / (N(k)-1))  (openai code);  mu(0) = mu0^s0 when N(0) = s0 = 2.
  """
  n = jnp.asarray(num_points, jnp.float32)
  denominators = {'paper': n, 'official': n - 1.0}
  if variant not in denominators:
    raise ValueError(f'Unknown mu variant {variant!r}; choose one of {sorted(denominators)} '
                     '(config field loss.mu_variant).')
  return jnp.exp(s0 * np.log(mu0) / denominators[variant])


# --------------------------------------------------------------------------------------------------
# Noise-index distributions over n in {0, ..., N-2}; `max_points` is a static upper bound on N
# --------------------------------------------------------------------------------------------------
def lognormal_index_logits(num_points, max_points: int, sigma_min: float, sigma_max: float, rho: float,
                           p_mean: float, p_std: float):
  """iCT discretised lognormal: p(n) ~ erf((ln s_{n+1} - Pm)/(sqrt2 Ps)) - erf((ln s_n - Pm)/(sqrt2 Ps)).

  Returns log-probabilities, shape (max_points - 1,), -inf for n >= N - 1 (unnormalised is fine for
  jax.random.categorical; use jax.nn.softmax to get probabilities).
  """
  n = jnp.arange(max_points - 1)
  sigma_lo = karras_sigma(n, num_points, sigma_min, sigma_max, rho)
  sigma_hi = karras_sigma(n + 1, num_points, sigma_min, sigma_max, rho)
  def cdf_term(s):
    return jax.scipy.special.erf((jnp.log(s) - p_mean) / (np.sqrt(2.0) * p_std))
  mass = cdf_term(sigma_hi) - cdf_term(sigma_lo)
  valid = n < num_points - 1
  return jnp.where(valid & (mass > 0), jnp.log(jnp.where(valid & (mass > 0), mass, 1.0)), -jnp.inf)


def uniform_index_logits(num_points, max_points: int):
  """CM (2023): n uniform on {0, ..., N-2}; as log-probabilities of shape (max_points - 1,)."""
  n = jnp.arange(max_points - 1)
  return jnp.where(n < num_points - 1, 0.0, -jnp.inf)


# --------------------------------------------------------------------------------------------------
# Distances (per sample, shape (B,)) and loss weights
# --------------------------------------------------------------------------------------------------
def pseudo_huber_constant(dim: int) -> float:
  """iCT: c = 0.00054 sqrt(D), D = H*W*C (0.0299 for 32x32x3, 0.0151 for 28x28x1)."""
  return 0.00054 * float(np.sqrt(dim))


def l2_distance(a_BHWC, b_BHWC):
  """Mean squared error per sample."""
  return jnp.mean(jnp.square(a_BHWC - b_BHWC), axis=tuple(range(1, a_BHWC.ndim)))


def l1_distance(a_BHWC, b_BHWC):
  """Mean absolute error per sample."""
  return jnp.mean(jnp.abs(a_BHWC - b_BHWC), axis=tuple(range(1, a_BHWC.ndim)))


def pseudo_huber_distance(a_BHWC, b_BHWC, c: float):
  """iCT pseudo-Huber over the whole sample vector: sqrt(||a - b||_2^2 + c^2) - c (not per pixel)."""
  sq = jnp.sum(jnp.square(a_BHWC - b_BHWC), axis=tuple(range(1, a_BHWC.ndim)))
  return jnp.sqrt(sq + c**2) - c


def inverse_delta_weight(sigma_lo, sigma_hi):
  """iCT loss weight lambda(sigma_n) = 1 / (sigma_{n+1} - sigma_n)."""
  return 1.0 / (sigma_hi - sigma_lo)


def l2_norm_distance(a_BHWC, b_BHWC):
  """||a - b||_2 over the whole sample vector (ECT; pseudo-Huber with c = 0), with a finite gradient at 0."""
  sq = jnp.sum(jnp.square(a_BHWC - b_BHWC), axis=tuple(range(1, a_BHWC.ndim)))
  return jnp.sqrt(jnp.maximum(sq, jnp.finfo(sq.dtype).tiny))


def edm_weight(sigma, sigma_data: float):
  """EDM loss weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (= 1 / c_out^2 with eps = 0)."""
  return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


# --------------------------------------------------------------------------------------------------
# EDM teacher: noise levels of its training loss and of its sampler
# --------------------------------------------------------------------------------------------------
def edm_training_sigma(rng, batch: int, p_mean: float, p_std: float):
  """EDM training noise levels: ln sigma ~ N(p_mean, p_std^2) (EDM: -1.2, 1.2), shape (batch,)."""
  return jnp.exp(p_mean + p_std * jax.random.normal(rng, (batch,)))


def edm_sampling_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float) -> np.ndarray:
  """EDM sampler times, descending: the num_steps-point Karras grid from sigma_max to sigma_min, then 0.

  Shape (num_steps + 1,). Heun takes num_steps - 1 second-order steps and a last Euler step to 0:
  2 num_steps - 1 network calls (35 for the EDM default of 18).
  """
  if num_steps < 1:
    raise ValueError(f'The EDM sampler needs >= 1 steps, got {num_steps}.')
  if num_steps == 1:
    return np.asarray([sigma_max, 0.0], np.float64)
  i = np.arange(num_steps, dtype=np.float64)
  lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  sigmas = (hi + i / (num_steps - 1) * (lo - hi)) ** rho
  sigmas[0], sigmas[-1] = sigma_max, sigma_min
  return np.append(sigmas, 0.0)


# --------------------------------------------------------------------------------------------------
# ECT (Geng et al. 2024): the continuous r(t) schedule with stage doubling
# --------------------------------------------------------------------------------------------------
def ect_stage(step, stage_steps: int):
  """ECT stage: floor(k / stage_steps); the gap t - r shrinks by a factor q at each stage."""
  return jnp.asarray(step, jnp.int32) // stage_steps


def ect_r(t, stage, q: float, k: float, b: float):
  """ECT: r = max(0, t (1 - q^-(stage+1) (1 + k sigmoid(-b t)))). 0 <= r < t; r -> t as the stage grows."""
  decay = jnp.power(jnp.asarray(q, jnp.float32), -(jnp.asarray(stage, jnp.float32) + 1.0))
  ratio = 1.0 - decay * (1.0 + k * jax.nn.sigmoid(-b * t))
  return jnp.maximum(t * ratio, 0.0)
