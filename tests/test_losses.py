"""Analytic tests for cm_jax.losses with tiny hand-written fake denoisers (no UNet).

Expected values are float64 numpy computations of the paper formulas (see
/work/shared/reference/consistency_models.md); where the loss draws random numbers, the test re-derives the
draws from the documented rng use (split into index / noise / dropout keys) and checks them against what the
fake denoiser actually received.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax import karras
from cm_jax import losses
from configs import default

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
def tanh_denoiser(params, x, sigma, dropout_rng=None):
  """Tiny linear-tanh network inside the library's preconditioning (as cm_jax.denoiser.Denoiser does)."""
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

  def recording(p, x, sigma, dropout_rng=None):
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


def _linear_denoiser(params, x, sigma, dropout_rng=None):
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


def _dropout_only_denoiser(params, x, sigma, dropout_rng=None):
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
