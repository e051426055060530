"""Analytic tests for cm_jax.core.losses with tiny hand-written fake denoisers (no UNet).

Expected values are float64 numpy computations of the paper formulas (see
/work/shared/reference/consistency_models.md); where the loss draws random numbers, the test re-derives the
draws from the documented rng use (split into index / noise / dropout keys) and checks them against what the
fake denoiser actually received.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax.configs import default
from cm_jax.core import karras
from cm_jax.core import losses
from cm_jax.core import sampling

EPS, T, RHO, SD = 0.002, 80.0, 7.0, 0.5
IMAGE_SHAPE = (4, 4, 1)
BATCH = 8  # one batch size everywhere, so op-by-op compilations are shared between tests


# --------------------------------------------------------------------------------------------------
# float64 references
# --------------------------------------------------------------------------------------------------
def grid64(n_points):
  i = np.arange(n_points, dtype=np.float64)
  lo, hi = EPS ** (1 / RHO), T ** (1 / RHO)
  return (lo + i / (n_points - 1) * (hi - lo)) ** RHO


def ict_n64(k, big_k, s0=10, s1=1280):
  stage_steps = math.floor(big_k / (math.log2(math.floor(s1 / s0)) + 1))
  return min(s0 * 2 ** math.floor(k / stage_steps), s1) + 1


def ct_n64(k, big_k, s0, s1):
  return int(math.ceil(math.sqrt(k / big_k * ((s1 + 1) ** 2 - s0 ** 2) + s0 ** 2) - 1) + 1)


def lognormal_probs64(n_points, p_mean=-1.1, p_std=2.0):
  e = np.array([math.erf((math.log(s) - p_mean) / (math.sqrt(2.0) * p_std)) for s in grid64(n_points)])
  mass = np.diff(e)
  return mass / mass.sum()


def fake_f64(params, x, sigma_b):
  """float64 f = c_skip x + c_out tanh(w c_in x + b c_noise), the paper's preconditioning."""
  s = np.asarray(sigma_b, np.float64)[:, None, None, None]
  c_skip = SD ** 2 / ((s - EPS) ** 2 + SD ** 2)
  c_out = SD * (s - EPS) / np.sqrt(SD ** 2 + s ** 2)
  c_in = 1 / np.sqrt(s ** 2 + SD ** 2)
  w, b = float(params['w']), float(params['b'])
  return c_skip * x + c_out * np.tanh(w * c_in * x + b * 0.25 * np.log(s))


# --------------------------------------------------------------------------------------------------
# Fake denoisers with the Denoiser call signature denoiser(params, x, sigma, dropout_rng)
# --------------------------------------------------------------------------------------------------
def tanh_denoiser(params, x, sigma, dropout_rng=None, labels_B=None):
  """Tiny linear-tanh network inside the library's preconditioning (as cm_jax.core.denoiser.Denoiser does)."""
  def net(x_in, c_noise):
    return jnp.tanh(params['w'] * x_in + params['b'] * c_noise[:, None, None, None])
  return karras.precondition(net, x, sigma, sigma_data=SD, sigma_min=EPS)


PARAMS = {'w': jnp.float32(0.8), 'b': jnp.float32(-0.3)}


def make_config(**loss_overrides):
  config = default.get_config()
  for key, value in loss_overrides.items():
    setattr(config.loss, key, value)
  return config


def make_x0(batch, seed=0, shape=IMAGE_SHAPE):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1.0, 1.0, (batch,) + shape), jnp.float32)


def replicate_draws(rng, settings, step, x0):
  """The loss's documented rng use: split(rng, 3) -> (index, noise, dropout); n ~ categorical, z ~ N(0, I)."""
  rng_index, rng_noise, rng_dropout = jax.random.split(rng, 3)
  num_points = int(settings.num_points(step))
  n = np.asarray(jax.random.categorical(rng_index, settings.index_logits(num_points), shape=(x0.shape[0],)))
  z = np.asarray(jax.random.normal(rng_noise, x0.shape, x0.dtype), np.float64)
  return num_points, n, z, rng_dropout


def run_loss_recorded(settings, x0, step, rng, params=PARAMS, target_params=None, denoiser=tanh_denoiser,
                      jit=False):
  """Runs the loss and returns (loss, metrics, calls): calls[i] = dict(x=, sigma=, rng=) are the inputs of
  the i-th denoiser call. Op by op by default: on CPU, compiling threefry costs seconds per new program,
  while op-by-op executables are cached across tests (all tests use the same shapes for that reason)."""
  calls = []

  def recording(p, x, sigma, dropout_rng=None, labels_B=None):
    calls.append(dict(x=x, sigma=sigma, rng=dropout_rng))
    return denoiser(p, x, sigma, dropout_rng)

  def fn(params, target_params, x0, step, rng):
    calls.clear()
    loss, metrics = losses.consistency_training_loss(params, target_params, x0, step, rng,
                                                     denoiser=recording, settings=settings)
    return loss, metrics, list(calls)

  loss, metrics, recorded = (jax.jit(fn) if jit else fn)(params, target_params, x0, jnp.int32(step), rng)
  return loss, metrics, jax.tree_util.tree_map(np.asarray, recorded)


def run_loss(*args, **kwargs):
  loss, metrics, _ = run_loss_recorded(*args, **kwargs)
  return loss, metrics


# --------------------------------------------------------------------------------------------------
# make_ct_settings
# --------------------------------------------------------------------------------------------------
def test_settings_default_config():
  s = losses.make_ct_settings(default.get_config(), (28, 28, 1))
  assert s.huber_c == pytest.approx(0.00054 * math.sqrt(28 * 28 * 1), rel=1e-12)
  assert s.huber_c == pytest.approx(0.01512, rel=1e-9)
  assert s.target_decay is None                      # iCT: stopgrad target, mu = 0.
  assert s.max_points == 1281
  assert (s.sigma_min, s.sigma_max, s.rho) == (EPS, T, RHO)
  # K = training.num_steps = 10000 (loss.total_steps is None) -> K' = floor(10000/8) = 1250.
  for k in (0, 1249, 1250, 3750, 8749, 8750, 10_000):
    assert int(s.num_points(k)) == ict_n64(k, 10_000)
  # Default distance is pseudo-Huber over the whole sample, default weight 1/(s_{n+1} - s_n).
  a = jnp.zeros((1, 28, 28, 1)).at[0, 0, 0, 0].set(3.0).at[0, 5, 5, 0].set(4.0)
  c = 0.00054 * 28
  np.testing.assert_allclose(float(s.distance(a, jnp.zeros_like(a))[0]), math.sqrt(25 + c * c) - c, rtol=1e-6)
  np.testing.assert_allclose(float(s.weight(jnp.float32(1.0), jnp.float32(1.25))), 4.0, rtol=1e-6)


def test_settings_total_steps_and_explicit_huber_c():
  config = make_config(total_steps=800_000, huber_c=0.03)
  s = losses.make_ct_settings(config, (32, 32, 3))
  assert s.huber_c == 0.03
  assert [int(s.num_points(k)) for k in (99_999, 100_000, 700_000)] == [11, 21, 1281]
  # Without an explicit c: 0.00054 sqrt(3072) = 0.02993.
  s2 = losses.make_ct_settings(make_config(), (32, 32, 3))
  assert s2.huber_c == pytest.approx(0.029929, rel=1e-4)


