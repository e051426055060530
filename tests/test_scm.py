"""Continuous-time consistency models (cm_jax/core/scm.py) against closed-form oracles.

Gaussian data x0 ~ N(0, s^2) per dimension in TrigFlow time (x_t = cos t x0 + sin t z, z ~ N(0, sd^2)):
x_t ~ N(0, v_t) with v_t = cos^2 t s^2 + sin^2 t sd^2, the probability-flow velocity is
dx_t/dt = E[cos t z - sin t x0 | x_t] = cos t sin t (sd^2 - s^2) x_t / v_t, the consistency function
f*(x_t, t) = x_t s / sqrt(v_t) and the denoiser (in EDM variables x = x_t / cos t, sigma = sd tan t)
D*(x, sigma) = s^2 x / (s^2 + sigma^2).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cm_jax import models
from cm_jax.configs import test as test_config
from cm_jax.core import denoiser as denoiser_lib
from cm_jax.core import karras
from cm_jax.core import losses
from cm_jax.core import scm
from cm_jax.core.denoiser import Denoiser

SD = 0.5


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def variance(t, s, sd=SD):
  return jnp.cos(t) ** 2 * s**2 + jnp.sin(t) ** 2 * sd**2


def pf_velocity(x_t, t, s, sd=SD):
  t = t.reshape((-1,) + (1,) * (x_t.ndim - 1))
  return jnp.cos(t) * jnp.sin(t) * (sd**2 - s**2) * x_t / variance(t, s, sd)


def oracle_f(x_t, t, s, sd=SD):
  t = t.reshape((-1,) + (1,) * (x_t.ndim - 1))
  return x_t * s / jnp.sqrt(variance(t, s, sd))


def oracle_F(x_t, t, s, sd=SD):
  """TrigFlow's F* from f = cos t x_t - sd sin t F."""
  tb = t.reshape((-1,) + (1,) * (x_t.ndim - 1))
  return (jnp.cos(tb) * x_t - oracle_f(x_t, t, s, sd)) / (sd * jnp.sin(tb))


class OracleNet(nn.Module):
  """cm_jax's raw network F_edm(x_in, c_noise) of the Gaussian oracle: the consistency function (kind
  'consistency', plus `scale` times a probe direction with a trainable coefficient) or the EDM denoiser D*
  ('denoiser'). phi(c_noise) = 0.3 sin(c_noise) stands in for a learned adaptive weight."""
  s: float
  kind: str = 'consistency'
  probe: float = 0.0

  @nn.compact
  def __call__(self, x_in, c_noise, labels_B=None, train=False, return_adaptive_weight=False):
    a = self.param('a', nn.initializers.zeros, ())
    sigma = jnp.exp(4.0 * c_noise)
    t = jnp.arctan2(sigma, SD)
    x_t = SD * x_in
    if self.kind == 'consistency':
      F_trig = oracle_F(x_t, t, self.s) + (self.probe + a) * jnp.tanh(x_in) * c_noise.reshape(-1, 1, 1, 1)
      out = -F_trig
    else:  # EDM: D = c_skip x + c_out F_edm with x = x_t / cos t, eps = 0.
      x = x_t / jnp.cos(t).reshape(-1, 1, 1, 1)
      sig = sigma.reshape(-1, 1, 1, 1)
      d_star = self.s**2 * x / (self.s**2 + sig**2)
      out = (d_star - karras.c_skip(sig, SD, 0.0) * x) / karras.c_out(sig, SD, 0.0)
    return (out, 0.3 * jnp.sin(c_noise)) if return_adaptive_weight else out


def settings(**overrides):
  kw = dict(sigma_data=SD, p_mean=-1.0, p_std=1.4, warmup_steps=0, tangent_c=0.1, adaptive_weight=True)
  kw.update(overrides)
  return scm.SCMSettings(**kw)


