"""Analytic tests for cm_jax.core.sampling (CM Algorithm 1) with hand-written fake denoisers (no network)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax.core import karras
from cm_jax.core import sampling

EPS, T, RHO = 0.002, 80.0, 7.0
SHAPE = (4, 3, 3, 1)


def grid64(n_points):
  i = np.arange(n_points, dtype=np.float64)
  lo, hi = EPS ** (1 / RHO), T ** (1 / RHO)
  return (lo + i / (n_points - 1) * (hi - lo)) ** RHO


def normals(seed, shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Times
# --------------------------------------------------------------------------------------------------
def test_default_times():
  assert sampling.default_times(1, EPS, T, RHO) == ()
  (t,) = sampling.default_times(2, EPS, T, RHO)
  # Middle of the 3-point Karras grid: ((eps^(1/7) + T^(1/7))/2)^7 = ((0.411560 + 1.870122)/2)^7
  # = 1.140841^7 = exp(7 * 0.131766) = 2.51522 (configs/default.py uses sampling.two_step_t = 2.52).
  np.testing.assert_allclose(t, ((EPS ** (1 / 7) + T ** (1 / 7)) / 2) ** 7, rtol=1e-6)
  np.testing.assert_allclose(t, 2.51522, rtol=1e-5)
  assert isinstance(t, float)
  ts3 = sampling.default_times(3, EPS, T, RHO)
  assert len(ts3) == 2 and ts3[0] > ts3[1]
  np.testing.assert_allclose(ts3, grid64(4)[1:3][::-1], rtol=1e-6)
  ts5 = sampling.default_times(5, EPS, T, RHO)
  assert all(a > b for a, b in zip(ts5, ts5[1:]))
  np.testing.assert_allclose(ts5, grid64(6)[1:5][::-1], rtol=1e-6)
  assert all(EPS < t < T for t in ts5)
  with pytest.raises(ValueError):
    sampling.default_times(0, EPS, T, RHO)


@pytest.mark.parametrize('ts', [(1.0, 2.0), (2.0, 2.0), (5.0, 1.0, 1.0), (5.0, 1.0, 3.0)])
def test_validate_times_rejects_non_descending(ts):
  with pytest.raises(ValueError, match='descending'):
    sampling.validate_times(ts, EPS, T)


@pytest.mark.parametrize('ts', [(80.0,), (100.0, 2.0), (2.0, EPS), (2.0, 0.001), (-1.0,), (0.0,)])
def test_validate_times_rejects_out_of_range(ts):
  with pytest.raises(ValueError):
    sampling.validate_times(ts, EPS, T)


def test_validate_times_accepts():
  assert sampling.validate_times([], EPS, T) == ()
  assert sampling.validate_times([2.52], EPS, T) == (2.52,)
  out = sampling.validate_times(np.array([40.0, 5.0, 0.585]), EPS, T)
  assert out == (40.0, 5.0, 0.585) and all(type(t) is float for t in out)


# --------------------------------------------------------------------------------------------------
# multistep_sample
# --------------------------------------------------------------------------------------------------
class Recorder:
  """denoise_fn wrapper recording the (x, sigma) of every call (run the sampler without jit)."""

  def __init__(self, fn):
    self.fn, self.calls = fn, []

  def __call__(self, x, sigma):
    self.calls.append((np.asarray(x), np.asarray(sigma)))
    return self.fn(x, sigma)


def _affine(x, sigma):
  return 0.3 * x + 0.01 * sigma[:, None, None, None]


@pytest.mark.parametrize('clip', [True, False])
def test_one_step(clip):
  z = normals(0, SHAPE)
  rec = Recorder(_affine)
  out = np.asarray(sampling.multistep_sample(rec, jnp.asarray(z), jnp.zeros((0,) + SHAPE), (),
                                             sigma_min=EPS, sigma_max=T, clip=clip))
  want = 0.3 * (T * z.astype(np.float64)) + 0.01 * T  # f(T z, T)
  if clip:
    want = np.clip(want, -1, 1)
    assert np.all(np.abs(out) <= 1.0)
  else:
    assert np.max(np.abs(out)) > 2.0  # 0.3 * 80 * |z| is large: clipping really is off.
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  assert len(rec.calls) == 1
  x_in, sigma_in = rec.calls[0]
  np.testing.assert_allclose(x_in, T * z, rtol=1e-6)
  np.testing.assert_array_equal(sigma_in, np.full((SHAPE[0],), T, np.float32))


def test_zero_denoiser_two_steps_gives_zeros():
  z, n1 = normals(1, SHAPE), normals(2, (1,) + SHAPE)
  out = sampling.multistep_sample(lambda x, s: jnp.zeros_like(x), jnp.asarray(z), jnp.asarray(n1), (2.52,),
                                  sigma_min=EPS, sigma_max=T)
  np.testing.assert_array_equal(np.asarray(out), np.zeros(SHAPE, np.float32))


def test_identity_denoiser_two_steps_unclipped():
  z, n1 = normals(3, SHAPE), normals(4, (1,) + SHAPE)
  t = 2.52
  rec = Recorder(lambda x, s: x)
  out = np.asarray(sampling.multistep_sample(rec, jnp.asarray(z), jnp.asarray(n1), (t,),
                                             sigma_min=EPS, sigma_max=T, clip=False))
  want = T * z.astype(np.float64) + math.sqrt(t * t - EPS * EPS) * n1[0]  # sqrt(2.52^2 - 0.002^2) = 2.5199992
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  assert [float(s[0]) for _, s in rec.calls] == [T, np.float32(t)]
  for _, s in rec.calls:
    assert s.shape == (SHAPE[0],) and np.all(s == s[0])


@pytest.mark.parametrize('t', [0.003, 0.01, 2.52])
def test_renoise_scale_is_sqrt_t2_minus_eps2(t):
  # f = 0 at T, identity below: the output is exactly the re-noised zero, sqrt(t^2 - eps^2) n1.
  # t = 0.003: sqrt(9e-6 - 4e-6) = sqrt(5e-6) = 0.00223607 (not 0.003).
  n1 = normals(9, (1,) + SHAPE)
  fn = lambda x, s: jnp.where(s[:, None, None, None] >= T, 0.0, x)
  out = sampling.multistep_sample(fn, jnp.asarray(normals(10, SHAPE)), jnp.asarray(n1), (t,),
                                  sigma_min=EPS, sigma_max=T, clip=False)
  np.testing.assert_allclose(np.asarray(out), math.sqrt(t * t - EPS * EPS) * n1[0], rtol=1e-5, atol=1e-9)
  if t == 0.003:
    np.testing.assert_allclose(math.sqrt(t * t - EPS * EPS), 0.00223607, rtol=1e-5)


def test_identity_denoiser_three_steps_clipped_and_call_inputs():
  z, noise = normals(5, SHAPE), normals(6, (2,) + SHAPE)
  ts = (10.0, 0.5)
  rec = Recorder(lambda x, s: x)
  out = np.asarray(sampling.multistep_sample(rec, jnp.asarray(z), jnp.asarray(noise), ts,
                                             sigma_min=EPS, sigma_max=T, clip=True))
  # Algorithm 1 with clipping after each denoising, by hand in float64.
  x0 = np.clip(T * z.astype(np.float64), -1, 1)
  x1_in = x0 + math.sqrt(10.0 ** 2 - EPS ** 2) * noise[0]
  x1 = np.clip(x1_in, -1, 1)
  x2_in = x1 + math.sqrt(0.5 ** 2 - EPS ** 2) * noise[1]
  x2 = np.clip(x2_in, -1, 1)
  np.testing.assert_allclose(out, x2, rtol=1e-5, atol=1e-6)
  assert len(rec.calls) == 3
  np.testing.assert_allclose([float(s[0]) for _, s in rec.calls], [T, 10.0, 0.5], rtol=1e-7)
  np.testing.assert_allclose(rec.calls[0][0], T * z, rtol=1e-6)
  np.testing.assert_allclose(rec.calls[1][0], x1_in, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(rec.calls[2][0], x2_in, rtol=1e-5, atol=1e-5)


def test_multistep_sample_jit_matches_eager():
  z, noise = normals(7, SHAPE), normals(8, (2,) + SHAPE)
  fn = lambda x, s: jnp.tanh(0.1 * x) + 0.001 * s[:, None, None, None]
  kwargs = dict(sigma_min=EPS, sigma_max=T, clip=True)
  eager = sampling.multistep_sample(fn, jnp.asarray(z), jnp.asarray(noise), (5.0, 1.0), **kwargs)
  jitted = jax.jit(lambda z, n: sampling.multistep_sample(fn, z, n, (5.0, 1.0), **kwargs))(z, noise)
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-6, atol=1e-6)


def test_noise_count_mismatch_raises():
  with pytest.raises(ValueError):
    sampling.multistep_sample(lambda x, s: x, jnp.zeros(SHAPE), jnp.zeros((1,) + SHAPE), (5.0, 1.0),
                              sigma_min=EPS, sigma_max=T)


# --------------------------------------------------------------------------------------------------
# Per-example noise
# --------------------------------------------------------------------------------------------------
def test_example_keys_are_fold_in_of_the_index():
  seed = jax.random.PRNGKey(42)
  keys = np.asarray(sampling.example_keys(seed, 0, 8))
  for i in (0, 3, 7):
    np.testing.assert_array_equal(keys[i], np.asarray(jax.random.fold_in(seed, i)))
  np.testing.assert_array_equal(np.asarray(sampling.example_keys(seed, 4, 4)), keys[4:])
  assert len({tuple(k) for k in keys.tolist()}) == 8


def test_draw_noise_independent_of_batch_size():
  seed = jax.random.PRNGKey(123)
  shape8 = (8, 3, 3, 1)
  z8, n8 = sampling.draw_noise(sampling.example_keys(seed, 0, 8), shape8, 2)
  za, na = sampling.draw_noise(sampling.example_keys(seed, 0, 4), (4, 3, 3, 1), 2)
  zb, nb = sampling.draw_noise(sampling.example_keys(seed, 4, 4), (4, 3, 3, 1), 2)
  assert z8.shape == shape8 and n8.shape == (2,) + shape8
  np.testing.assert_array_equal(np.asarray(z8), np.concatenate([za, zb], axis=0))
  np.testing.assert_array_equal(np.asarray(n8), np.concatenate([na, nb], axis=1))
  # Examples differ from each other, and a step's noise differs from the initial noise and the other step.
  z8, n8 = np.asarray(z8), np.asarray(n8)
  assert not np.allclose(z8[0], z8[1])
  assert not np.allclose(z8, n8[0]) and not np.allclose(n8[0], n8[1])
  # One step: an empty noise stack, and the same initial noise as before for each example.
  z1, n1 = sampling.draw_noise(sampling.example_keys(seed, 0, 8), shape8, 0)
  assert n1.shape == (0,) + shape8
  np.testing.assert_array_equal(np.asarray(z1), z8)
  assert 0.5 < float(np.std(z8)) < 1.5


# --------------------------------------------------------------------------------------------------
# EDM probability-flow ODE: ode_step and diffusion_sample on Gaussian data, where everything is closed form
# --------------------------------------------------------------------------------------------------
# Data ~ N(MU, S0^2) per pixel. Then x_t = x0 + t z ~ N(MU, S0^2 + t^2) and the exact denoiser is
# D(x, t) = E[x0 | x_t = x] = MU + S0^2/(S0^2 + t^2) (x - MU). The PF-ODE dx/dt = (x - D)/t
# = (x - MU) t/(S0^2 + t^2) integrates to (x_t - MU)/sqrt(S0^2 + t^2) = const.
MU, S0 = 0.3, 0.5


def gaussian_denoiser(x, sigma):
  s = sigma[:, None, None, None]
  return MU + S0 ** 2 / (S0 ** 2 + s ** 2) * (x - MU)


def gaussian_denoiser64(x, t):
  return MU + S0 ** 2 / (S0 ** 2 + t ** 2) * (x - MU)


def exact_flow64(x, t, s):
  """The exact PF-ODE solution from time t to time s (s may be 0)."""
  return MU + (x - MU) * math.sqrt(S0 ** 2 + s ** 2) / math.sqrt(S0 ** 2 + t ** 2)


def edm_sampler64(x, sigmas, solver):
  """EDM Algorithm 1 written independently in float64: Euler/Heun steps, the last step (to 0) Euler."""
  for t, s in zip(sigmas[:-1], sigmas[1:]):
    d = (x - gaussian_denoiser64(x, t)) / t
    x_next = x + (s - t) * d
    if solver == 'heun' and s > 0:
      x_next = x + (s - t) * 0.5 * (d + (x_next - gaussian_denoiser64(x_next, s)) / s)
    x = x_next
  return x


def _ode_step_error(solver, t, h, x64):
  b = x64.shape[0]
  out = sampling.ode_step(gaussian_denoiser, jnp.asarray(x64, jnp.float32), jnp.full((b,), t, jnp.float32),
                          jnp.full((b,), t - h, jnp.float32), solver)
  return np.max(np.abs(np.asarray(out, np.float64) - exact_flow64(x64, t, t - h)))


@pytest.mark.parametrize('t', [1.0, 5.0])
def test_ode_step_local_error_order(t):
  """One step of size h: Euler's local error is O(h^2), Heun's O(h^3). Halving h divides the error by ~4 and ~8
  (measured: Euler 4.2-4.5, Heun 8.6-10.1 at h = 0.2t -> 0.1t -> 0.05t). An exact step would give ~0 errors
  (float32 noise ~1e-7 is far below the smallest error here, ~8e-6)."""
  x64 = MU + t * normals(11, SHAPE).astype(np.float64)
  x64 = np.asarray(jnp.asarray(x64, jnp.float32), np.float64)  # what the float32 step actually sees
  hs = [0.2 * t, 0.1 * t, 0.05 * t]
  euler = np.array([_ode_step_error('euler', t, h, x64) for h in hs])
  heun = np.array([_ode_step_error('heun', t, h, x64) for h in hs])
  assert np.all(heun < euler)
  euler_ratio, heun_ratio = euler[:-1] / euler[1:], heun[:-1] / heun[1:]
  assert np.all((3.5 < euler_ratio) & (euler_ratio < 5.5)), euler_ratio
  assert np.all((7.0 < heun_ratio) & (heun_ratio < 12.0)), heun_ratio


def test_ode_step_matches_float64_formula_and_call_count():
  """Euler: x + (s - t) d(x, t); Heun: x + (s - t)(d(x, t) + d(x_euler, s))/2, d = (x - D(x, t))/t (EDM Alg. 1).
  Euler calls the denoiser once, Heun twice (at (x, t), then at (x_euler, s))."""
  x = normals(12, SHAPE)
  x64 = x.astype(np.float64)
  t, s = 3.0, 1.2
  tb, sb = jnp.full((SHAPE[0],), t), jnp.full((SHAPE[0],), s)
  d = (x64 - gaussian_denoiser64(x64, t)) / t
  x_euler = x64 + (s - t) * d
  x_heun = x64 + (s - t) * 0.5 * (d + (x_euler - gaussian_denoiser64(x_euler, s)) / s)
  for solver, want in (('euler', x_euler), ('heun', x_heun)):
    rec = Recorder(gaussian_denoiser)
    out = np.asarray(sampling.ode_step(rec, jnp.asarray(x), tb, sb, solver))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    assert len(rec.calls) == (1 if solver == 'euler' else 2)
    np.testing.assert_allclose(rec.calls[0][0], x)
    np.testing.assert_array_equal(rec.calls[0][1], np.full(SHAPE[0], t, np.float32))
    if solver == 'heun':
      np.testing.assert_allclose(rec.calls[1][0], x_euler, rtol=1e-5, atol=1e-6)
      np.testing.assert_array_equal(rec.calls[1][1], np.full(SHAPE[0], s, np.float32))
  # Per-example times: each example steps with its own (t_b, s_b).
  tb2, sb2 = np.array([3.0, 2.0, 1.0, 0.5]), np.array([1.2, 1.0, 0.3, 0.4])
  out = np.asarray(sampling.ode_step(gaussian_denoiser, jnp.asarray(x), jnp.asarray(tb2, jnp.float32),
                                     jnp.asarray(sb2, jnp.float32), 'heun'))
  for b in range(4):
    np.testing.assert_allclose(out[b], edm_sampler64(x64[b], [tb2[b], sb2[b]], 'heun'), rtol=1e-5, atol=1e-6)


def test_ode_step_unknown_solver_raises():
  b = SHAPE[0]
  with pytest.raises(ValueError, match='rk4'):
    sampling.ode_step(gaussian_denoiser, jnp.zeros(SHAPE), jnp.ones((b,)), jnp.full((b,), 0.5), 'rk4')


@pytest.mark.parametrize('solver', ['heun', 'euler'])
def test_diffusion_sample_matches_float64_sampler(solver):
  # The library's scan against the float64 loop above, step for step: only float32 rounding differs.
  z = normals(13, SHAPE)
  sigmas = karras.edm_sampling_sigmas(18, EPS, T, RHO)
  out = np.asarray(sampling.diffusion_sample(gaussian_denoiser, jnp.asarray(z), sigmas, solver, clip=False))
  want = edm_sampler64(T * z.astype(np.float64), sigmas, solver)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_diffusion_sample_converges_to_exact_ode_solution():
  """x_T = T z flows to x_0 = MU + (x_T - MU) S0/sqrt(S0^2 + T^2) (exact_flow64 with s = 0).

  Measured max errors (|x_0 - MU| up to ~1.2): Heun 18 steps 0.064, 36 steps 0.014 (global order 2: ratio
  ~4.5); Euler 18 steps 0.18, 36 steps 0.09 (order 1: ratio ~2). The final step D(x, sigma_min) differs from
  the exact map to 0 only by a factor S0/sqrt(S0^2 + eps^2) = 1 - 8e-6.
  """
  z = normals(14, SHAPE)
  exact = exact_flow64(T * z.astype(np.float64), T, 0.0)
  err = {}
  for solver in ('heun', 'euler'):
    for steps in (18, 36):
      sigmas = karras.edm_sampling_sigmas(steps, EPS, T, RHO)
      out = sampling.diffusion_sample(gaussian_denoiser, jnp.asarray(z), sigmas, solver, clip=False)
      err[solver, steps] = np.max(np.abs(np.asarray(out, np.float64) - exact))
  scale = np.max(np.abs(exact - MU))
  assert err['heun', 18] < 0.1 * scale
  assert err['heun', 36] < 0.02 * scale
  assert err['euler', 18] > 2 * err['heun', 18]
  assert 3.0 < err['heun', 18] / err['heun', 36] < 6.0      # second order
  assert 1.5 < err['euler', 18] / err['euler', 36] < 2.5    # first order


@pytest.mark.parametrize('solver,steps,calls', [('heun', 18, 35), ('heun', 2, 3), ('heun', 1, 1),
                                                ('euler', 18, 18)])
def test_diffusion_sample_network_calls(solver, steps, calls):
  """Heun: steps - 1 two-call steps and one final Euler call: 2 steps - 1 evaluations (35 for EDM's 18); Euler:
  one per step. Counted at run time with jax.debug.callback (lax.scan traces the body only once)."""
  count = [0]
  traced = [0]

  def counting(x, sigma):
    traced[0] += 1
    jax.debug.callback(lambda: count.__setitem__(0, count[0] + 1))
    return gaussian_denoiser(x, sigma)

  sigmas = karras.edm_sampling_sigmas(steps, EPS, T, RHO)
  sampling.diffusion_sample(counting, jnp.asarray(normals(15, SHAPE)), sigmas, solver).block_until_ready()
  jax.effects_barrier()
  assert count[0] == calls
  # Traced once whatever the number of steps: the scan body (1 or 2 calls) plus the final denoising.
  assert traced[0] == (1 if steps == 1 else (3 if solver == 'heun' else 2))


def test_diffusion_sample_clip_and_single_step():
  z = normals(16, SHAPE)
  # One step: sigmas = [T, 0]: the output is D(T z, T) with no ODE step.
  out = np.asarray(sampling.diffusion_sample(gaussian_denoiser, jnp.asarray(z), [T, 0.0], clip=False))
  np.testing.assert_allclose(out, gaussian_denoiser64(T * z.astype(np.float64), T), rtol=1e-5, atol=1e-6)
  # clip=True bounds the result to [-1, 1]; an identity denoiser leaves T z (|T z| >> 1) unclipped otherwise.
  ident = lambda x, s: x
  clipped = np.asarray(sampling.diffusion_sample(ident, jnp.asarray(z), [T, 1.0, 0.0], clip=True))
  raw = np.asarray(sampling.diffusion_sample(ident, jnp.asarray(z), [T, 1.0, 0.0], clip=False))
  np.testing.assert_allclose(raw, T * z, rtol=1e-6)  # identity denoiser: d = 0, x never moves
  np.testing.assert_array_equal(clipped, np.clip(raw, -1, 1))


@pytest.mark.parametrize('sigmas', [[80.0, 1.0], [80.0, 1.0, 0.002], [1.0, 80.0, 0.0], [80.0, 80.0, 0.0],
                                    [80.0], [[80.0, 0.0]], [80.0, 0.0, 0.0]])
def test_diffusion_sample_rejects_bad_sigmas(sigmas):
  with pytest.raises(ValueError, match='sigmas'):
    sampling.diffusion_sample(gaussian_denoiser, jnp.zeros(SHAPE), sigmas)