@pytest.mark.parametrize('variant', ['paper', 'official'])
def test_settings_ema_target_decay(variant):
  config = make_config(target='ema', mu_variant=variant)
  s = losses.make_ct_settings(config, IMAGE_SHAPE)
  assert s.target_decay is not None
  for k in (0, 1250, 5000, 9999, 10_000):
    n = ict_n64(k, 10_000)
    denom = n if variant == 'paper' else n - 1
    np.testing.assert_allclose(float(s.target_decay(k)), math.exp(10 * math.log(0.9) / denom), rtol=1e-6)


def test_settings_cm2023_adaptive_ema():
  # CM (2023) CIFAR recipe: adaptive N(k) with s0 = 2, s1 = 150, mu0 = 0.9, K = 800k.
  config = make_config(schedule='adaptive', s0=2, s1=150, total_steps=800_000, index_distribution='uniform',
                       distance='l2', weighting='uniform', target='ema', mu0=0.9, mu_variant='paper')
  s = losses.make_ct_settings(config, IMAGE_SHAPE)
  assert s.max_points == 151
  assert int(s.num_points(0)) == 2 and int(s.num_points(800_000)) == 151
  assert int(s.num_points(400_000)) == ct_n64(400_000, 800_000, 2, 150) == 107
  np.testing.assert_allclose(float(s.target_decay(0)), 0.9, rtol=1e-6)   # exp(2 ln 0.9 / 2)
  np.testing.assert_allclose(float(s.target_decay(400_000)), math.exp(2 * math.log(0.9) / 107), rtol=1e-6)
  config.loss.mu_variant = 'official'
  s = losses.make_ct_settings(config, IMAGE_SHAPE)
  np.testing.assert_allclose(float(s.target_decay(0)), 0.81, rtol=1e-6)  # exp(2 ln 0.9 / 1)
  p = np.asarray(jax.nn.softmax(s.index_logits(11)))
  np.testing.assert_allclose(p[:10], 0.1, rtol=1e-6)
  assert np.all(p[10:] == 0)
  np.testing.assert_array_equal(np.asarray(s.weight(jnp.ones(3), 2 * jnp.ones(3))), np.ones(3))


@pytest.mark.parametrize('field,bad', [('distance', 'foo'), ('schedule', 'linear'),
                                       ('index_distribution', 'normal'), ('weighting', 'snr'),
                                       ('target', 'polyak')])
def test_settings_bad_strings(field, bad):
  with pytest.raises(ValueError, match=f'loss.{field}'):
    losses.make_ct_settings(make_config(**{field: bad}), IMAGE_SHAPE)


def test_settings_bad_mu_variant_with_ema():
  with pytest.raises(ValueError, match='loss.mu_variant'):
    losses.make_ct_settings(make_config(target='ema', mu_variant='paperr'), IMAGE_SHAPE)


# --------------------------------------------------------------------------------------------------
# consistency_training_loss
# --------------------------------------------------------------------------------------------------
def test_constant_denoiser_gives_zero_loss():
  settings = losses.make_ct_settings(make_config(), IMAGE_SHAPE)
  zero = lambda params, x, sigma, dropout_rng=None: jnp.zeros_like(x)
  loss, metrics = run_loss(settings, make_x0(BATCH), 3000, jax.random.PRNGKey(1), denoiser=zero)
  assert float(loss) == 0.0
  for key in ('l2', 'l1', 'pseudo_huber'):
    assert float(metrics[key]) == 0.0