# --------------------------------------------------------------------------------------------------
# The change of variables
# --------------------------------------------------------------------------------------------------
def test_edm_preconditioning_at_sigma_min_zero_is_trigflow(x64):
  t = np.linspace(0.01, 1.56, 50)
  sigma = SD * np.tan(t)
  np.testing.assert_allclose(karras.c_skip(sigma, SD, 0.0), np.cos(t) ** 2, rtol=1e-12)
  np.testing.assert_allclose(karras.c_out(sigma, SD, 0.0), SD * np.sin(t), rtol=1e-12)
  np.testing.assert_allclose(karras.c_in(sigma, SD) * (1.0 / np.cos(t)), 1.0 / SD, rtol=1e-12)  # c_in x = x_t / sd
  np.testing.assert_allclose(scm.trig_time(sigma, SD), t, rtol=1e-12)


def test_edm_denoiser_of_the_unet_is_the_trigflow_consistency_function():
  config = test_config.get_config('sct')
  model = models.create_model(config.model)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,)))['params']
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
  den = Denoiser(model, sigma_data=SD, sigma_min=0.0)
  t = jnp.array([0.05, 0.4, 0.9, 1.3, 1.55])
  x_t = jax.random.normal(jax.random.PRNGKey(2), (5, 28, 28, 1))
  net = lambda x_in, c: model.apply({'params': params}, x_in, c)
  via_edm = den(params, x_t / jnp.cos(t)[:, None, None, None], SD * jnp.tan(t))
  via_trig = scm.consistency_fn(scm.trig_net(net, x_t, t, SD), x_t, t, SD)
  np.testing.assert_allclose(via_edm, via_trig, atol=2e-5)
  # The boundary is sigma = 0, unshifted: f(x, sigma) -> x as sigma -> 0 (c_skip = 1 - O(sigma^2), c_out = O(sigma)).
  np.testing.assert_allclose(den(params, x_t, jnp.full(5, 1e-6)), x_t, atol=1e-5)


def test_sct_and_scd_runs_sample_and_edit_unshifted():
  for name in ('sct', 'scd'):
    config = test_config.get_config(name)
    assert denoiser_lib.make_denoiser(config).sigma_min == 0.0
    assert denoiser_lib.boundary(config) == 0.0
  ct = test_config.get_config('ct')
  assert denoiser_lib.boundary(ct) == ct.consistency.sigma_min == denoiser_lib.make_denoiser(ct).sigma_min


# --------------------------------------------------------------------------------------------------
# The tangent
# --------------------------------------------------------------------------------------------------
def _cos_sin_dF_dt(F_fn, x_t, t, v):
  """cos t sin t dF/dt along (dx_t/dt = v, dt = 1), by jax.jvp of F(x_t, t)."""
  _, dF = jax.jvp(F_fn, (x_t, t), (v, jnp.ones_like(t)))
  return (jnp.cos(t) * jnp.sin(t)).reshape(-1, 1, 1, 1) * dF


def test_tangent_is_cos_t_times_the_time_derivative_of_f(x64):
  def F(x_t, t):  # Any smooth network.
    return jnp.tanh(x_t) * jnp.sin(3.0 * t).reshape(-1, 1, 1, 1) + 0.3 * x_t**2

  key = jax.random.PRNGKey(0)
  x_t = jax.random.normal(key, (6, 2, 2, 1), jnp.float64)
  t = jnp.linspace(0.1, 1.5, 6)
  v = jax.random.normal(jax.random.PRNGKey(1), x_t.shape, jnp.float64)
  g = scm.tangent(F(x_t, t), _cos_sin_dF_dt(F, x_t, t, v), x_t, v, t, SD, warmup=1.0)
  _, df_dt = jax.jvp(lambda x, tt: scm.consistency_fn(F(x, tt), x, tt, SD), (x_t, t), (v, jnp.ones_like(t)))
  np.testing.assert_allclose(g, jnp.cos(t).reshape(-1, 1, 1, 1) * df_dt, rtol=1e-12, atol=1e-12)
  # Warm-up scales only the part with the network's time derivative and x_t.
  g0 = scm.tangent(F(x_t, t), _cos_sin_dF_dt(F, x_t, t, v), x_t, v, t, SD, warmup=0.0)
  cos2 = (jnp.cos(t) ** 2).reshape(-1, 1, 1, 1)
  np.testing.assert_allclose(g0, -cos2 * (SD * F(x_t, t) - v), rtol=1e-12)


