"""Sampling maths (the sample CLI is cm_jax/sample.py): consistency sampling (CM Algorithm 1), EDM ODE solvers.

`denoise_fn(x_BHWC, sigma_B) -> x0_BHWC` is the consistency function with its parameters bound, e.g.
`functools.partial(denoiser, params)`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cm_jax.core import karras

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


def default_times(steps: int, sigma_min: float, sigma_max: float, rho: float) -> tuple[float, ...]:
  """Intermediate times for `steps`-step sampling: the interior of a (steps + 1)-point Karras grid, descending.

  One step: (). Two steps: (2.52,) with the default constants. Tuned times (ternary search over a metric) do
  better; pass them explicitly.
  """
  if steps < 1:
    raise ValueError(f'steps must be >= 1, got {steps}.')
  with jax.ensure_compile_time_eval():  # Host constants even when called while tracing.
    grid = np.asarray(karras.karras_grid(steps + 1, sigma_min, sigma_max, rho), np.float64)
  return tuple(float(t) for t in grid[1:-1][::-1])


def validate_times(ts: Sequence[float], sigma_min: float, sigma_max: float) -> tuple[float, ...]:
  """Checks that ts is strictly descending inside (sigma_min, sigma_max); returns it as a tuple of floats.

  sigma_max: the time of sampling's first call (consistency.sigma_max, or sampling.start_t when set).
  """
  ts = tuple(float(t) for t in ts)
  for t in ts:
    if not sigma_min < t < sigma_max:
      raise ValueError(f'Sampling time {t} is outside ({sigma_min}, {sigma_max}); each of --ts must lie '
                       'strictly between sigma_min and the start time (sigma_max, or sampling.start_t).')
  if any(a <= b for a, b in zip(ts, ts[1:])):
    raise ValueError(f'Sampling times {ts} must be strictly descending.')
  return ts


def multistep_sample(denoise_fn: DenoiseFn, z_BHWC: jax.Array, noise_KBHWC: jax.Array, ts: Sequence[float], *,
                     sigma_min: float, sigma_max: float, clip: bool = True) -> jax.Array:
  """CM Algorithm 1. x = f(T z, T); for tau in ts: x = f(x + sqrt(tau^2 - eps^2) z_k, tau), T = sigma_max.

  sigma_max is the time of the first call: the noise level the run was trained up to, or a lower start
  (config.sampling.start_t), where T z stands in for data + T z (the data's std is small against T).

  z_BHWC is the initial standard normal noise; noise_KBHWC holds one standard normal draw per entry of ts
  (K = len(ts); shape (0, ...) for one step). ts may be floats or a traced (K,) array (one compiled program
  for every choice of times). clip: clip each denoised x0 to [-1, 1] (as the official code).
  Returns samples in [-1, 1] when clip is True.
  """
  if noise_KBHWC.shape[0] != len(ts):
    raise ValueError(f'noise_KBHWC has {noise_KBHWC.shape[0]} draws for {len(ts)} times.')
  batch = z_BHWC.shape[0]

  def denoise(x, t):
    x0 = denoise_fn(x, jnp.full((batch,), t, x.dtype))
    return jnp.clip(x0, -1.0, 1.0) if clip else x0

  x = denoise(sigma_max * z_BHWC, sigma_max)
  for k, t in enumerate(ts):
    x = x + jnp.sqrt(t**2 - sigma_min**2) * noise_KBHWC[k]
    x = denoise(x, t)
  return x


def draw_noise(rng: jax.Array, shape_BHWC: tuple[int, ...], num_times: int) -> tuple[jax.Array, jax.Array]:
  """Initial noise and per-step noise for a batch, each example from its own key.

  `rng` is a (B,) batch of keys (e.g. fold_in(seed_key, example_index)), so sample i depends only on its own
  key: the same seed gives the same samples whatever the batch size.
  """
  def one(key):
    k0, k1 = jax.random.split(key)
    return (jax.random.normal(k0, shape_BHWC[1:]),
            jax.random.normal(k1, (num_times,) + tuple(shape_BHWC[1:])))
  z_BHWC, noise_BKHWC = jax.vmap(one)(rng)
  return z_BHWC, jnp.swapaxes(noise_BKHWC, 0, 1)


def example_keys(seed_key: jax.Array, start: int, count: int) -> jax.Array:
  """Keys fold_in(seed_key, i) for i in [start, start + count)."""
  return jax.vmap(lambda i: jax.random.fold_in(seed_key, i))(jnp.arange(start, start + count))


# --------------------------------------------------------------------------------------------------
# Diffusion (EDM) sampling: the probability-flow ODE dx/dt = (x - D(x, t)) / t, deterministic
# --------------------------------------------------------------------------------------------------
def _expand(v_B):
  return v_B[:, None, None, None]


def euler_step(denoise_fn: DenoiseFn, x_BHWC: jax.Array, t_B: jax.Array, s_B: jax.Array) -> jax.Array:
  """One Euler step of the probability-flow ODE from t to s: x + (s - t) d(x, t), d = (x - D(x, t)) / t.

  denoise_fn is an EDM denoiser D(x, sigma); one network call; s = 0 is allowed.
  """
  d_BHWC = (x_BHWC - denoise_fn(x_BHWC, t_B)) / _expand(t_B)
  return x_BHWC + _expand(s_B - t_B) * d_BHWC


def heun_step(denoise_fn: DenoiseFn, x_BHWC: jax.Array, t_B: jax.Array, s_B: jax.Array) -> jax.Array:
  """One Heun step from t to s > 0 (EDM Algorithm 1): the Euler step, then the trapezoid correction with d at
  (x_euler, s). Two network calls."""
  d_BHWC = (x_BHWC - denoise_fn(x_BHWC, t_B)) / _expand(t_B)
  x_euler = x_BHWC + _expand(s_B - t_B) * d_BHWC
  d_next = (x_euler - denoise_fn(x_euler, s_B)) / _expand(s_B)
  return x_BHWC + _expand(s_B - t_B) * 0.5 * (d_BHWC + d_next)


# Config strings (teacher.solver, sampling.diffusion_solver) are resolved here, outside traced code.
ODE_SOLVERS = {'heun': heun_step, 'euler': euler_step}


def ode_solver(name: str):
  if name not in ODE_SOLVERS:
    raise ValueError(f'ODE solver {name!r} is not one of {sorted(ODE_SOLVERS)}.')
  return ODE_SOLVERS[name]


def ode_step(denoise_fn: DenoiseFn, x_BHWC: jax.Array, t_B: jax.Array, s_B: jax.Array,
             solver: str) -> jax.Array:
  """One step of the probability-flow ODE dx/dt = (x - D(x, t)) / t from t to s with the solver named."""
  return ode_solver(solver)(denoise_fn, x_BHWC, t_B, s_B)


def diffusion_sample(denoise_fn: DenoiseFn, z_BHWC: jax.Array, sigmas: np.ndarray, solver: str = 'heun', *,
                     clip: bool = True) -> jax.Array:
  """EDM deterministic sampler: x = sigmas[0] z, then ODE steps through the descending `sigmas`.

  sigmas ends with 0 (karras.edm_sampling_sigmas). Every step but the last uses `solver`; the last step,
  to sigma = 0, is Euler, which equals x = D(x, sigmas[-2]). The steps run under lax.scan, so the network
  is traced once whatever the number of steps. clip: clip the result to [-1, 1].
  """
  sigmas = np.asarray(sigmas, np.float32)
  if sigmas.ndim != 1 or len(sigmas) < 2 or sigmas[-1] != 0 or np.any(np.diff(sigmas) >= 0):
    raise ValueError(f'sigmas must be strictly descending and end with 0, got {sigmas}.')
  step_fn = ode_solver(solver)
  batch = z_BHWC.shape[0]
  x = sigmas[0] * z_BHWC

  def body(x, ts):
    t, s = ts
    return step_fn(denoise_fn, x, jnp.full((batch,), t), jnp.full((batch,), s)), None

  if len(sigmas) > 2:
    x, _ = jax.lax.scan(body, x, (jnp.asarray(sigmas[:-2]), jnp.asarray(sigmas[1:-1])))
  x = denoise_fn(x, jnp.full((batch,), sigmas[-2]))  # The Euler step to sigma = 0.
  return jnp.clip(x, -1.0, 1.0) if clip else x