@pytest.mark.parametrize('distance', ['l2', 'pseudo_huber', 'l1'])
@pytest.mark.parametrize('step', [0, 2500])  # N = 11 and N = 41 with the default K = 10000.
def test_loss_value_inverse_delta_vs_float64(distance, step):
  """loss = mean_b d(f(x0 + s_{n+1} z, s_{n+1}), f(x0 + s_n z, s_n)) / (s_{n+1} - s_n), all in float64."""
  settings = losses.make_ct_settings(make_config(distance=distance, weighting='inverse_delta'), IMAGE_SHAPE)
  x0 = make_x0(BATCH, seed=2)
  rng = jax.random.PRNGKey(3)
  loss, metrics, log = run_loss_recorded(settings, x0, step, rng)

  num_points, n, z, rng_dropout = replicate_draws(rng, settings, step, x0)
  assert num_points == ict_n64(step, 10_000) == (11 if step == 0 else 41)
  assert np.all((n >= 0) & (n <= num_points - 2))
  g = grid64(num_points)
  s_lo, s_hi = g[n], g[n + 1]
  x0_64 = np.asarray(x0, np.float64)
  # What the fake network actually received: student first at s_{n+1}, then target at s_n, with the same z.
  assert len(log) == 2
  np.testing.assert_allclose(log[0]['sigma'], s_hi, rtol=1e-5)
  np.testing.assert_allclose(log[1]['sigma'], s_lo, rtol=1e-5)
  np.testing.assert_allclose(log[0]['x'], x0_64 + s_hi[:, None, None, None] * z, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(log[1]['x'], x0_64 + s_lo[:, None, None, None] * z, rtol=1e-5, atol=1e-5)

  student = fake_f64(PARAMS, x0_64 + s_hi[:, None, None, None] * z, s_hi)
  target = fake_f64(PARAMS, x0_64 + s_lo[:, None, None, None] * z, s_lo)
  diff = (student - target).reshape(len(n), -1)
  l2 = np.mean(diff ** 2, axis=1)
  l1 = np.mean(np.abs(diff), axis=1)
  c = 0.00054 * math.sqrt(np.prod(IMAGE_SHAPE))
  ph = np.sqrt(np.sum(diff ** 2, axis=1) + c * c) - c
  per_sample = {'l2': l2, 'l1': l1, 'pseudo_huber': ph}[distance]
  weight = 1.0 / (s_hi - s_lo)
  np.testing.assert_allclose(float(loss), np.mean(per_sample * weight), rtol=2e-4)
  np.testing.assert_allclose(float(metrics['l2']), l2.mean(), rtol=2e-4)
  np.testing.assert_allclose(float(metrics['l1']), l1.mean(), rtol=2e-4)
  np.testing.assert_allclose(float(metrics['pseudo_huber']), ph.mean(), rtol=2e-4)
  np.testing.assert_allclose(float(metrics['mean_sigma']), s_hi.mean(), rtol=1e-5)
  # The weight matters: the unweighted mean is a different number (the test can tell them apart).
  assert abs(np.mean(per_sample) - np.mean(per_sample * weight)) > 0.1 * np.mean(per_sample * weight)


def test_loss_uniform_weighting_is_plain_mean():
  settings = losses.make_ct_settings(make_config(distance='l2', weighting='uniform'), IMAGE_SHAPE)
  x0 = make_x0(BATCH, seed=4)
  rng = jax.random.PRNGKey(5)
  loss, metrics = run_loss(settings, x0, 0, rng)
  _, n, z, _ = replicate_draws(rng, settings, 0, x0)
  g = grid64(11)
  x0_64 = np.asarray(x0, np.float64)
  student = fake_f64(PARAMS, x0_64 + g[n + 1][:, None, None, None] * z, g[n + 1])
  target = fake_f64(PARAMS, x0_64 + g[n][:, None, None, None] * z, g[n])
  np.testing.assert_allclose(float(loss), np.mean((student - target) ** 2), rtol=2e-4)
  np.testing.assert_allclose(float(loss), float(metrics['l2']), rtol=1e-6)


def test_metrics_keys_and_num_points_under_jit():
  config = make_config(total_steps=800_000)
  settings = losses.make_ct_settings(config, IMAGE_SHAPE)
  x0 = make_x0(BATCH)
  # One compiled program for every step (the step is traced, as in the train step). An unsafe_rbg key keeps
  # the compile cheap on CPU (threefry takes seconds); the loss only splits and consumes the key.
  f = jax.jit(lambda k, r: losses.consistency_training_loss(PARAMS, None, x0, k, r, denoiser=tanh_denoiser,
                                                            settings=settings))
  for step in (0, 150_000, 799_999):
    loss, metrics = f(jnp.int32(step), jax.random.key(step, impl='unsafe_rbg'))
    assert {'loss', 'l2', 'l1', 'pseudo_huber', 'num_points'} <= set(metrics)
    assert int(metrics['num_points']) == int(settings.num_points(step)) == ict_n64(step, 800_000)
    assert float(metrics['loss']) == float(loss)
    assert np.isfinite(float(loss))


def _linear_denoiser(params, x, sigma, dropout_rng=None, labels_B=None):
  """F(x_in) = w x_in, so f = (c_skip + c_out c_in w) x: df/dw = c_out c_in x."""
  return karras.precondition(lambda x_in, c: params['w'] * x_in, x, sigma, sigma_data=SD, sigma_min=EPS)


def _linear_f64(w, x, s):
  s = s[:, None, None, None]
  c_skip = SD ** 2 / ((s - EPS) ** 2 + SD ** 2)
  c_out = SD * (s - EPS) / np.sqrt(SD ** 2 + s ** 2)
  c_in = 1 / np.sqrt(s ** 2 + SD ** 2)
  return (c_skip + c_out * c_in * w) * x, c_out * c_in * x


@pytest.mark.parametrize('w_target', [None, 0.2])
def test_gradient_flows_only_through_student(w_target):
  """L = mean_b lambda_b mean_pix (s - t)^2 with t = stopgrad: dL/dw = mean_b lambda_b mean_pix 2 (s - t) ds/dw.

  w_target None: target_params=None (iCT, target = stopgrad(online params)); else an EMA target with its own w.
  """
  settings = losses.make_ct_settings(make_config(distance='l2', weighting='inverse_delta'), IMAGE_SHAPE)
  x0 = make_x0(BATCH, seed=6)
  rng = jax.random.PRNGKey(7)
  step = 2500  # N = 41
  params = {'w': jnp.float32(0.7)}
  target_params = None if w_target is None else {'w': jnp.float32(w_target)}

  def loss_fn(p, tp):
    return losses.consistency_training_loss(p, tp, x0, step, rng, denoiser=_linear_denoiser,
                                            settings=settings)[0]

  if target_params is None:
    grad = jax.grad(loss_fn)(params, None)
  else:
    grad, target_grad = jax.grad(loss_fn, argnums=(0, 1))(params, target_params)
    assert float(target_grad['w']) == 0.0  # nothing flows into the target network either.

  num_points, n, z, _ = replicate_draws(rng, settings, step, x0)
  g = grid64(num_points)
  s_lo, s_hi = g[n], g[n + 1]
  x0_64 = np.asarray(x0, np.float64)
  w, wt = 0.7, (0.7 if w_target is None else w_target)
  student, dstudent = _linear_f64(w, x0_64 + s_hi[:, None, None, None] * z, s_hi)
  target, dtarget = _linear_f64(wt, x0_64 + s_lo[:, None, None, None] * z, s_lo)
  lam = (1 / (s_hi - s_lo))[:, None, None, None]
  want_loss = np.mean(lam * (student - target) ** 2)
  want_grad = np.mean(lam * 2 * (student - target) * dstudent)
  wrong_grad = np.mean(lam * 2 * (student - target) * (dstudent - dtarget))  # gradient through both branches.
  np.testing.assert_allclose(float(loss_fn(params, target_params)), want_loss, rtol=1e-3)
  np.testing.assert_allclose(float(grad['w']), want_grad, rtol=1e-3)
  assert abs(wrong_grad - want_grad) > 0.05 * abs(want_grad)  # the two hypotheses are distinguishable.


def test_target_params_copy_equals_none():
  settings = losses.make_ct_settings(make_config(), IMAGE_SHAPE)
  x0, rng = make_x0(BATCH, seed=8), jax.random.PRNGKey(9)
  copy = jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), PARAMS)
  loss_none, _ = run_loss(settings, x0, 1300, rng)
  loss_copy, _ = run_loss(settings, x0, 1300, rng, target_params=copy)
  assert float(loss_none) == float(loss_copy)
  # ... and a different target network changes the loss.
  other = {'w': jnp.float32(-0.5), 'b': jnp.float32(0.4)}
  loss_other, _ = run_loss(settings, x0, 1300, rng, target_params=other)
  assert float(loss_other) != float(loss_none)


def _dropout_only_denoiser(params, x, sigma, dropout_rng=None, labels_B=None):
  """Output depends only on the dropout key (stand-in for a dropout mask): student == target iff keys match."""
  assert dropout_rng is not None, 'the CT loss must run the network in training mode (with a dropout rng)'
  return jax.random.normal(dropout_rng, x.shape, x.dtype) + 0.0 * params['w']


def test_student_and_target_share_dropout_rng():
  settings = losses.make_ct_settings(make_config(distance='l2'), IMAGE_SHAPE)
  x0 = make_x0(BATCH)
  loss, metrics, log = run_loss_recorded(settings, x0, 0, jax.random.PRNGKey(11),
                                        denoiser=_dropout_only_denoiser)
  assert len(log) == 2
  np.testing.assert_array_equal(log[0]['rng'], log[1]['rng'])
  assert float(loss) == 0.0 and float(metrics['l2']) == 0.0
  # The dropout key changes with the step rng, and it is not the key of the noise z (independent streams).
  rng2 = jax.random.PRNGKey(13)
  _, _, log2 = run_loss_recorded(settings, x0, 0, rng2, denoiser=_dropout_only_denoiser)
  assert not np.array_equal(log2[0]['rng'], log[0]['rng'])
  z = (log2[0]['x'] - np.asarray(x0)) / log2[0]['sigma'][:, None, None, None]
  dropout_noise = np.asarray(jax.random.normal(log2[0]['rng'], x0.shape))
  assert not np.allclose(z, dropout_noise, atol=1e-2)