@pytest.mark.parametrize('s', [0.3, 0.5, 0.9])
def test_tangent_vanishes_at_the_gaussian_consistency_function(x64, s):
  x_t = jax.random.normal(jax.random.PRNGKey(0), (8, 3, 3, 1), jnp.float64)
  t = jnp.linspace(0.02, 1.56, 8)
  v = pf_velocity(x_t, t, s)
  F = functools.partial(oracle_F, s=s)
  g = scm.tangent(F(x_t, t), _cos_sin_dF_dt(F, x_t, t, v), x_t, v, t, SD, warmup=1.0)
  assert float(jnp.max(jnp.abs(g))) < 1e-13
  # A wrong consistency function (the oracle of another data std) has a clearly non-zero tangent.
  F_wrong = functools.partial(oracle_F, s=1.3 * s)
  g_wrong = scm.tangent(F_wrong(x_t, t), _cos_sin_dF_dt(F_wrong, x_t, t, v), x_t, v, t, SD, warmup=1.0)
  assert float(jnp.max(jnp.abs(g_wrong))) > 1e-3


def test_normalize_tangent():
  g = jnp.full((2, 4, 4, 1), 3.0).at[1].set(0.0)
  out = scm.normalize_tangent(g, 0.1)
  np.testing.assert_allclose(out[0], 3.0 / (3.0 + 0.1), rtol=1e-6)  # rms 3, c 0.1.
  np.testing.assert_array_equal(out[1], 0.0)


def test_tangent_warmup():
  assert float(scm.tangent_warmup(0, 10)) == 0.0
  assert float(scm.tangent_warmup(5, 10)) == 0.5
  assert float(scm.tangent_warmup(25, 10)) == 1.0
  assert float(scm.tangent_warmup(0, 0)) == 1.0


# --------------------------------------------------------------------------------------------------
# The loss, end to end, with oracle networks
# --------------------------------------------------------------------------------------------------
def _oracle_loss(s, teacher=False, probe=0.0, **kw):
  student = Denoiser(OracleNet(s, 'consistency', probe), sigma_data=SD, sigma_min=0.0)
  teacher_den = Denoiser(OracleNet(s, 'denoiser'), sigma_data=SD, sigma_min=0.0) if teacher else None
  return functools.partial(scm.scm_loss, denoiser=student, settings=settings(**kw), teacher=teacher_den)


