"""Analytic tests for cm_jax.core.karras: every expectation is an independent float64 computation of the paper
formula (docs: /work/shared/reference/consistency_models.md) or a number derived by hand in a comment."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax.core import karras

EPS, T, RHO, SD = 0.002, 80.0, 7.0, 0.5
P_MEAN, P_STD = -1.1, 2.0


# --------------------------------------------------------------------------------------------------
# float64 reference formulas, written from the paper (not from the library)
# --------------------------------------------------------------------------------------------------
def grid64(n_points, sigma_min=EPS, sigma_max=T, rho=RHO):
  """CM eq. 5, ascending: sigma_i = (eps^(1/rho) + i/(N-1) (T^(1/rho) - eps^(1/rho)))^rho, i = 0..N-1."""
  i = np.arange(n_points, dtype=np.float64)
  lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
  return (lo + i / (n_points - 1) * (hi - lo)) ** rho


def ct_n64(k, big_k, s0, s1):
  """CM appendix C, float64."""
  return int(math.ceil(math.sqrt(k / big_k * ((s1 + 1) ** 2 - s0 ** 2) + s0 ** 2) - 1) + 1)


def ct_n_exact(k, big_k, s0, s1):
  """Same N(k) in exact integer arithmetic (vectorised over k, int64).

  ceil(sqrt(a) - 1) + 1 == ceil(sqrt(a)) == the smallest integer m with m^2 >= a, and with
  a = (k ((s1+1)^2 - s0^2) + K s0^2) / K that is m^2 K >= k ((s1+1)^2 - s0^2) + K s0^2.
  """
  k = np.asarray(k, np.int64)
  rhs = k * ((s1 + 1) ** 2 - s0 ** 2) + big_k * s0 ** 2
  m = np.ceil(np.sqrt(rhs / big_k)).astype(np.int64)
  m = np.where((m - 1) ** 2 * big_k >= rhs, m - 1, m)  # float64 guess may be one too high ...
  m = np.where(m ** 2 * big_k < rhs, m + 1, m)          # ... or one too low.
  assert np.all(m ** 2 * big_k >= rhs) and np.all((m - 1) ** 2 * big_k < rhs)
  return m


def lognormal_probs64(n_points, p_mean=P_MEAN, p_std=P_STD):
  """iCT: p(n) ~ erf((ln s_{n+1} - Pm)/(sqrt2 Ps)) - erf((ln s_n - Pm)/(sqrt2 Ps)), n = 0..N-2."""
  e = np.array([math.erf((math.log(s) - p_mean) / (math.sqrt(2.0) * p_std)) for s in grid64(n_points)])
  mass = np.diff(e)
  return mass / mass.sum()


# --------------------------------------------------------------------------------------------------
# Grid
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('n_points', [18, 40, 1281])
def test_karras_grid_endpoints_monotone_and_formula(n_points):
  g = np.asarray(karras.karras_grid(n_points, EPS, T, RHO))
  assert g.shape == (n_points,)
  assert g.dtype == np.float32
  np.testing.assert_allclose(g[0], EPS, rtol=1e-6)
  np.testing.assert_allclose(g[-1], T, rtol=1e-6)
  assert np.all(np.diff(g) > 0), 'grid must be strictly increasing (index 0 = sigma_min)'
  np.testing.assert_allclose(g, grid64(n_points), rtol=5e-6)


def test_karras_grid_hand_values():
  # N = 2: just the two endpoints. N = 3: the middle point is ((eps^(1/7) + T^(1/7))/2)^7:
  # eps^(1/7) = exp(ln(0.002)/7) = exp(-0.887801) = 0.411560, T^(1/7) = exp(ln(80)/7) = exp(0.626004)
  # = 1.870122; mean 1.140841; ^7 = exp(7 * 0.131766) = exp(0.922360) = 2.51522.
  np.testing.assert_allclose(np.asarray(karras.karras_grid(2, EPS, T, RHO)), [EPS, T], rtol=1e-6)
  np.testing.assert_allclose(float(karras.karras_grid(3, EPS, T, RHO)[1]), 2.51522, rtol=1e-5)
  # karras_sigma with a traced N and an array of indices agrees with the grid.
  sig = jax.jit(lambda i, n: karras.karras_sigma(i, n, EPS, T, RHO))(jnp.arange(18), jnp.int32(18))
  np.testing.assert_allclose(np.asarray(sig), grid64(18), rtol=5e-6)


# --------------------------------------------------------------------------------------------------
# Preconditioning
# --------------------------------------------------------------------------------------------------
def _big_random_net(x_in, c_noise):
  del c_noise  # numpy draws (shapes are static under jit): no threefry compile, which is slow on CPU.
  return jnp.asarray(1e6 * np.random.default_rng(7).normal(size=x_in.shape), x_in.dtype)


def test_boundary_condition_is_exact():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 4, 2)) * 3.0, jnp.float32)
  out = karras.precondition(_big_random_net, x, jnp.full((3,), EPS), sigma_data=SD, sigma_min=EPS)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
  # The coefficients themselves are exactly 1 and 0 at eps (float32 eps, as used by the code).
  s = jnp.float32(EPS)
  assert float(karras.c_skip(s, SD, EPS)) == 1.0
  assert float(karras.c_out(s, SD, EPS)) == 0.0


def test_boundary_condition_is_exact_under_jit_and_per_example():
  # Mixed batch: example 0 at eps is returned bit for bit, example 1 at sigma = 1 is not.
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 3, 1)), jnp.float32)
  f = jax.jit(lambda x, s: karras.precondition(_big_random_net, x, s, sigma_data=SD, sigma_min=EPS))
  out = np.asarray(f(x, jnp.array([EPS, 1.0], jnp.float32)))
  np.testing.assert_array_equal(out[0], np.asarray(x)[0])
  assert np.max(np.abs(out[1] - np.asarray(x)[1])) > 1.0


@pytest.mark.parametrize('sigma_min', [EPS, 0.0])
@pytest.mark.parametrize('s', [0.01, 0.5, 2.52, 80.0])
def test_coefficients_vs_float64(s, sigma_min):
  c_skip64 = SD ** 2 / ((s - sigma_min) ** 2 + SD ** 2)
  c_out64 = SD * (s - sigma_min) / math.sqrt(SD ** 2 + s ** 2)
  c_in64 = 1.0 / math.sqrt(s ** 2 + SD ** 2)
  c_noise64 = 0.25 * math.log(s)
  sj = jnp.float32(s)
  np.testing.assert_allclose(float(karras.c_skip(sj, SD, sigma_min)), c_skip64, rtol=1e-5)
  np.testing.assert_allclose(float(karras.c_out(sj, SD, sigma_min)), c_out64, rtol=1e-5)
  np.testing.assert_allclose(float(karras.c_in(sj, SD)), c_in64, rtol=1e-6)
  np.testing.assert_allclose(float(karras.c_noise(sj)), c_noise64, rtol=1e-6, atol=1e-7)


def test_coefficient_hand_values():
  # sigma = 0.5 = sigma_data, EDM (sigma_min = 0): c_skip = 0.25/0.5 = 0.5, c_out = 0.25/sqrt(0.5)
  # = 0.353553, c_in = 1/sqrt(0.5) = 1.414214, c_noise = 0.25 ln 0.5 = -0.173287.
  s = jnp.float32(0.5)
  np.testing.assert_allclose(float(karras.c_skip(s, SD, 0.0)), 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(karras.c_out(s, SD, 0.0)), 0.353553, rtol=1e-5)
  np.testing.assert_allclose(float(karras.c_in(s, SD)), 1.414214, rtol=1e-6)
  np.testing.assert_allclose(float(karras.c_noise(s)), -0.173287, rtol=1e-5)
  # EDM at sigma = 0 would be the identity too: c_skip(0) = 1, c_out(0) = 0.
  assert float(karras.c_skip(jnp.float32(0.0), SD, 0.0)) == 1.0
  assert float(karras.c_out(jnp.float32(0.0), SD, 0.0)) == 0.0


@pytest.mark.parametrize('sigma_min', [EPS, 0.0])
def test_precondition_vs_float64(sigma_min):
  """f = c_skip x + c_out F(c_in x, c_noise) with a tiny hand-written F, against float64 numpy."""
  def net(x_in, c_noise_b):
    return jnp.tanh(0.7 * x_in + c_noise_b[:, None, None, None])

  def net64(x_in, c_noise_b):
    return np.tanh(0.7 * x_in + c_noise_b[:, None, None, None])

  x = np.random.default_rng(2).normal(size=(4, 2, 2, 3)).astype(np.float32).astype(np.float64)
  s = np.array([0.01, 0.3, 2.5, 80.0])
  out = np.asarray(karras.precondition(net, jnp.asarray(x, jnp.float32), jnp.asarray(s, jnp.float32),
                                       sigma_data=SD, sigma_min=sigma_min))
  b = lambda v: v[:, None, None, None]
  c_skip64 = SD ** 2 / ((s - sigma_min) ** 2 + SD ** 2)
  c_out64 = SD * (s - sigma_min) / np.sqrt(SD ** 2 + s ** 2)
  c_in64 = 1 / np.sqrt(s ** 2 + SD ** 2)
  want = b(c_skip64) * x + b(c_out64) * net64(b(c_in64) * x, 0.25 * np.log(s))
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# CM adaptive N(k) and mu(k)
# --------------------------------------------------------------------------------------------------
CIFAR_K, CIFAR_S0, CIFAR_S1 = 800_000, 2, 150


def test_ct_num_points_endpoints_and_half():
  n = lambda k: int(karras.ct_num_points(k, CIFAR_K, CIFAR_S0, CIFAR_S1))
  assert n(0) == 2          # sqrt(s0^2) - 1 = 1, ceil 1, + 1 = 2 = s0.
  assert n(CIFAR_K) == 151  # sqrt((s1+1)^2) - 1 = 150, + 1 = 151 = s1 + 1.
  # k = K/2: a = 0.5 (151^2 - 2^2) + 2^2 = 0.5 (22801 - 4) + 4 = 11402.5; 106^2 = 11236 < a < 11449 = 107^2,
  # so sqrt(a) = 106.78..., minus 1 = 105.78..., ceil = 106, + 1 = 107.
  assert n(CIFAR_K // 2) == 107
  # k = 1: a = 22797/800000 + 4 = 4.0285; sqrt = 2.0071; -1 -> 1.0071; ceil 2; + 1 = 3 (N jumps at once).
  assert n(1) == 3


def test_ct_num_points_vs_float64_random_steps():
  ks = np.random.default_rng(0).integers(0, CIFAR_K + 1, size=1000)
  got = np.asarray(jax.jit(lambda k: karras.ct_num_points(k, CIFAR_K, CIFAR_S0, CIFAR_S1))(ks))
  want = np.array([ct_n64(int(k), CIFAR_K, CIFAR_S0, CIFAR_S1) for k in ks])
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, want)
  assert np.all(np.diff(got[np.argsort(ks)]) >= 0)


def test_ct_num_points_float64_reference_is_exact():
  # The float64 reference itself agrees with exact integer arithmetic on every CIFAR step.
  ks = np.arange(CIFAR_K + 1)
  a = ks / CIFAR_K * ((CIFAR_S1 + 1) ** 2 - CIFAR_S0 ** 2) + CIFAR_S0 ** 2
  np.testing.assert_array_equal(np.ceil(np.sqrt(a) - 1) + 1, ct_n_exact(ks, CIFAR_K, CIFAR_S0, CIFAR_S1))


def test_ct_num_points_exact_at_every_step_of_cifar_schedule():
  """Every k in 0..K of the CIFAR-10 schedule (K = 800k, s0 = 2, s1 = 150) against exact integer arithmetic.

  A float32 evaluation of the formula is one too low at seven steps (e.g. k = 350783, where
  a = 10000.00006375 and N = ceil(100.0000003) = 101); karras.ct_num_points must not be.
  """
  ks = np.arange(CIFAR_K + 1)
  got = np.asarray(jax.jit(jax.vmap(lambda k: karras.ct_num_points(k, CIFAR_K, CIFAR_S0, CIFAR_S1)))(ks))
  want = ct_n_exact(ks, CIFAR_K, CIFAR_S0, CIFAR_S1)
  bad = ks[got != want]
  assert bad.size == 0, f'N(k) wrong at {bad.size} steps, e.g. k={bad[:5].tolist()}: ' \
                        f'got {got[bad[:5]].tolist()}, exact {want[bad[:5]].tolist()}'


def test_ct_target_decay_hand_values():
  # paper: exp(s0 ln mu0 / N) at N = s0 = 2 -> exp(ln 0.9) = 0.9.
  # official: exp(s0 ln mu0 / (N - 1)) at N = 2 -> exp(2 ln 0.9) = 0.81.
  np.testing.assert_allclose(float(karras.ct_target_decay(2, 2, 0.9, 'paper')), 0.9, rtol=1e-6)
  np.testing.assert_allclose(float(karras.ct_target_decay(2, 2, 0.9, 'official')), 0.81, rtol=1e-6)


@pytest.mark.parametrize('n_points', [2, 3, 10, 77, 151])
@pytest.mark.parametrize('mu0,s0', [(0.9, 2), (0.95, 2), (0.95, 3)])
def test_ct_target_decay_vs_float64(n_points, mu0, s0):
  paper = math.exp(s0 * math.log(mu0) / n_points)
  official = math.exp(s0 * math.log(mu0) / (n_points - 1))
  np.testing.assert_allclose(float(karras.ct_target_decay(n_points, s0, mu0, 'paper')), paper, rtol=1e-6)
  np.testing.assert_allclose(float(karras.ct_target_decay(n_points, s0, mu0, 'official')), official,
                             rtol=1e-6)


def test_ct_target_decay_traced_n():
  n = jnp.array([2, 11, 151], jnp.int32)
  got = np.asarray(jax.jit(lambda n: karras.ct_target_decay(n, 2, 0.9, 'paper'))(n))
  np.testing.assert_allclose(got, [math.exp(2 * math.log(0.9) / v) for v in (2, 11, 151)], rtol=1e-6)


def test_ct_target_decay_unknown_variant():
  with pytest.raises(ValueError, match='loss.mu_variant'):
    karras.ct_target_decay(2, 2, 0.9, 'pape')


# --------------------------------------------------------------------------------------------------
# iCT exponential curriculum
# --------------------------------------------------------------------------------------------------
def ict_n64(k, big_k, s0, s1):
  stage_steps = math.floor(big_k / (math.log2(math.floor(s1 / s0)) + 1))
  return min(s0 * 2 ** math.floor(k / stage_steps), s1) + 1


def test_ict_num_points_hand_values():
  # K' = floor(800000 / (log2(1280/10) + 1)) = floor(800000 / 8) = 100000.
  n = lambda k: int(karras.ict_num_points(k, 800_000, 10, 1280))
  assert n(0) == 11
  assert n(99_999) == 11
  assert n(100_000) == 21
  assert n(199_999) == 21
  assert n(200_000) == 41
  assert n(699_999) == 641
  assert n(700_000) == 1281
  assert n(800_000) == 1281
  assert n(10 ** 9) == 1281  # far beyond K: capped, no int32 overflow.


def test_ict_num_points_full_sequence():
  ks = np.arange(0, 800_001, 500)
  got = np.asarray(jax.jit(lambda k: karras.ict_num_points(k, 800_000, 10, 1280))(ks))
  assert sorted(set(got.tolist())) == [11, 21, 41, 81, 161, 321, 641, 1281]
  assert np.all(np.diff(got) >= 0)
  np.testing.assert_array_equal(got, [ict_n64(int(k), 800_000, 10, 1280) for k in ks])


def test_ict_num_points_non_power_of_two_ratio():
  # s1/s0 = 15: K' = floor(800000 / (log2 15 + 1)) = floor(800000 / 4.906891) = 163036;
  # N: 11, 21, 41, 81, then min(160, 150) + 1 = 151 from k = 4 K' = 652144 on.
  big_k, s0, s1 = 800_000, 10, 150
  stage_steps = math.floor(big_k / (math.log2(15) + 1))
  assert stage_steps == 163036
  ks = np.concatenate([np.arange(0, big_k + 1, 997), [stage_steps - 1, stage_steps, 4 * stage_steps - 1,
                                                         4 * stage_steps, big_k, 5 * big_k]])
  got = np.asarray(jax.jit(lambda k: karras.ict_num_points(k, big_k, s0, s1))(ks))
  np.testing.assert_array_equal(got, [ict_n64(int(k), big_k, s0, s1) for k in ks])
  assert sorted(set(got.tolist())) == [11, 21, 41, 81, 151]
  assert int(karras.ict_num_points(4 * stage_steps - 1, big_k, s0, s1)) == 81
  assert int(karras.ict_num_points(4 * stage_steps, big_k, s0, s1)) == 151


def test_ict_num_points_default_config_constants():
  # configs/default.py: K = training.num_steps = 10000 -> K' = 10000 // 8 = 1250.
  n = lambda k: int(karras.ict_num_points(k, 10_000, 10, 1280))
  assert [n(k) for k in (0, 1249, 1250, 2500, 8749, 8750, 10_000)] == [11, 11, 21, 41, 641, 1281, 1281]


# --------------------------------------------------------------------------------------------------
# Noise-index distributions
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('n_points', [11, 1281])
def test_lognormal_index_probabilities_vs_float64(n_points):
  max_points = 1281
  logits = karras.lognormal_index_logits(n_points, max_points, EPS, T, RHO, P_MEAN, P_STD)
  assert logits.shape == (max_points - 1,)
  p = np.asarray(jax.nn.softmax(logits), np.float64)
  np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-6)
  assert np.all(p[n_points - 1:] == 0.0), 'indices n >= N-1 must have zero probability'
  assert np.all(np.isneginf(np.asarray(logits)[n_points - 1:]))
  want = lognormal_probs64(n_points)
  # float32 computes each bin mass as erf(a) - erf(b) of two O(1) numbers: absolute error ~1e-7. For N = 11
  # (masses >= 4e-3) that is rtol 1e-4; on the N = 1281 grid (masses 2e-5 .. 2e-3) it is up to ~5e-3
  # relative in the thinnest top bins, hence the atol.
  np.testing.assert_allclose(p[:n_points - 1], want, rtol=1e-4, atol=3e-7)
  bulk = want > 0.1 * want.max()
  np.testing.assert_allclose(p[:n_points - 1][bulk], want[bulk], rtol=1e-4 if n_points < 100 else 1e-3)
  np.testing.assert_allclose(np.cumsum(p[:n_points - 1]), np.cumsum(want), atol=1e-5)


def test_lognormal_index_hand_check_n11():
  # N = 11 grid (float64, rounded): 0.002, 0.0167, 0.0851, 0.3183, 0.9654, 2.5152, 5.839, 12.38, 24.41,
  # 45.31, 80. P(n <= 4) = P(eps < sigma < 2.5152 | eps < sigma < T) with ln sigma ~ N(-1.1, 2^2):
  # Phi((ln 2.5152 + 1.1)/2) = Phi(1.0112) = 0.8440, Phi((ln 0.002 + 1.1)/2) = Phi(-2.5573) = 0.00528,
  # Phi((ln 80 + 1.1)/2) = Phi(2.7410) = 0.99694; (0.8440 - 0.00528) / (0.99694 - 0.00528) = 0.8458.
  p = np.asarray(jax.nn.softmax(karras.lognormal_index_logits(11, 11, EPS, T, RHO, P_MEAN, P_STD)))
  g = grid64(11)
  phi = lambda v: 0.5 * (1 + math.erf(v / math.sqrt(2)))
  lo, hi = phi((math.log(EPS) + 1.1) / 2), phi((math.log(T) + 1.1) / 2)
  np.testing.assert_allclose(p[:5].sum(), (phi((math.log(g[5]) + 1.1) / 2) - lo) / (hi - lo), rtol=1e-5)
  np.testing.assert_allclose(p[:5].sum(), 0.8458, atol=2e-4)


def test_lognormal_index_mode():
  # In u = sigma^(1/7) the Karras grid is uniform, and d(ln sigma)/du = 7/u = 7 sigma^(-1/7); so the mass
  # per bin ~ N(ln sigma; Pm, Ps^2) * sigma^(-1/7). Maximising -(l - Pm)^2/(2 Ps^2) - l/7 over l = ln sigma:
  # l* = Pm - Ps^2/7 = -1.1 - 4/7 = -1.6714, sigma* = exp(l*) = 0.188. (Not exp(Pm) = 0.333: the Karras grid
  # is denser in ln sigma at large sigma.) On the fine N = 1281 grid the argmax bin must straddle sigma*.
  p = np.asarray(jax.nn.softmax(karras.lognormal_index_logits(1281, 1281, EPS, T, RHO, P_MEAN, P_STD)))
  n_star = int(np.argmax(p))
  g = grid64(1281)
  sigma_star = math.exp(P_MEAN - P_STD ** 2 / RHO)
  assert g[n_star - 1] <= sigma_star <= g[n_star + 2], (g[n_star], sigma_star)
  assert 0.15 < g[n_star] < 0.25
  # Sign check: a positive P_mean (a known port bug) moves the mode far up.
  p_bad = np.asarray(jax.nn.softmax(karras.lognormal_index_logits(1281, 1281, EPS, T, RHO, 1.1, P_STD)))
  assert g[int(np.argmax(p_bad))] > 1.0


def test_lognormal_index_traced_n():
  # Traced N inside jit (N changes with the step in the compiled train step).
  f = jax.jit(lambda n: jax.nn.softmax(karras.lognormal_index_logits(n, 41, EPS, T, RHO, P_MEAN, P_STD)))
  p = np.asarray(f(jnp.int32(21)))
  np.testing.assert_allclose(p[:20], lognormal_probs64(21), rtol=1e-4, atol=1e-7)
  assert np.all(p[20:] == 0)


@pytest.mark.parametrize('n_points', [2, 11, 151])
def test_uniform_index_logits(n_points):
  p = np.asarray(jax.nn.softmax(karras.uniform_index_logits(n_points, 151)))
  assert p.shape == (150,)
  np.testing.assert_allclose(p[:n_points - 1], 1.0 / (n_points - 1), rtol=1e-6)
  assert np.all(p[n_points - 1:] == 0)


# --------------------------------------------------------------------------------------------------
# Distances and weights
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('dim,want', [(28 * 28, 0.01512), (32 * 32, 0.01728), (32 * 32 * 3, 0.029929),
                                      (64 * 64 * 3, 0.059860)])
def test_pseudo_huber_constant(dim, want):
  # 0.00054 * 28 = 0.01512; * 32 = 0.01728; sqrt(3072) = 55.4256 -> 0.029930; sqrt(12288) = 110.851 -> 0.059860.
  c = karras.pseudo_huber_constant(dim)
  np.testing.assert_allclose(c, want, rtol=1e-4)
  np.testing.assert_allclose(c, 0.00054 * math.sqrt(dim), rtol=1e-12)
  assert round(c, 4) == {784: 0.0151, 1024: 0.0173, 3072: 0.0299, 12288: 0.0599}[dim]


def test_pseudo_huber_is_per_sample_not_per_pixel():
  # Sample 0: difference (3, 4, 0, 0) -> ||d|| = 5; sample 1: all zeros; sample 2: (0.01 everywhere).
  c = 0.1
  a = np.zeros((3, 2, 2, 1), np.float32)
  b = np.zeros((3, 2, 2, 1), np.float32)
  a[0, 0, 0, 0], a[0, 0, 1, 0] = 3.0, 4.0
  a[2] = 0.01
  got = np.asarray(karras.pseudo_huber_distance(jnp.asarray(a), jnp.asarray(b), c))
  assert got.shape == (3,)
  # sqrt(25 + 0.01) - 0.1 = 5.000999900 - 0.1 = 4.900999900; sqrt(0 + 0.01) - 0.1 = 0;
  # ||d||^2 = 4 * 1e-4 = 4e-4: sqrt(4e-4 + 1e-2) - 0.1 = sqrt(0.0104) - 0.1 = 0.00198039.
  np.testing.assert_allclose(got, [4.9009999, 0.0, 0.00198039], rtol=1e-5, atol=1e-7)
  # The per-pixel variant sum_i (sqrt(d_i^2 + c^2) - c) is a different number for sample 0:
  per_pixel = (math.sqrt(9 + c * c) - c) + (math.sqrt(16 + c * c) - c)  # = 6.80 (+2 zero pixels)
  assert abs(got[0] - per_pixel) > 1.0
  # ... and the per-pixel mean would be smaller still.
  assert abs(got[0] - per_pixel / 4) > 1.0


def test_pseudo_huber_vs_float64_random():
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=(5, 4, 4, 3)), rng.normal(size=(5, 4, 4, 3))
  c = karras.pseudo_huber_constant(48)
  want = np.sqrt(np.sum((a - b) ** 2, axis=(1, 2, 3)) + c * c) - c
  got = karras.pseudo_huber_distance(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), c)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def test_l2_l1_are_per_sample_means():
  rng = np.random.default_rng(4)
  a, b = rng.normal(size=(3, 2, 5, 2)), rng.normal(size=(3, 2, 5, 2))
  aj, bj = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  l2 = np.asarray(karras.l2_distance(aj, bj))
  l1 = np.asarray(karras.l1_distance(aj, bj))
  assert l2.shape == l1.shape == (3,)
  np.testing.assert_allclose(l2, ((a - b) ** 2).reshape(3, -1).mean(1), rtol=1e-5)
  np.testing.assert_allclose(l1, np.abs(a - b).reshape(3, -1).mean(1), rtol=1e-5)
  # Hand value: difference 2 on one of 4 pixels -> l2 = 4/4 = 1, l1 = 2/4 = 0.5.
  x = jnp.zeros((1, 2, 2, 1)).at[0, 1, 1, 0].set(2.0)
  assert float(karras.l2_distance(x, jnp.zeros_like(x))[0]) == 1.0
  assert float(karras.l1_distance(x, jnp.zeros_like(x))[0]) == 0.5


def test_inverse_delta_weight_on_fine_grid_near_eps():
  # N = 1281: the first gap is ~3.9e-5, so lambda ~ 25585 (float64); float32 sigmas keep ~1e-4 relative.
  g32 = karras.karras_grid(1281, EPS, T, RHO)
  w = np.asarray(karras.inverse_delta_weight(g32[:-1], g32[1:]))
  w64 = 1.0 / np.diff(grid64(1281))
  np.testing.assert_allclose(w, w64, rtol=1e-3)
  np.testing.assert_allclose(w64[0], 25584.72, rtol=1e-5)
  # Through karras_sigma with integer indices, as the loss computes it.
  n = jnp.arange(10)
  w_idx = np.asarray(karras.inverse_delta_weight(karras.karras_sigma(n, 1281, EPS, T, RHO),
                                                 karras.karras_sigma(n + 1, 1281, EPS, T, RHO)))
  np.testing.assert_allclose(w_idx, w64[:10], rtol=1e-3)
  # Hand value: lambda(0.5, 1.0) = 2.
  assert float(karras.inverse_delta_weight(jnp.float32(0.5), jnp.float32(1.0))) == 2.0


# --------------------------------------------------------------------------------------------------
# EDM: loss weight, preconditioning with sigma_min = 0, training and sampling noise levels
# --------------------------------------------------------------------------------------------------
def test_l2_norm_distance_value_and_finite_gradient_at_zero():
  # ||a - b||_2 over the whole sample (not a pixel mean): difference (3, 4, 0, 0) -> 5; zeros -> 0.
  a = jnp.zeros((2, 2, 2, 1)).at[0, 0, 0, 0].set(3.0).at[0, 1, 1, 0].set(4.0)
  got = np.asarray(karras.l2_norm_distance(a, jnp.zeros_like(a)))
  assert got.shape == (2,)
  np.testing.assert_allclose(got, [5.0, 0.0], atol=1e-18)
  rng = np.random.default_rng(5)
  x, y = rng.normal(size=(3, 4, 4, 2)), rng.normal(size=(3, 4, 4, 2))
  want = np.sqrt(np.sum((x - y) ** 2, axis=(1, 2, 3)))
  got = karras.l2_norm_distance(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
  # d||d||/dd = d/||d|| is 0/0 at d = 0; the clamp makes the gradient finite there (a student equal to its
  # target must not poison the update with NaN).
  g = jax.grad(lambda v: karras.l2_norm_distance(v, jnp.zeros_like(v)).sum())(jnp.zeros((1, 2, 2, 1)))
  g = np.asarray(g)
  assert np.all(np.isfinite(g))


@pytest.mark.parametrize('sd', [0.5, 1.0])
def test_edm_weight_values(sd):
  # At sigma = sigma_data: (sd^2 + sd^2) / (sd^2)^2 = 2 / sd^2 (= 8 for sd = 0.5, 2 for sd = 1).
  np.testing.assert_allclose(float(karras.edm_weight(jnp.float32(sd), sd)), 2.0 / sd ** 2, rtol=1e-6)
  s = np.array([0.002, 0.05, 0.5, 2.52, 80.0])
  want = (s ** 2 + sd ** 2) / (s * sd) ** 2
  np.testing.assert_allclose(np.asarray(karras.edm_weight(jnp.asarray(s, jnp.float32), sd)), want, rtol=1e-5)
  # EDM's weight is 1 / c_out^2 of the EDM preconditioning (eps = 0): c_out^2 = s^2 sd^2 / (s^2 + sd^2).
  c_out = np.asarray(karras.c_out(jnp.asarray(s, jnp.float32), sd, 0.0), np.float64)
  np.testing.assert_allclose(np.asarray(karras.edm_weight(jnp.asarray(s, jnp.float32), sd)), 1 / c_out ** 2,
                             rtol=1e-5)
  # Small sigma: ~ 1/sigma^2 (0.002 -> 250004 for sd = 0.5); large sigma: -> 1/sd^2 (80 -> 4.000156).
  if sd == 0.5:
    np.testing.assert_allclose(want[[0, -1]], [250004.0, 4.000156], rtol=1e-6)


def test_precondition_edm_with_sigma_min_zero_linear_net():
  """EDM denoiser D = c_skip x + c_out F(c_in x): with F(u) = w u, D = (c_skip + c_out c_in w) x, where
  (EDM table 1) c_skip = sd^2/(s^2 + sd^2), c_out = s sd/sqrt(s^2 + sd^2), c_in = 1/sqrt(s^2 + sd^2)."""
  w = 0.6
  s = np.array([0.01, 0.5, 3.0, 80.0])
  x = np.random.default_rng(2).normal(size=(4, 2, 2, 1))
  xj, sj = jnp.asarray(x, jnp.float32), jnp.asarray(s, jnp.float32)
  out = np.asarray(karras.precondition(lambda u, c: w * u, xj, sj, sigma_data=SD, sigma_min=0.0))
  c_skip = SD ** 2 / (s ** 2 + SD ** 2)
  c_out = s * SD / np.sqrt(s ** 2 + SD ** 2)
  c_in = 1 / np.sqrt(s ** 2 + SD ** 2)
  want = (c_skip + c_out * c_in * w)[:, None, None, None] * x
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-7)
  # At s = sd: c_skip = 1/2, c_out c_in = sd^2/(2 sd^2) = 1/2 -> D = (1 + w)/2 x = 0.8 x.
  np.testing.assert_allclose(out[1], 0.8 * x[1], rtol=1e-5)
  # The consistency parameterisation (eps = 0.002) is a different function (the test can tell them apart).
  cm = np.asarray(karras.precondition(lambda u, c: w * u, xj, sj, sigma_data=SD, sigma_min=EPS))
  assert np.max(np.abs(cm[0] - out[0])) > 1e-3 * np.max(np.abs(x[0]))


def edm_sigmas64(num_steps, sigma_min, sigma_max, rho):
  """EDM eq. 5 (descending): t_i = (T^(1/rho) + i/(N-1) (eps^(1/rho) - T^(1/rho)))^rho, i < N; t_N = 0."""
  i = np.arange(num_steps, dtype=np.float64)
  t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
  return np.append(t, 0.0)


@pytest.mark.parametrize('num_steps', [2, 3, 18, 40])
def test_edm_sampling_sigmas(num_steps):
  got = karras.edm_sampling_sigmas(num_steps, EPS, T, RHO)
  assert got.shape == (num_steps + 1,)
  assert got[0] == T and got[-2] == EPS and got[-1] == 0.0  # the endpoints exactly, not rounded powers
  assert np.all(np.diff(got) < 0)
  np.testing.assert_allclose(got, edm_sigmas64(num_steps, EPS, T, RHO), rtol=1e-12)
  # It is the ascending CM grid reversed, plus the final 0.
  np.testing.assert_allclose(got[:-1][::-1], grid64(num_steps), rtol=1e-12)
  if num_steps == 3:  # the middle point, by hand as in test_karras_grid_hand_values
    np.testing.assert_allclose(got[1], 2.51522, rtol=1e-5)


def test_edm_sampling_sigmas_edge_cases():
  np.testing.assert_array_equal(karras.edm_sampling_sigmas(1, EPS, T, RHO), [T, 0.0])
  for bad in (0, -3):
    with pytest.raises(ValueError):
      karras.edm_sampling_sigmas(bad, EPS, T, RHO)


def test_edm_training_sigma_is_lognormal():
  # ln sigma ~ N(-1.2, 1.2^2): with 100k draws the sample mean has std 1.2/sqrt(1e5) = 0.0038 and the
  # sample std has std ~ 1.2/sqrt(2e5) = 0.0027; 0.02 is > 5 standard errors.
  sigma = np.asarray(karras.edm_training_sigma(jax.random.PRNGKey(0), 100_000, -1.2, 1.2), np.float64)
  assert sigma.shape == (100_000,) and np.all(sigma > 0)
  log_s = np.log(sigma)
  np.testing.assert_allclose(log_s.mean(), -1.2, atol=0.02)
  np.testing.assert_allclose(log_s.std(), 1.2, atol=0.02)
  # Median exp(-1.2) = 0.301 (half the draws below it).
  np.testing.assert_allclose(np.mean(sigma < math.exp(-1.2)), 0.5, atol=0.01)
  # Other parameters move it: ECT's (-1.1, 2.0).
  log_s2 = np.log(np.asarray(karras.edm_training_sigma(jax.random.PRNGKey(1), 100_000, -1.1, 2.0), np.float64))
  np.testing.assert_allclose([log_s2.mean(), log_s2.std()], [-1.1, 2.0], atol=0.03)


# --------------------------------------------------------------------------------------------------
# ECT r(t) schedule
# --------------------------------------------------------------------------------------------------
ECT_Q, ECT_K, ECT_B = 2.0, 8.0, 1.0


def ect_r64(t, stage, q=ECT_Q, k=ECT_K, b=ECT_B):
  """ECT (Geng et al. 2024): r = max(0, t (1 - q^-(stage+1) (1 + k sigmoid(-b t)))), float64."""
  t = np.asarray(t, np.float64)
  sigmoid_minus_bt = np.exp(-b * t) / (1 + np.exp(-b * t))  # t > 0: no overflow
  return np.maximum(t * (1 - q ** -(stage + 1.0) * (1 + k * sigmoid_minus_bt)), 0.0)


def test_ect_stage():
  # floor(k / stage_steps), also traced.
  steps = np.array([0, 1, 1999, 2000, 2001, 3999, 4000, 17_999, 18_000, 10 ** 9])
  want = steps // 2000
  np.testing.assert_array_equal(np.asarray(karras.ect_stage(steps, 2000)), want)
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda k: karras.ect_stage(k, 2000))(steps)), want)
  assert int(karras.ect_stage(7, 3)) == 2


@pytest.mark.parametrize('stage', range(9))
def test_ect_r_bounds_and_formula(stage):
  t = np.logspace(-3, 3, 61)
  r = np.asarray(karras.ect_r(jnp.asarray(t, jnp.float32), stage, ECT_Q, ECT_K, ECT_B), np.float64)
  t32 = np.asarray(jnp.asarray(t, jnp.float32), np.float64)
  assert np.all(r >= 0) and np.all(r < t32)
  want = ect_r64(t32, stage)
  # r = t * ratio with ratio computed in float32: absolute error ~1e-7 t (ratio can be near 0 at the clamp).
  assert np.all(np.abs(r - want) <= 1e-6 * t32), np.max(np.abs(r - want) / t32)
  # Where r > 0 the relative gap is exactly q^-(s+1) (1 + k sigmoid(-b t)) (float32 cancellation in t - r
  # is ~6e-8 / gap, gap >= 2^-9 at stage 8, hence rtol 1e-4).
  pos = want > 0
  gap = 2.0 ** -(stage + 1) * (1 + ECT_K * np.exp(-ECT_B * t32) / (1 + np.exp(-ECT_B * t32)))
  np.testing.assert_allclose(((t32 - r) / t32)[pos], gap[pos], rtol=1e-4)
  # Large t: sigmoid(-1000) = 0, so (t - r)/t -> q^-(s+1) exactly (2^-1 = 0.5 at stage 0).
  np.testing.assert_allclose((t32[-1] - r[-1]) / t32[-1], 2.0 ** -(stage + 1), rtol=1e-4)


def test_ect_r_clamps_to_zero_and_approaches_t():
  # Stage 0 at small t: 1 - (1/2)(1 + 8 * 1/2) = 1 - 2.5 < 0 -> clamped to 0 (never negative).
  # r = 0 exactly while 1 + 8 sigmoid(-t) >= 2, i.e. sigmoid(-t) >= 1/8, i.e. t <= ln 7 = 1.9459.
  t = jnp.asarray([1e-3, 0.1, 1.0, 1.9, 2.0, 10.0], jnp.float32)
  r0 = np.asarray(karras.ect_r(t, 0, ECT_Q, ECT_K, ECT_B))
  np.testing.assert_array_equal(r0[:4], 0.0)
  assert np.all(r0[4:] > 0)
  # Stage 1 (factor 1/4): r = 0 iff 1 + 8 sigmoid(-t) >= 4, i.e. t <= ln(5/3) = 0.5108.
  r1 = np.asarray(karras.ect_r(jnp.asarray([0.5, 0.52], jnp.float32), 1, ECT_Q, ECT_K, ECT_B))
  assert r1[0] == 0.0 and r1[1] > 0.0
  # r(t) increases with the stage, and (t - r)/t halves per stage once r > 0 at t = 50 (sigmoid(-50) ~ 2e-22).
  gaps = [float((50.0 - karras.ect_r(jnp.float32(50.0), s, ECT_Q, ECT_K, ECT_B)) / 50.0) for s in range(6)]
  np.testing.assert_allclose(gaps, [0.5 ** (s + 1) for s in range(6)], rtol=1e-5)
  # Traced stage (it is a function of the traced step inside the train step).
  f = jax.jit(lambda t, s: karras.ect_r(t, s, ECT_Q, ECT_K, ECT_B))
  np.testing.assert_allclose(np.asarray(f(t, jnp.int32(3))), ect_r64(np.asarray(t, np.float64), 3), rtol=1e-5)