@pytest.mark.parametrize('distribution', ['lognormal', 'uniform'])
def test_noise_index_frequencies(distribution):
  """Over 20000 draws at N = 11 the pair index n follows the configured distribution (through the loss)."""
  settings = losses.make_ct_settings(make_config(index_distribution=distribution), (1, 1, 1))
  batch = 20_000
  x0 = jnp.zeros((batch, 1, 1, 1))
  _, _, log = run_loss_recorded(settings, x0, 0, jax.random.PRNGKey(21))
  g = grid64(11)
  s_hi, s_lo = log[0]['sigma'].astype(np.float64), log[1]['sigma'].astype(np.float64)
  n_hi = np.argmin(np.abs(np.log(s_hi)[:, None] - np.log(g)[None, :]), axis=1)
  np.testing.assert_allclose(s_hi, g[n_hi], rtol=1e-5)          # every sigma is a grid point ...
  np.testing.assert_allclose(s_lo, g[n_hi - 1], rtol=1e-5)      # ... and the target is the one below it.
  assert n_hi.min() >= 1 and n_hi.max() <= 10
  freq = np.bincount(n_hi - 1, minlength=10) / batch
  want = lognormal_probs64(11) if distribution == 'lognormal' else np.full(10, 0.1)
  # Binomial std <= sqrt(0.25 / 20000) = 0.0035; 0.015 is > 4 std.
  np.testing.assert_allclose(freq, want, atol=0.015)
  # Chi-square with 9 degrees of freedom: the 0.999 quantile is 27.9.
  chi2 = np.sum((freq - want) ** 2 / want) * batch
  assert chi2 < 27.9, chi2


# --------------------------------------------------------------------------------------------------
# Gaussian toy for distillation: data ~ N(GMU, GS0^2) per pixel has the exact EDM denoiser
# D(x, t) = GMU + GS0^2/(GS0^2 + t^2) (x - GMU), whose PF-ODE keeps (x_t - GMU)/sqrt(GS0^2 + t^2) constant; so
# the exact consistency function (boundary f(x, eps) = x) is f(x, t) = GMU + (x - GMU) sqrt(GS0^2 + eps^2) /
# sqrt(GS0^2 + t^2). The teacher and student below ignore the data x0: they define the ODE, not fit it.
# --------------------------------------------------------------------------------------------------
GMU, GS0 = 0.3, 0.5
TEACHER_PARAMS = {'mu': jnp.float32(GMU)}


def gaussian_teacher(teacher_params, x, sigma, labels_B=None):
  """Exact EDM denoiser of N(mu, GS0^2); mu comes from the params so that a gradient could reach them."""
  mu, s = teacher_params['mu'], sigma[:, None, None, None]
  return mu + GS0 ** 2 / (GS0 ** 2 + s ** 2) * (x - mu)


def gaussian_teacher64(x, t):
  return GMU + GS0 ** 2 / (GS0 ** 2 + t ** 2) * (x - GMU)


def consistency_fn(s0):
  """The exact consistency function of the N(GMU, s0^2) PF-ODE, as a Denoiser (params ignored)."""
  def f(params, x, sigma, dropout_rng=None, labels_B=None):
    del params, dropout_rng
    s = sigma[:, None, None, None]
    return GMU + (x - GMU) * (math.sqrt(s0 ** 2 + EPS ** 2) / jnp.sqrt(s0 ** 2 + s ** 2))
  return f


def consistency_fn64(x, t_b, s0=GS0):
  t = np.asarray(t_b, np.float64)[:, None, None, None]
  return GMU + (x - GMU) * math.sqrt(s0 ** 2 + EPS ** 2) / np.sqrt(s0 ** 2 + t ** 2)


def teacher_step64(x, t_b, s_b, solver):
  """EDM Algorithm 1, one step from t to s in float64 (per example)."""
  t, s = t_b[:, None, None, None], s_b[:, None, None, None]
  d = (x - gaussian_teacher64(x, t)) / t
  x_euler = x + (s - t) * d
  if solver == 'euler':
    return x_euler
  return x + (s - t) * 0.5 * (d + (x_euler - gaussian_teacher64(x_euler, s)) / s)


def cd_config(num_points=18, solver='heun', **loss_overrides):
  config = make_config(name='cd', schedule='fixed', num_points=num_points, **loss_overrides)
  config.teacher.solver = solver
  return config


def run_cd(settings, x0, rng, solver='heun', params=PARAMS, target_params=None, denoiser=tanh_denoiser,
           teacher_params=TEACHER_PARAMS, step=0):
  """CD loss op by op, recording the inputs of every student/target call and every teacher call."""
  student_calls, teacher_calls = [], []

  def rec_student(p, x, sigma, dropout_rng=None, labels_B=None):
    student_calls.append(dict(x=np.asarray(x, np.float64), sigma=np.asarray(sigma, np.float64)))
    return denoiser(p, x, sigma, dropout_rng)

  def rec_teacher(tp, x, sigma, labels_B=None):
    teacher_calls.append(dict(x=np.asarray(x, np.float64), sigma=np.asarray(sigma, np.float64)))
    return gaussian_teacher(tp, x, sigma)

  loss, metrics = losses.consistency_distillation_loss(
      params, target_params, x0, jnp.int32(step), rng, teacher_params, denoiser=rec_student,
      teacher=rec_teacher, ode_step_fn=sampling.ODE_SOLVERS[solver], settings=settings)
  return float(loss), metrics, student_calls, teacher_calls


def cd_loss64(settings, x0, rng, solver, student64, target64):
  """float64 CD with the same draws (step 0): per-sample l2 distance between student64(x_hi, s_{n+1}) and
  target64(x_hat, s_n), x_hat = one teacher step; the caller applies the weighting."""
  num_points, n, z, _ = replicate_draws(rng, settings, 0, x0)
  g = grid64(num_points)
  s_lo, s_hi = g[n], g[n + 1]
  x_hi = np.asarray(x0, np.float64) + s_hi[:, None, None, None] * z
  x_hat = teacher_step64(x_hi, s_hi, s_lo, solver)
  per_sample = np.mean((student64(x_hi, s_hi) - target64(x_hat, s_lo)) ** 2, axis=(1, 2, 3))
  return per_sample, s_lo, s_hi, x_hi, x_hat