def test_scd_teacher_velocity_is_the_probability_flow(x64):
  """sd F_teacher for the exact denoiser D* is the Gaussian's probability-flow velocity."""
  s = 0.7
  teacher = OracleNet(s, 'denoiser')
  x_t = jax.random.normal(jax.random.PRNGKey(0), (6, 2, 2, 1), jnp.float64)
  t = jnp.linspace(0.05, 1.5, 6)
  c_noise = 0.25 * jnp.log(SD * jnp.tan(t))
  velocity = -SD * teacher.apply({'params': {'a': 0.0}}, x_t / SD, c_noise)
  np.testing.assert_allclose(velocity, pf_velocity(x_t, t, s), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('s', [0.3, 0.8])
def test_scd_with_the_exact_teacher_and_student_has_zero_tangent(x64, s):
  loss_fn = _oracle_loss(s, teacher=True)
  x0 = s * jax.random.normal(jax.random.PRNGKey(0), (64, 2, 2, 2), jnp.float64)
  _, metrics = loss_fn({'a': jnp.zeros(())}, None, x0, 10, jax.random.PRNGKey(1), {'a': jnp.zeros(())})
  assert float(metrics['tangent_rms']) < 1e-12
  assert float(metrics['l2']) < 1e-24  # g = 0 and F_theta - F^- = 0: nothing to learn.
  # The same student against data (sCT) sees a non-zero single-sample tangent: its mean vanishes, not each draw.
  _, ct_metrics = _oracle_loss(s)({'a': jnp.zeros(())}, None, x0, 10, jax.random.PRNGKey(1))
  assert float(ct_metrics['tangent_rms']) > 1e-3


def _mean_grad(loss_fn, s, num_batches=200, batch=128):
  def grad_of(key):
    k_data, k_loss = jax.random.split(key)
    x0 = s * jax.random.normal(k_data, (batch, 2, 2, 2), jnp.float64)
    return jax.grad(lambda p: loss_fn(p, None, x0, 10, k_loss)[0])({'a': jnp.zeros((), jnp.float64)})['a']
  grads = jax.jit(jax.vmap(grad_of))(jax.random.split(jax.random.PRNGKey(3), num_batches))
  return float(jnp.mean(grads)), float(jnp.std(grads) / np.sqrt(num_batches))


def test_sct_expected_gradient_vanishes_at_the_oracle_under_adaptive_weighting(x64):
  """At f*, E[g | x_t] = 0 and g | x_t is symmetric (Gaussian data), so the expected gradient in any direction of
  the network's parameters is 0 even after tangent normalisation and with a t-dependent weight e^-phi(t)."""
  s = 0.6
  mean, stderr = _mean_grad(_oracle_loss(s), s)
  assert abs(mean) < 4 * stderr, (mean, stderr)
  # Off the oracle the expected gradient is far from 0, and a descent step (a <- a - lr grad) moves the probe's
  # coefficient -0.3 + a back towards 0: the gradient is negative.
  mean_off, stderr_off = _mean_grad(_oracle_loss(s, probe=-0.3), s)
  assert mean_off < -10 * stderr_off and abs(mean_off) > 10 * abs(mean), (mean_off, stderr_off, mean)


# --------------------------------------------------------------------------------------------------
# The real network: jvp, dropout, precision
# --------------------------------------------------------------------------------------------------
def _unet(dropout=0.5, dtype=jnp.float32):
  config = test_config.get_config('sct')
  config.model.dropout = dropout
  model = models.create_model(config.model, dtype=dtype)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,)))['params']
  # Random weights everywhere (the output convolution starts at zero, which would make every derivative 0).
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  return model, params


def test_unet_jvp_agrees_with_central_differences_and_shares_the_dropout_mask():
  model, params = _unet(dropout=0.5)
  rng = jax.random.PRNGKey(7)
  x_in = jax.random.normal(jax.random.PRNGKey(2), (2, 28, 28, 1))
  c = jnp.array([-0.5, 0.3])
  v = jax.random.normal(jax.random.PRNGKey(3), x_in.shape)
  tc = jnp.full((2,), 0.25)

  def net(x, cn, key=rng):
    return model.apply({'params': params}, x, cn, train=True, rngs={'dropout': key})

  primal, tangent_out = jax.jvp(net, (x_in, c), (v, tc))
  np.testing.assert_allclose(primal, net(x_in, c), atol=1e-5)  # The jvp's primal is the student call: same mask.
  assert float(jnp.max(jnp.abs(primal - net(x_in, c, jax.random.PRNGKey(8))))) > 1e-3  # Another mask differs.
  h = 1e-2
  fd = (np.asarray(net(x_in + h * v, c + h * tc), np.float64) - np.asarray(net(x_in - h * v, c - h * tc),
                                                                            np.float64)) / (2 * h)
  err = np.linalg.norm(np.asarray(tangent_out, np.float64) - fd) / np.linalg.norm(fd)
  assert err < 1e-3, err  # float32 network: central differences carry ~1e-5 rounding and O(h^2) error.
  # Central differences through another dropout mask do not match: the mask is part of the function.
  fd_other = (np.asarray(net(x_in + h * v, c + h * tc, jax.random.PRNGKey(8)), np.float64)
              - np.asarray(net(x_in - h * v, c - h * tc, jax.random.PRNGKey(9)), np.float64)) / (2 * h)
  assert np.linalg.norm(np.asarray(tangent_out, np.float64) - fd_other) / np.linalg.norm(fd) > 1.0