# --------------------------------------------------------------------------------------------------
# consistency_distillation_loss
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('solver', ['heun', 'euler'])
def test_cd_loss_value_calls_and_inputs_vs_float64(solver):
  """CM eq. 7 with an EMA target: mean_b d(f_w(x + s_{n+1} z, s_{n+1}), f_target(x_hat, s_n)) / (s_{n+1} - s_n),
  x_hat = one teacher step from s_{n+1} to s_n. The teacher is called once (Euler) or twice (Heun) per example
  batch; the student network twice (student, then target at x_hat)."""
  config = cd_config(18, solver, distance='l2', weighting='inverse_delta')
  settings = losses.make_ct_settings(config, IMAGE_SHAPE)
  x0, rng = make_x0(BATCH, seed=30), jax.random.PRNGKey(31)
  target_params = {'w': jnp.float32(0.5), 'b': jnp.float32(0.1)}
  loss, metrics, student_calls, teacher_calls = run_cd(settings, x0, rng, solver, target_params=target_params)

  student64 = lambda x, s: fake_f64(PARAMS, x, s)
  target64 = lambda x, s: fake_f64(target_params, x, s)
  per_sample, s_lo, s_hi, x_hi, x_hat = cd_loss64(settings, x0, rng, solver, student64, target64)
  np.testing.assert_allclose(loss, np.mean(per_sample / (s_hi - s_lo)), rtol=2e-4)
  np.testing.assert_allclose(float(metrics['l2']), per_sample.mean(), rtol=2e-4)
  assert int(metrics['num_points']) == 18
  # Who was called with what.
  assert len(teacher_calls) == (2 if solver == 'heun' else 1)
  np.testing.assert_allclose(teacher_calls[0]['x'], x_hi, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(teacher_calls[0]['sigma'], s_hi, rtol=1e-5)
  if solver == 'heun':  # the corrector evaluates the teacher at the Euler point and the lower time
    np.testing.assert_allclose(teacher_calls[1]['x'], teacher_step64(x_hi, s_hi, s_lo, 'euler'),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(teacher_calls[1]['sigma'], s_lo, rtol=1e-5)
  assert len(student_calls) == 2
  np.testing.assert_allclose(student_calls[0]['x'], x_hi, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(student_calls[1]['x'], x_hat, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(student_calls[1]['sigma'], s_lo, rtol=1e-5)
  # The CT target x0 + s_n z is a different point (the test can tell CD from CT).
  x_ct = np.asarray(x0, np.float64) + s_lo[:, None, None, None] * (x_hi - np.asarray(x0, np.float64)) / s_hi[
      :, None, None, None]
  assert np.max(np.abs(x_ct - x_hat)) > 1e-2


def test_cd_exact_consistency_function_has_only_solver_error():
  """With the exact teacher and the exact consistency function as student (= target), the only residual is the
  Heun step's local error O(h^3): the loss is tiny, shrinks as the grid is refined (N = 18 -> 80), and matches
  the float64 value of that residual. A student consistent with another ODE (data std 1.0) is far off."""
  x0, rng = make_x0(BATCH, seed=32), jax.random.PRNGKey(33)
  exact, wrong = consistency_fn(GS0), consistency_fn(1.0)
  result = {}
  for n_points in (18, 80):
    settings = losses.make_ct_settings(cd_config(n_points, distance='l2', weighting='uniform'), IMAGE_SHAPE)
    loss, metrics, _, _ = run_cd(settings, x0, rng, 'heun', denoiser=exact)
    per_sample, *_ = cd_loss64(settings, x0, rng, 'heun', consistency_fn64, consistency_fn64)
    # float32 rounding of f (~1e-7) against differences of ~1e-3 (N = 18) and ~4e-5 (N = 80).
    np.testing.assert_allclose(loss, per_sample.mean(), rtol=1e-3 if n_points == 18 else 2e-2)
    wrong_loss, _, _, _ = run_cd(settings, x0, rng, 'heun', denoiser=wrong)
    result[n_points] = loss, wrong_loss
  (loss18, wrong18), (loss80, wrong80) = result[18], result[80]
  assert 0 < loss80 < loss18 / 100            # measured: 4.1e-5 vs 1.6e-9 (h^5-ish: l2 of an O(h^3) error)
  assert loss18 < 0.05 * wrong18 and loss80 < 1e-3 * wrong80  # measured wrong: 7.5e-3 and 1.7e-4


def test_cd_gradient_only_into_student():
  """Linear student F = w c_in x: dL/dw = mean_b lambda_b mean 2 (s - t) ds/dw; nothing reaches the EMA target's
  params or the teacher's (the teacher step and the target are under stop_gradient)."""
  settings = losses.make_ct_settings(cd_config(18, distance='l2', weighting='inverse_delta'), IMAGE_SHAPE)
  x0, rng = make_x0(BATCH, seed=34), jax.random.PRNGKey(35)
  params, target_params = {'w': jnp.float32(0.7)}, {'w': jnp.float32(0.4)}

  def loss_fn(p, tp, teacher_p):
    return losses.consistency_distillation_loss(p, tp, x0, jnp.int32(0), rng, teacher_p,
                                                denoiser=_linear_denoiser, teacher=gaussian_teacher,
                                                ode_step_fn=sampling.heun_step, settings=settings)[0]

  grad, target_grad, teacher_grad = jax.grad(loss_fn, argnums=(0, 1, 2))(params, target_params, TEACHER_PARAMS)
  assert float(target_grad['w']) == 0.0
  assert float(teacher_grad['mu']) == 0.0
  num_points, n, z, _ = replicate_draws(rng, settings, 0, x0)
  g = grid64(num_points)
  s_lo, s_hi = g[n], g[n + 1]
  x_hi = np.asarray(x0, np.float64) + s_hi[:, None, None, None] * z
  student, dstudent = _linear_f64(0.7, x_hi, s_hi)
  target, _ = _linear_f64(0.4, teacher_step64(x_hi, s_hi, s_lo, 'heun'), s_lo)
  lam = (1 / (s_hi - s_lo))[:, None, None, None]
  np.testing.assert_allclose(float(grad['w']), np.mean(lam * 2 * (student - target) * dstudent), rtol=1e-3)
  # The zero teacher gradient is the stop_gradient's doing: without it x_hat depends on mu.
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  step_mu = lambda mu: jnp.sum(sampling.ode_step(functools.partial(gaussian_teacher, {'mu': mu}), f32(x_hi),
                                                 f32(s_hi), f32(s_lo), 'heun'))
  assert abs(float(jax.grad(step_mu)(jnp.float32(GMU)))) > 1e-3


# --------------------------------------------------------------------------------------------------
# edm_loss
# --------------------------------------------------------------------------------------------------
def edm_tanh_denoiser(params, x, sigma, dropout_rng=None, labels_B=None):
  """The tanh toy network inside the EDM preconditioning (sigma_min = 0)."""
  def net(x_in, c_noise):
    return jnp.tanh(params['w'] * x_in + params['b'] * c_noise[:, None, None, None])
  return karras.precondition(net, x, sigma, sigma_data=SD, sigma_min=0.0)


def edm_f64(params, x, sigma_b):
  """EDM table 1: c_skip = sd^2/(s^2 + sd^2), c_out = s sd/sqrt(s^2 + sd^2), c_in = 1/sqrt(s^2 + sd^2)."""
  s = np.asarray(sigma_b, np.float64)[:, None, None, None]
  c_skip, c_out = SD ** 2 / (s ** 2 + SD ** 2), s * SD / np.sqrt(s ** 2 + SD ** 2)
  c_in = 1 / np.sqrt(s ** 2 + SD ** 2)
  return c_skip * x + c_out * np.tanh(float(params['w']) * c_in * x + float(params['b']) * 0.25 * np.log(s))


def test_edm_loss_value_vs_float64():
  """EDM: ln sigma ~ N(-1.2, 1.2^2), loss = mean_b (s^2 + sd^2)/(s sd)^2 mean_pix (D(x0 + s z, s) - x0)^2.
  Built through make_loss (loss.name = 'edm'), so the config's edm_p_mean/edm_p_std/sigma_data are used."""
  objective = losses.make_loss(make_config(name='edm'), IMAGE_SHAPE, edm_tanh_denoiser)
  assert objective.target_decay is None
  x0, rng = make_x0(BATCH, seed=40), jax.random.PRNGKey(41)
  loss, metrics = objective.loss_fn(PARAMS, None, x0, jnp.int32(0), rng, None)
  rng_sigma, rng_noise, _ = jax.random.split(rng, 3)
  sigma = np.exp(-1.2 + 1.2 * np.asarray(jax.random.normal(rng_sigma, (BATCH,)), np.float64))
  z = np.asarray(jax.random.normal(rng_noise, x0.shape), np.float64)
  x0_64 = np.asarray(x0, np.float64)
  mse = np.mean((edm_f64(PARAMS, x0_64 + sigma[:, None, None, None] * z, sigma) - x0_64) ** 2, axis=(1, 2, 3))
  weight = (sigma ** 2 + SD ** 2) / (sigma * SD) ** 2
  np.testing.assert_allclose(float(loss), np.mean(weight * mse), rtol=2e-4)
  np.testing.assert_allclose(float(metrics['l2']), mse.mean(), rtol=2e-4)
  np.testing.assert_allclose(float(metrics['mean_sigma']), sigma.mean(), rtol=1e-5)
  assert abs(np.mean(weight * mse) - mse.mean()) > 0.1 * mse.mean()  # the weighting is visible


def test_edm_loss_zero_for_exact_denoiser_of_point_mass():
  # Data = one constant image c: E[x0 | x_t] = c at every sigma, so a denoiser returning c has loss exactly 0.
  c = 0.37
  x0 = jnp.full((BATCH,) + IMAGE_SHAPE, c, jnp.float32)
  exact = lambda params, x, sigma, dropout_rng=None, labels_B=None: jnp.full_like(x, c)
  loss, metrics = losses.edm_loss(PARAMS, None, x0, 0, jax.random.PRNGKey(42), denoiser=exact, p_mean=-1.2,
                                  p_std=1.2, sigma_data=SD)
  assert float(loss) == 0.0 and float(metrics['l2']) == 0.0
  off = lambda params, x, sigma, dropout_rng=None, labels_B=None: jnp.full_like(x, c + 0.1)
  loss_off, _ = losses.edm_loss(PARAMS, None, x0, 0, jax.random.PRNGKey(42), denoiser=off, p_mean=-1.2,
                                p_std=1.2, sigma_data=SD)
  assert float(loss_off) > 0.01 * 4  # weight >= 1/sd^2 = 4, squared error 0.01


def test_edm_loss_of_exact_gaussian_denoiser_is_one():
  """For data ~ N(mu, sd^2) the exact denoiser's error D - x0 has the posterior variance sd^2 s^2/(sd^2 + s^2),
  and the EDM weight (s^2 + sd^2)/(s sd)^2 is exactly its inverse: every weighted pixel term has expectation 1
  at every sigma (the weighting's purpose). 2048 x 16 chi^2_1 terms: std of the mean 0.008; tolerance 0.05."""
  data = np.random.default_rng(43).normal(GMU, SD, size=(2048,) + IMAGE_SHAPE)
  def exact(params, x, sigma, dropout_rng=None, labels_B=None):
    return GMU + SD ** 2 / (SD ** 2 + sigma[:, None, None, None] ** 2) * (x - GMU)
  loss, _ = losses.edm_loss(None, None, jnp.asarray(data, jnp.float32), 0, jax.random.PRNGKey(44),
                            denoiser=exact, p_mean=-1.2, p_std=1.2, sigma_data=SD)
  np.testing.assert_allclose(float(loss), 1.0, atol=0.05)


# --------------------------------------------------------------------------------------------------
# easy_consistency_tuning_loss
# --------------------------------------------------------------------------------------------------
def ect_r64(t, stage, q=2.0, k=8.0, b=1.0):
  """ECT (Geng et al. 2024): r = max(0, t (1 - q^-(stage+1) (1 + k sigmoid(-b t)))), float64."""
  return np.maximum(t * (1 - q ** -(stage + 1.0) * (1 + k * np.exp(-b * t) / (1 + np.exp(-b * t)))), 0.0)


def replicate_ect_draws(rng, x0, stage, p_mean=-1.1, p_std=2.0):
  """The ECT loss's documented rng use: split(rng, 3) -> (t, noise, dropout); ln t ~ N(p_mean, p_std^2)."""
  rng_t, rng_noise, rng_dropout = jax.random.split(rng, 3)
  t = np.exp(p_mean + p_std * np.asarray(jax.random.normal(rng_t, (x0.shape[0],)), np.float64))
  z = np.asarray(jax.random.normal(rng_noise, x0.shape, x0.dtype), np.float64)
  return t, ect_r64(t, stage), z, rng_dropout


def run_ect(settings, x0, step, rng, params=PARAMS, denoiser=tanh_denoiser):
  calls = []

  def recording(p, x, sigma, dropout_rng=None, labels_B=None):
    calls.append(dict(x=np.asarray(x, np.float64), sigma=np.asarray(sigma, np.float64),
                      rng=np.asarray(dropout_rng)))
    return denoiser(p, x, sigma, dropout_rng)

  loss, metrics = losses.easy_consistency_tuning_loss(params, None, x0, jnp.int32(step), rng,
                                                      denoiser=recording, settings=settings)
  return float(loss), metrics, calls


def test_ect_target_is_clean_image_where_r_is_zero():
  """A zero denoiser: where r = 0 the target is x0 itself, so the sample's distance is ||x0||_2; where r > 0 the
  target is the (zero) network output, distance 0. loss = mean_b [r_b = 0] ||x0_b|| / t_b ('inverse_delta':
  1/(t - r) with r = 0). Stage 1 (step 2000 of 2000-step stages): r = 0 iff t <= ln(5/3) = 0.51."""
  settings = losses.make_ect_settings(make_config(name='ect', distance='l2_norm', weighting='inverse_delta'),
                                      IMAGE_SHAPE)
  x0, rng = make_x0(BATCH, seed=50), jax.random.PRNGKey(51)
  zero = lambda params, x, sigma, dropout_rng=None: jnp.zeros_like(x)
  loss, metrics, calls = run_ect(settings, x0, 2000, rng, denoiser=zero)
  t, r, z, rng_dropout = replicate_ect_draws(rng, x0, stage=1)
  at_zero = r == 0
  assert 0 < at_zero.sum() < BATCH, at_zero  # this rng gives both cases
  norms = np.sqrt(np.sum(np.asarray(x0, np.float64) ** 2, axis=(1, 2, 3)))
  np.testing.assert_allclose(loss, np.mean(np.where(at_zero, norms / t, 0.0)), rtol=1e-5)
  np.testing.assert_allclose(float(metrics['fraction_r_zero']), at_zero.mean(), rtol=1e-6)
  assert int(metrics['stage']) == 1
  # The network never sees sigma = 0 (ln 0 in c_noise): where r = 0 it is evaluated at t instead, unused.
  assert len(calls) == 2
  np.testing.assert_allclose(calls[0]['sigma'], t, rtol=1e-5)
  np.testing.assert_allclose(calls[1]['sigma'], np.where(at_zero, t, r), rtol=1e-5)
  assert np.all(calls[1]['sigma'] > 0)
  # Student and target share z and the dropout key.
  np.testing.assert_allclose(calls[0]['x'], np.asarray(x0, np.float64) + t[:, None, None, None] * z, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_array_equal(calls[0]['rng'], calls[1]['rng'])
  np.testing.assert_array_equal(calls[0]['rng'], np.asarray(rng_dropout))


@pytest.mark.parametrize('distance,weighting', [('l2_norm', 'inverse_delta'), ('pseudo_huber', 'edm')])
@pytest.mark.parametrize('step', [0, 2000, 9000])  # stages 0, 1, 4
def test_ect_loss_value_vs_float64(distance, weighting, step):
  """loss = mean_b w(r, t) d(f(x0 + t z, t), stopgrad f(x0 + r z, r)) (f(., 0) := x0), all in float64:
  w = 1/(t - r) or EDM's (t^2 + sd^2)/(t sd)^2; d = ||.||_2 or iCT pseudo-Huber over the sample."""
  config = make_config(name='ect', distance=distance, weighting=weighting)
  settings = losses.make_ect_settings(config, IMAGE_SHAPE)
  assert (settings.q, settings.k, settings.b, settings.stage_steps) == (2.0, 8.0, 1.0, 2000)
  x0, rng = make_x0(BATCH, seed=52), jax.random.PRNGKey(53)
  loss, metrics, _ = run_ect(settings, x0, step, rng)
  stage = step // 2000
  t, r, z, _ = replicate_ect_draws(rng, x0, stage)
  x0_64 = np.asarray(x0, np.float64)
  student = fake_f64(PARAMS, x0_64 + t[:, None, None, None] * z, t)
  r_safe = np.where(r > 0, r, t)
  target_net = fake_f64(PARAMS, x0_64 + r_safe[:, None, None, None] * z, r_safe)
  target = np.where((r > 0)[:, None, None, None], target_net, x0_64)
  sq = np.sum((student - target) ** 2, axis=(1, 2, 3))
  c = 0.00054 * math.sqrt(np.prod(IMAGE_SHAPE))
  d = np.sqrt(sq) if distance == 'l2_norm' else np.sqrt(sq + c * c) - c
  w = 1 / (t - r) if weighting == 'inverse_delta' else (t ** 2 + SD ** 2) / (t * SD) ** 2
  np.testing.assert_allclose(loss, np.mean(w * d), rtol=5e-4)
  assert int(metrics['stage']) == stage
  np.testing.assert_allclose(float(metrics['mean_gap_ratio']), np.mean((t - r) / t), rtol=1e-4)
  np.testing.assert_allclose(float(metrics['fraction_r_zero']), np.mean(r == 0), rtol=1e-6)
  np.testing.assert_allclose(float(metrics['l2']), np.mean(sq / np.prod(IMAGE_SHAPE)), rtol=5e-4)


def test_ect_gradient_only_through_student():
  """Linear student, ||.||_2 distance: dL/dw = mean_b w_b (s_b - t_b) . ds_b/dw / ||s_b - t_b||, the target held
  fixed; the gradient through both branches is a different number."""
  settings = losses.make_ect_settings(make_config(name='ect', distance='l2_norm', weighting='inverse_delta'),
                                      IMAGE_SHAPE)
  x0, rng, step = make_x0(BATCH, seed=54), jax.random.PRNGKey(55), 6000  # stage 3: every r > 0 (t > 0)
  params = {'w': jnp.float32(0.7)}
  grad = jax.grad(lambda p: losses.easy_consistency_tuning_loss(
      p, None, x0, jnp.int32(step), rng, denoiser=_linear_denoiser, settings=settings)[0])(params)
  t, r, z, _ = replicate_ect_draws(rng, x0, stage=3)
  assert np.all(r > 0)
  x0_64 = np.asarray(x0, np.float64)
  student, dstudent = _linear_f64(0.7, x0_64 + t[:, None, None, None] * z, t)
  target, dtarget = _linear_f64(0.7, x0_64 + r[:, None, None, None] * z, r)
  diff = student - target
  norm = np.sqrt(np.sum(diff ** 2, axis=(1, 2, 3)))
  w = 1 / (t - r)
  want = np.mean(w * np.sum(diff * dstudent, axis=(1, 2, 3)) / norm)
  wrong = np.mean(w * np.sum(diff * (dstudent - dtarget), axis=(1, 2, 3)) / norm)
  np.testing.assert_allclose(float(grad['w']), want, rtol=1e-3)
  assert abs(wrong - want) > 0.05 * abs(want)


# --------------------------------------------------------------------------------------------------
# make_loss / make_ct_settings: dispatch and the new config values
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', ['ct', 'edm', 'ect', 'cd'])
def test_make_loss_builds_each_objective(name):
  config = make_config(name=name)
  teacher = gaussian_teacher if name == 'cd' else None
  objective = losses.make_loss(config, IMAGE_SHAPE, tanh_denoiser, teacher=teacher)
  assert objective.target_decay is None  # default loss.target = 'stopgrad'; 'edm'/'ect' never have a target
  teacher_params = TEACHER_PARAMS if name == 'cd' else None
  loss, metrics = objective.loss_fn(PARAMS, None, make_x0(BATCH), jnp.int32(0), jax.random.PRNGKey(60),
                                    teacher_params)
  assert np.isfinite(float(loss)) and float(loss) > 0 and float(metrics['loss']) == float(loss)
  want_key = {'ct': 'num_points', 'cd': 'num_points', 'edm': 'mean_sigma', 'ect': 'stage'}[name]
  assert want_key in metrics
  # An EMA target gives a decay for 'ct'/'cd'; 'edm'/'ect' ignore loss.target.
  config.loss.target = 'ema'
  ema = losses.make_loss(config, IMAGE_SHAPE, tanh_denoiser, teacher=teacher)
  assert (ema.target_decay is not None) == (name in ('ct', 'cd'))


def test_make_loss_cd_needs_teacher_and_valid_solver():
  with pytest.raises(ValueError, match='teacher.workdir'):
    losses.make_loss(make_config(name='cd'), IMAGE_SHAPE, tanh_denoiser)
  config = make_config(name='cd')
  config.teacher.solver = 'rk4'
  with pytest.raises(ValueError, match='teacher.solver'):
    losses.make_loss(config, IMAGE_SHAPE, tanh_denoiser, teacher=gaussian_teacher)


@pytest.mark.parametrize('solver,calls', [('heun', 2), ('euler', 1)])
def test_make_loss_passes_teacher_solver_to_the_cd_loss(solver, calls):
  """config.teacher.solver reaches the loss: the teacher is called twice per step (Heun) or once (Euler)."""
  teacher_calls = []

  def counting_teacher(tp, x, sigma, labels_B=None):
    teacher_calls.append(sigma)
    return gaussian_teacher(tp, x, sigma)

  loss = losses.make_loss(cd_config(18, solver), IMAGE_SHAPE, tanh_denoiser, teacher=counting_teacher)
  loss.loss_fn(PARAMS, None, make_x0(4), jnp.int32(0), jax.random.PRNGKey(0), TEACHER_PARAMS)
  assert len(teacher_calls) == calls


def test_make_loss_bad_name():
  with pytest.raises(ValueError, match='loss.name'):
    losses.make_loss(make_config(name='diffusion'), IMAGE_SHAPE, tanh_denoiser)


@pytest.mark.parametrize('n_points', [2, 18])
def test_fixed_schedule(n_points):
  """schedule 'fixed': N = loss.num_points at every step, the index range is n in {0, ..., N-2}."""
  settings = losses.make_ct_settings(make_config(schedule='fixed', num_points=n_points), IMAGE_SHAPE)
  assert settings.max_points == n_points
  for step in (0, 5000, 10 ** 7):
    assert int(settings.num_points(step)) == n_points
  p = np.asarray(jax.nn.softmax(settings.index_logits(settings.num_points(0))))
  assert p.shape == (n_points - 1,)
  np.testing.assert_allclose(p, lognormal_probs64(n_points), rtol=1e-4, atol=1e-7)
  _, metrics = run_loss(settings, make_x0(BATCH), 777, jax.random.PRNGKey(61))
  assert int(metrics['num_points']) == n_points


def test_mu_variant_constant():
  # 'constant': mu(k) = mu0 at every step whatever N(k) (CM's ImageNet/LSUN CD uses 0.95).
  settings = losses.make_ct_settings(make_config(target='ema', mu_variant='constant', mu0=0.95), IMAGE_SHAPE)
  for step in (0, 1250, 9999, 10 ** 6):
    np.testing.assert_allclose(float(settings.target_decay(step)), 0.95, rtol=1e-7)
  # 'paper' with the same mu0 moves with N (exp(10 ln 0.95 / 11) != 0.95): the variants are distinguishable.
  paper = losses.make_ct_settings(make_config(target='ema', mu_variant='paper', mu0=0.95), IMAGE_SHAPE)
  assert abs(float(paper.target_decay(0)) - 0.95) > 1e-3


def test_edm_weighting_is_edm_weight_of_higher_sigma():
  """weighting 'edm': w(lo, hi) = (hi^2 + sd^2)/(hi sd)^2, independent of lo (CT/CD: s_{n+1}; ECT: t)."""
  settings = losses.make_ct_settings(make_config(weighting='edm'), IMAGE_SHAPE)
  lo, hi = np.array([0.002, 0.3, 1.0, 40.0]), np.array([0.01, 0.5, 2.0, 80.0])
  got = np.asarray(settings.weight(jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32)))
  np.testing.assert_allclose(got, (hi ** 2 + SD ** 2) / (hi * SD) ** 2, rtol=1e-5)
  np.testing.assert_allclose(got, np.asarray(karras.edm_weight(jnp.asarray(hi, jnp.float32), SD)), rtol=1e-7)
  np.testing.assert_allclose(got[1], 8.0, rtol=1e-6)  # hi = sd = 0.5: 2/sd^2
  # It uses sigma_data from config.consistency.
  config = make_config(weighting='edm')
  config.consistency.sigma_data = 1.0
  other = losses.make_ct_settings(config, IMAGE_SHAPE)
  np.testing.assert_allclose(float(other.weight(jnp.float32(0.1), jnp.float32(1.0))), 2.0, rtol=1e-6)


def test_l2_norm_distance_setting():
  settings = losses.make_ct_settings(make_config(distance='l2_norm'), IMAGE_SHAPE)
  a = jnp.zeros((1,) + IMAGE_SHAPE).at[0, 0, 0, 0].set(3.0).at[0, 1, 2, 0].set(4.0)
  np.testing.assert_allclose(float(settings.distance(a, jnp.zeros_like(a))[0]), 5.0, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# Class labels reach every network call
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', ['ct', 'cd', 'edm', 'ect'])
def test_labels_reach_student_target_and_teacher(name):
  """A class-conditional model sees the batch's labels in every call: student, target and (CD) teacher."""
  config = make_config(name=name, **({'schedule': 'fixed'} if name == 'cd' else {}))
  seen = []

  def recording(p, x, sigma, dropout_rng=None, labels_B=None):
    seen.append(('network', None if labels_B is None else np.asarray(labels_B)))
    return tanh_denoiser(p, x, sigma, dropout_rng)

  def teacher(tp, x, sigma, labels_B=None):
    seen.append(('teacher', None if labels_B is None else np.asarray(labels_B)))
    return gaussian_teacher(tp, x, sigma)

  objective = losses.make_loss(config, IMAGE_SHAPE, recording, teacher=teacher if name == 'cd' else None)
  labels = jnp.arange(BATCH, dtype=jnp.int32) % 3
  objective.loss_fn(PARAMS, None, make_x0(BATCH), jnp.int32(0), jax.random.PRNGKey(0),
                    TEACHER_PARAMS if name == 'cd' else None, labels)
  kinds = [kind for kind, _ in seen]
  assert kinds.count('network') == (1 if name == 'edm' else 2)
  assert kinds.count('teacher') == (2 if name == 'cd' else 0)  # Heun: two teacher calls.
  for _, got in seen:
    np.testing.assert_array_equal(got, np.asarray(labels))


# --------------------------------------------------------------------------------------------------
# ECT trains unshifted and samples shifted (locuslab/ect ECMPrecond)
# --------------------------------------------------------------------------------------------------
def test_ect_trains_with_the_unshifted_preconditioning_and_samples_with_the_shift():
  from cm_jax.configs import test as test_config  # pylint: disable=g-import-not-at-top
  from cm_jax.core import denoiser as denoiser_lib  # pylint: disable=g-import-not-at-top
  ect = test_config.get_config('ect')
  eps = ect.consistency.sigma_min
  trained, sampled = denoiser_lib.make_denoiser(ect, training=True), denoiser_lib.make_denoiser(ect)
  assert (trained.sigma_min, sampled.sigma_min) == (0.0, eps)
  # At initialisation (the teacher's weights) the trained student is the teacher's EDM denoiser exactly, at
  # every sigma, including below eps where the shifted form's c_out turns negative.
  edm = test_config.get_config('edm')
  teacher = denoiser_lib.make_denoiser(edm, training=True)
  params = teacher.model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,)))['params']
  params = jax.tree.map(lambda p: p + 0.05, params)
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 28, 28, 1))
  sigma = jnp.array([0.001, 0.01, 3.0])
  np.testing.assert_array_equal(trained(params, x, sigma), teacher(params, x, sigma))
  assert float(jnp.max(jnp.abs(sampled(params, x, sigma) - teacher(params, x, sigma)))) > 1e-4
  # The loss of the trainer is bound to the unshifted form; sampling (make_denoiser) keeps f(x, eps) = x.
  np.testing.assert_array_equal(sampled(params, x, jnp.full((3,), eps)), x)
  # The other consistency losses train what they sample.
  for name in ('ct', 'cd', 'sct', 'scd'):
    config = test_config.get_config(name)
    assert (denoiser_lib.make_denoiser(config, training=True).sigma_min
            == denoiser_lib.make_denoiser(config).sigma_min)