def test_scm_loss_gradient_uses_the_students_dropout_mask_inside_the_jvp():
  """At tangent warm-up w = 0 the tangent is g = -cos^2 t (sd F^- - dx/dt), normalised, and the loss gradient is
  -2/D sum_i g_i dF_i/dtheta. With the student's dropout mask inside the jvp, F^- has the student's values, so
  scm_loss's gradient equals the gradient of a reference loss whose target is built from the student's own
  output. A jvp through another mask (dropout 0.5) gives a clearly different gradient."""
  model, params = _unet(dropout=0.5)
  den = Denoiser(model, sigma_data=SD, sigma_min=0.0)
  loss_fn = functools.partial(scm.scm_loss, denoiser=den, settings=settings(warmup_steps=10, adaptive_weight=False))
  x0 = jax.random.uniform(jax.random.PRNGKey(4), (3, 28, 28, 1), minval=-1.0, maxval=1.0)
  rng = jax.random.PRNGKey(5)
  grads = jax.grad(lambda p: loss_fn(p, None, x0, 0, rng)[0])(params)  # step 0: w = 0.

  rng_sigma, rng_noise, rng_dropout = jax.random.split(rng, 3)  # scm_loss's own split of its key.
  sigma = jnp.exp(-1.0 + 1.4 * jax.random.normal(rng_sigma, (3,)))
  t = scm.trig_time(sigma, SD).reshape(-1, 1, 1, 1)
  z = SD * jax.random.normal(rng_noise, x0.shape)
  x_t = jnp.cos(t) * x0 + jnp.sin(t) * z
  dx_dt = jnp.cos(t) * z - jnp.sin(t) * x0

  def reference_grads(target_key):
    def F(p, key):
      return -den.network(p, x_t / SD, 0.25 * jnp.log(sigma), key)

    g = scm.normalize_tangent(-jnp.cos(t) ** 2 * (SD * F(params, target_key) - dx_dt), 0.1)

    def loss(p):
      f = F(p, rng_dropout)
      return jnp.mean(karras.l2_distance(f - jax.lax.stop_gradient(f), g))

    return jax.grad(loss)(params)

  def rel_err(a, b):
    diff = jnp.sqrt(sum(jnp.sum(jnp.square(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))
    return float(diff / jnp.sqrt(sum(jnp.sum(jnp.square(y)) for y in jax.tree.leaves(b))))

  assert rel_err(grads, reference_grads(rng_dropout)) < 1e-4
  assert rel_err(grads, reference_grads(jax.random.PRNGKey(99))) > 0.05


def test_bfloat16_runs_the_jvp_tangent_and_loss_in_float32():
  config = test_config.get_config('sct')
  config.training.precision = 'bfloat16'
  den = denoiser_lib.make_denoiser(config)
  assert den.model.dtype == jnp.bfloat16
  assert den.in_float32().model.dtype == jnp.float32
  loss_fn = losses.make_loss(config, (28, 28, 1), den).loss_fn
  _, params = _unet(dropout=0.1)
  x0 = jax.random.uniform(jax.random.PRNGKey(0), (4, 28, 28, 1), minval=-1.0, maxval=1.0)
  jaxpr = jax.make_jaxpr(lambda p: loss_fn(p, None, x0, 3, jax.random.PRNGKey(1)))(params)
  loss, metrics = jax.jit(lambda p: loss_fn(p, None, x0, 3, jax.random.PRNGKey(1)))(params)
  assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
  assert all(v.dtype == jnp.float32 for k, v in metrics.items() if k != 'tangent_warmup')
  # The jvp's tangents flow through float32 convolutions only: every jvp-transformed conv is float32.
  text = str(jaxpr)
  assert 'bf16' in text  # The student call itself computes in bfloat16.
  # The loss value, g and phi come from the jvp, the data and the (float32) adaptive head only: a float32 run
  # of the same loss gives them to float32 rounding. A jvp in bf16 would differ by ~1e-2 (8-bit mantissa).
  config32 = test_config.get_config('sct')
  loss32 = losses.make_loss(config32, (28, 28, 1), denoiser_lib.make_denoiser(config32)).loss_fn
  _, metrics32 = jax.jit(lambda p: loss32(p, None, x0, 3, jax.random.PRNGKey(1)))(params)
  for key in ('loss', 'l2', 'tangent_rms', 'adaptive_weight'):
    np.testing.assert_allclose(metrics[key], metrics32[key], rtol=1e-5, atol=1e-7, err_msg=key)


# --------------------------------------------------------------------------------------------------
# A short training run on Gaussian data moves towards f*
# --------------------------------------------------------------------------------------------------
class LinearNet(nn.Module):
  """F_edm(x_in, c) = a(c) x_in with a(c) a small MLP of the noise input, plus an adaptive-weight head: the
  family that contains the Gaussian oracle (f* is linear in x_t at every t)."""

  @nn.compact
  def __call__(self, x_in, c_noise, labels_B=None, train=False, return_adaptive_weight=False):
    h = nn.tanh(nn.Dense(32)(jnp.stack([c_noise, jnp.sin(c_noise), jnp.cos(c_noise)], -1)))
    a = nn.Dense(1)(h)[:, 0]
    out = a.reshape(-1, 1, 1, 1) * x_in
    phi = nn.Dense(1, kernel_init=nn.initializers.zeros)(h)[:, 0]
    return (out, phi) if return_adaptive_weight else out


def test_short_gaussian_training_moves_towards_the_consistency_function():
  """400 Adam steps of sCT on N(0, 0.8^2) data (sd = 0.5, so f* is not the identity map of x_t): the mean squared
  error of f_theta against f* over t in [0.05, 1.55] falls by > 100x (0.149 -> ~5e-5 when this was written)."""
  s, steps = 0.8, 400
  model = LinearNet()
  den = Denoiser(model, sigma_data=SD, sigma_min=0.0)
  loss_fn = functools.partial(scm.scm_loss, denoiser=den, settings=settings(warmup_steps=50))
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 1)), jnp.zeros((1,)))['params']
  tx = optax.adam(optax.cosine_decay_schedule(1e-2, steps))
  opt = tx.init(params)

  t_eval = jnp.linspace(0.05, 1.55, 32)
  x_eval = jnp.sqrt(variance(t_eval, s)).reshape(-1, 1, 1, 1) * jax.random.normal(jax.random.PRNGKey(9),
                                                                                   (32, 4, 4, 1))

  def error(p):
    f = den(p, x_eval / jnp.cos(t_eval).reshape(-1, 1, 1, 1), SD * jnp.tan(t_eval))
    return float(jnp.mean(jnp.square(f - oracle_f(x_eval, t_eval, s))))

  @jax.jit
  def step(p, o, k, key):
    k_data, k_loss = jax.random.split(key)
    x0 = s * jax.random.normal(k_data, (256, 4, 4, 1))
    grads = jax.grad(lambda q: loss_fn(q, None, x0, k, k_loss)[0])(p)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o

  before = error(params)
  for k in range(steps):
    params, opt = step(params, opt, k, jax.random.PRNGKey(100 + k))
  after = error(params)
  assert after < 0.01 * before, (before, after)


def test_samplers_renoise_sct_runs_with_the_unshifted_boundary():
  from cm_jax import samplers  # pylint: disable=g-import-not-at-top
  config = test_config.get_config('sct')
  two = samplers.make_sampler(config, steps=2)
  assert two.sigma_min == 0.0  # x + sqrt(t^2 - 0^2) z: TrigFlow's re-noising x_t = cos t x0 + sin t z.
  assert samplers.make_sampler(test_config.get_config('ct'), steps=2).sigma_min == 0.002
  edm = samplers.make_sampler(test_config.get_config('edm'))
  assert edm.sigma_min == 0.002  # The EDM sampler's grid still ends at consistency.sigma_min.
