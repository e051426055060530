"""MeanFlow (cm_jax/core/meanflow.py) against closed-form oracles.

Gaussian data x ~ N(mu, s^2) per dimension on the linear path z_t = (1 - t) x + t e: z_t ~ N((1 - t) mu,
sigma_t^2) with sigma_t^2 = (1 - t)^2 s^2 + t^2; the probability-flow ODE keeps each point's standardised
coordinate, so z_r = (1 - r) mu + (sigma_r / sigma_t)(z_t - (1 - t) mu) and the average velocity is
u*(z_t, r, t) = (z_t - z_r) / (t - r); the marginal velocity is v*(z, t) = -mu + (t - (1 - t) s^2) / sigma_t^2
(z - (1 - t) mu).
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cm_jax import models
from cm_jax.configs import test as test_config
from cm_jax.core import meanflow as mf
import tiny_runs

MU, S = 0.3, 0.6


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def settings(**overrides):
  kw = dict(t_mean=-0.6, t_std=1.6, r_mean=-4.0, r_std=1.6, ratio_r_neq_t=0.75, order='min', norm_p=0.75,
            norm_c=1e-3)
  kw.update(overrides)
  return mf.MeanFlowSettings(**kw)


def _points(n=7, shape=(3, 2, 1), seed=0):
  """(z, r, t) with 0 < r < t < 1, in float64 under the x64 fixture (float32 otherwise)."""
  dtype = jnp.result_type(float)
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  t = jax.random.uniform(k1, (n,), dtype, 0.05, 0.98)
  r = t * jax.random.uniform(k2, (n,), dtype, 0.0, 0.95)
  z = jax.random.normal(k3, (n,) + shape, dtype)
  return z, r, t


# ------------------------------------------------------------------------------------ The oracle.
def test_the_oracle_flow_is_the_ode_of_the_marginal_velocity(x64):
  """d/dr z_r (from fixed z_t) equals v*(z_r, r): u* really is the ODE's average velocity."""
  z, r, t = _points()
  _, dz_dr = jax.jvp(lambda r_: mf.gaussian_flow(z, r_, t, MU, S), (r,), (jnp.ones_like(r),))
  np.testing.assert_allclose(dz_dr, mf.gaussian_velocity(mf.gaussian_flow(z, r, t, MU, S), r, MU, S), atol=1e-12)
  np.testing.assert_allclose(mf.gaussian_flow(z, t, t, MU, S), z, atol=1e-14)  # r = t: no move.
  # The marginal velocity is E[e - x | z_t] (Gaussian conditioning, by hand): cov(e - x, z_t) / var(z_t).
  tb = t[:, None, None, None]
  cov = tb - (1 - tb) * S**2
  expected = -MU + cov / ((1 - tb) ** 2 * S**2 + tb**2) * (z - (1 - tb) * MU)
  np.testing.assert_allclose(mf.gaussian_velocity(z, t, MU, S), expected, atol=1e-14)


def test_meanflow_target_with_the_marginal_velocity_is_the_average_velocity(x64):
  """The MeanFlow identity: v* - (t - r) du*/dt (total derivative along (v*, 0, 1)) == u*, to float64 precision."""
  z, r, t = _points()
  u_star = lambda z_, r_, t_: mf.gaussian_average_velocity(z_, r_, t_, MU, S)
  u, target = mf.meanflow_target(u_star, z, r, t, mf.gaussian_velocity(z, t, MU, S))
  np.testing.assert_allclose(target, u, rtol=1e-11, atol=1e-12)
  # A wrong tangent (the paper's ablation: (v, 1, 0) in (z, r, t)) does not satisfy it.
  _, wrong = jax.jvp(u_star, (z, r, t), (mf.gaussian_velocity(z, t, MU, S), jnp.ones_like(r), jnp.zeros_like(t)))
  wrong_target = mf.gaussian_velocity(z, t, MU, S) - (t - r)[:, None, None, None] * wrong
  assert float(jnp.max(jnp.abs(wrong_target - u))) > 1e-2


def test_r_equal_t_reduces_the_target_to_the_velocity(x64):
  z, _, t = _points()
  v = jax.random.normal(jax.random.PRNGKey(5), z.shape, jnp.float64)
  net = lambda z_, r_, t_: jnp.sin(z_) * (t_ + 2 * r_)[:, None, None, None]
  _, target = mf.meanflow_target(net, z, t, t, v)
  np.testing.assert_array_equal(target, v)  # Flow matching's regression target.


def test_one_step_with_the_oracle_gives_exact_gaussian_samples(x64):
  e = jax.random.normal(jax.random.PRNGKey(3), (4096, 2, 2, 1), jnp.float64)
  u_star = lambda z_, r_, t_: mf.gaussian_average_velocity(z_, r_, t_, MU, S)
  x = mf.sample(u_star, e, mf.uniform_times(1))
  np.testing.assert_allclose(x, MU + S * e, atol=1e-12)  # The exact transport of each noise draw.
  x3 = mf.sample(u_star, e, mf.uniform_times(3))  # Jumps compose: any grid lands on the same point.
  np.testing.assert_allclose(x3, x, atol=1e-12)
  assert mf.uniform_times(2) == [1.0, 0.5, 0.0]
  with pytest.raises(ValueError, match='descend'):
    mf.sample(u_star, e, [1.0, 0.2, 0.5, 0.0])


def test_expected_loss_gradient_vanishes_at_the_oracle(x64):
  """With u = u* + a * probe, the gradient of the expected MeanFlow loss in a is ~0 at a = 0 (the conditional
  velocity's noise averages out), and clearly not at a = 0.2, for the adaptive weighting of the paper (p = 0.75)
  and plain L2 (p = 0)."""

  class Net(nn.Module):
    @nn.compact
    def __call__(self, z, t, labels_B=None, train=False, c_noise2_B=None):
      a = self.param('a', nn.initializers.zeros, ())
      r = t - c_noise2_B
      probe = jnp.tanh(z) * (t - r)[:, None, None, None]
      return mf.gaussian_average_velocity(z, r, t, MU, S) + a * probe

  flow = mf.FlowMap(Net())
  x0 = MU + S * jax.random.normal(jax.random.PRNGKey(0), (200_000, 2, 1, 1), jnp.float64)
  for p in (0.75, 0.0):
    loss_fn = functools.partial(mf.meanflow_loss, flow=flow, settings=settings(norm_p=p, norm_c=1e-3))
    grad = lambda a: jax.grad(lambda prm: loss_fn(prm, None, x0, 0, jax.random.PRNGKey(1))[0])({'a': a})['a']
    at_oracle, away = float(grad(jnp.float64(0.0))), float(grad(jnp.float64(0.2)))
    assert abs(at_oracle) < 0.05 * abs(away), (p, at_oracle, away)


def test_adaptive_weight():
  sq = jnp.array([0.0, 1.0, 9.0])
  np.testing.assert_allclose(mf.adaptive_weighted(sq, 0.0, 1e-3), sq)
  np.testing.assert_allclose(mf.adaptive_weighted(sq, 1.0, 1.0), sq / (sq + 1.0))
  np.testing.assert_allclose(mf.adaptive_weighted(sq, 0.5, 0.0)[1:], jnp.sqrt(sq[1:]))
  g = jax.grad(lambda q: mf.adaptive_weighted(q, 1.0, 1.0).sum())(sq)  # The weight is under stop_gradient.
  np.testing.assert_allclose(g, 1.0 / (sq + 1.0))


# ------------------------------------------------------------------------------------- The times.
@pytest.mark.parametrize('order', ['sort', 'min'])
def test_time_proposals(order):
  s = settings(order=order, t_mean=-0.6, t_std=1.6, r_mean=-4.0, r_std=1.6, ratio_r_neq_t=0.75)
  t, r = mf.sample_times(jax.random.PRNGKey(0), 200_000, s)
  t, r = np.asarray(t), np.asarray(r)
  assert ((0 < r) & (r <= t) & (t < 1)).all()
  equal = r == t
  logit = lambda p: np.log(p / (1 - p))
  if order == 'min':  # t keeps its own proposal: logit t ~ N(-0.6, 1.6^2).
    assert abs(logit(t).mean() + 0.6) < 0.02 and abs(logit(t).std() - 1.6) < 0.02
    # r = min(r', t) with logit r' ~ N(-4, 1.6^2): r' < t with P(N(-4, 1.6^2) - N(-0.6, 1.6^2) < 0); otherwise
    # r = t. So r = t in 25% of the rows (the mask) plus 75% x P(r' >= t) (py-meanflow's order: mask, then min).
    from scipy.stats import norm  # pylint: disable=g-import-not-at-top
    p_below = norm.cdf(3.4 / (1.6 * np.sqrt(2)))
    assert abs(equal.mean() - (0.25 + 0.75 * (1 - p_below))) < 0.005
  else:  # t = max, r = min of two draws: logit t is the max of two N(-0.6, 1.6^2).
    assert abs(equal.mean() - 0.25) < 0.005  # 1 - ratio_r_neq_t, drawn per row.
    expected_mean = -0.6 + 1.6 / np.sqrt(np.pi)  # E[max of two standard normals] = 1 / sqrt(pi).
    assert abs(logit(t).mean() - expected_mean) < 0.02
    assert abs(logit(r[~equal]).mean() - (-0.6 - 1.6 / np.sqrt(np.pi))) < 0.03
  none = mf.sample_times(jax.random.PRNGKey(1), 1000, settings(ratio_r_neq_t=0.0))
  np.testing.assert_array_equal(none[0], none[1])
  with pytest.raises(ValueError, match='mf_time_order'):
    mf.sample_times(jax.random.PRNGKey(0), 4, settings(order='random'))


# -------------------------------------------------------------------------------- The real network.
def _unet(dtype=jnp.float32, dropout=0.2):
  config = test_config.get_config()
  config.model.two_times = True
  config.model.dropout = dropout
  config.model.embedding = 'positional'
  config.model.positional_scale = 1.0
  model = models.create_model(config.model, dtype=dtype)
  z = jnp.zeros((2, 8, 8, 1))
  params = model.init(jax.random.PRNGKey(0), z, jnp.zeros((2,)), c_noise2_B=jnp.zeros((2,)))['params']
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(1), p.shape, p.dtype), params)
  return model, params


def test_two_time_unet_depends_on_the_interval_and_the_single_time_tree_is_unchanged():
  model, params = _unet(dropout=0.0)
  flow = mf.FlowMap(model)
  z = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 1))
  t = jnp.array([0.7, 0.7])
  a, b = flow(params, z, jnp.array([0.7, 0.7]), t), flow(params, z, jnp.array([0.1, 0.1]), t)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-4
  assert 'interval_dense_0' in params and 'interval_dense_1' in params
  config = test_config.get_config()
  config.model.embedding, config.model.positional_scale = 'positional', 1.0
  one = models.create_model(config.model)
  single = one.init(jax.random.PRNGKey(0), z, jnp.zeros((2,)))['params']
  assert set(params) - set(single) == {'interval_dense_0', 'interval_dense_1'}  # Positional features: no params.
  assert set(single) <= set(params)
  with pytest.raises(ValueError, match='two_times'):
    one.apply({'params': single}, z, t, c_noise2_B=t)
  with pytest.raises(ValueError, match='two_times'):
    model.apply({'params': params}, z, t)


def test_unet_jvp_agrees_with_central_differences_and_shares_the_dropout_mask():
  model, params = _unet(dropout=0.5)
  flow = mf.FlowMap(model)
  z = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, 1))
  t, r = jnp.array([0.8, 0.4]), jnp.array([0.3, 0.1])
  v = jax.random.normal(jax.random.PRNGKey(4), z.shape)
  key = jax.random.PRNGKey(7)
  fn = lambda z_, r_, t_, k=key: flow(params, z_, r_, t_, k)
  u, du = jax.jvp(fn, (z, r, t), (v, jnp.zeros_like(r), jnp.ones_like(t)))
  np.testing.assert_allclose(u, fn(z, r, t), atol=1e-5)  # The jvp's primal is the call with the same key...
  assert float(jnp.max(jnp.abs(fn(z, r, t, jax.random.PRNGKey(8)) - u))) > 1e-3  # ... another key, another mask.
  h = 1e-2  # A float32 network (its time embedding is float32 in any dtype): rounding ~1e-5, O(h^2) error.
  fd = (np.asarray(fn(z + h * v, r, t + h), np.float64) - np.asarray(fn(z - h * v, r, t - h), np.float64)) / (2 * h)
  err = np.linalg.norm(np.asarray(du, np.float64) - fd) / np.linalg.norm(fd)
  assert err < 1e-3, err
  # Moving r moves u too (the interval t - r is an input), and the tangent (v, 0, 1) holds r fixed.
  fd_r = (np.asarray(fn(z, r + h, t), np.float64) - np.asarray(fn(z, r - h, t), np.float64)) / (2 * h)
  assert np.linalg.norm(fd_r) > 1e-3 * np.linalg.norm(fd)
  fd_other = (np.asarray(fn(z + h * v, r, t + h, jax.random.PRNGKey(8)), np.float64)
              - np.asarray(fn(z - h * v, r, t - h, jax.random.PRNGKey(9)), np.float64)) / (2 * h)
  assert np.linalg.norm(np.asarray(du, np.float64) - fd_other) / np.linalg.norm(fd) > 1.0


def test_bfloat16_runs_the_jvp_target_and_loss_in_float32():
  model32, params = _unet()
  model16 = model32.clone(dtype=jnp.bfloat16)
  x0 = jax.random.uniform(jax.random.PRNGKey(5), (4, 8, 8, 1), minval=-1, maxval=1)
  loss16, m16 = jax.jit(functools.partial(mf.meanflow_loss, flow=mf.FlowMap(model16), settings=settings()))(
      params, None, x0, 0, jax.random.PRNGKey(6))
  loss32, m32 = jax.jit(functools.partial(mf.meanflow_loss, flow=mf.FlowMap(model32), settings=settings()))(
      params, None, x0, 0, jax.random.PRNGKey(6))
  assert loss16.dtype == jnp.float32 and m16['sq_err'].dtype == jnp.float32
  # The target is the float32 network's in both; only the prediction differs (by bf16 rounding).
  assert abs(float(m16['sq_err']) - float(m32['sq_err'])) < 0.05 * float(m32['sq_err']) + 1e-3


def test_short_gaussian_training_moves_towards_the_average_velocity():
  """A tiny network u = A(t, r) z + B(t, r) with A, B small MLPs of (t, t - r), trained by the MeanFlow loss on
  Gaussian data, cuts the error to u* (and the one-step samples' moments move to (mu, s))."""

  class Affine(nn.Module):
    @nn.compact
    def __call__(self, z, t, labels_B=None, train=False, c_noise2_B=None):
      feats = jnp.stack([t, c_noise2_B, t * c_noise2_B, t**2, c_noise2_B**2], -1)
      h = nn.tanh(nn.Dense(32)(feats))
      a, b = jnp.split(nn.Dense(2)(h), 2, -1)
      return a[:, :, None, None] * z + b[:, :, None, None]

  flow = mf.FlowMap(Affine())
  params = flow.model.init(jax.random.PRNGKey(0), jnp.zeros((2, 1, 1, 1)), jnp.zeros((2,)),
                           c_noise2_B=jnp.zeros((2,)))['params']
  steps = 2000
  opt = optax.adam(optax.cosine_decay_schedule(3e-3, steps))  # Decayed: the conditional velocity's noise settles.
  state = opt.init(params)
  loss_fn = functools.partial(mf.meanflow_loss, flow=flow, settings=settings(norm_p=0.0))

  @jax.jit
  def train_step(params, state, key):
    k1, k2 = jax.random.split(key)
    x0 = MU + S * jax.random.normal(k1, (1024, 1, 1, 1))
    grads = jax.grad(lambda p: loss_fn(p, None, x0, 0, k2)[0])(params)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(params, updates), state

  z, r, t = _points(n=256, shape=(1, 1, 1), seed=9)
  oracle = mf.gaussian_average_velocity(z, r, t, MU, S)
  error = lambda p: float(jnp.mean(jnp.square(flow(p, z, r, t) - oracle)))
  before = error(params)
  for i in range(steps):
    params, state = train_step(params, state, jax.random.PRNGKey(100 + i))
  after = error(params)
  assert after < before / 20, (before, after)
  e = jax.random.normal(jax.random.PRNGKey(11), (20_000, 1, 1, 1))
  x = mf.sample(lambda z_, r_, t_: flow(params, z_, r_, t_), e, mf.uniform_times(1))
  assert abs(float(x.mean()) - MU) < 0.05 and abs(float(x.std()) - S) < 0.06


# ------------------------------------------------------------------------------------ End to end.
def _tiny_run_config(**overrides):
  return tiny_runs.tiny_config('meanflow', local_data=True, **overrides)  # The real IDX files (offline path).


@pytest.fixture(scope='module')
def meanflow_run(tmp_path_factory):
  from cm_jax import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp('meanflow'))
  state = train.train_and_evaluate(_tiny_run_config(), workdir)
  return workdir, state


def test_a_meanflow_run_trains_resumes_and_samples(meanflow_run, tmp_path, preempt_at):
  from cm_jax import edit  # pylint: disable=g-import-not-at-top
  from cm_jax import inference  # pylint: disable=g-import-not-at-top
  from cm_jax import train  # pylint: disable=g-import-not-at-top
  workdir, state = meanflow_run
  assert int(state.step) == 4 and state.target_params is None and 'interval_dense_1' in state.params
  preempt_at(2)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(_tiny_run_config(), str(tmp_path / 'resumed'))
  resumed = train.train_and_evaluate(_tiny_run_config(), str(tmp_path / 'resumed'))
  assert tiny_runs.tree_equal(state.params, resumed.params) and tiny_runs.tree_equal(state.opt_state, resumed.opt_state)

  model = inference.load(workdir)
  assert model.is_flow_model and not model.is_diffusion_model and isinstance(model.denoiser, mf.FlowMap)
  one = model.sample_float(4, steps=1, seed=3)
  assert one.shape == (4, 28, 28, 1) and np.all(np.abs(one) <= 1.0)
  # The sampler is the jump z_0 = z_1 - u(z_1, 0, 1) of the flow map on the seed's noise, clipped.
  from cm_jax import samplers  # pylint: disable=g-import-not-at-top
  from cm_jax.core import sampling  # pylint: disable=g-import-not-at-top
  keys = sampling.example_keys(jax.random.PRNGKey(3), 0, 4)
  z, _ = sampling.draw_noise(keys, (4, 28, 28, 1), 0)
  ones, zeros = jnp.ones((4,)), jnp.zeros((4,))
  by_hand = jnp.clip(z - model.denoiser(model.params, z, zeros, ones), -1, 1)
  np.testing.assert_allclose(one, by_hand, atol=1e-5)
  two = model.sample_float(4, steps=2, seed=3)
  assert not np.allclose(one, two)
  spec = samplers.make_sampler(model.config, steps=3)
  assert spec.name == 'meanflow' and spec.times == pytest.approx((2 / 3, 1 / 3))
  assert samplers.make_sampler(model.config, steps=2).times == (0.5,)
  with pytest.raises(ValueError, match='descend strictly inside'):
    samplers.make_sampler(model.config, steps=2, ts_=(1.5,))
  with pytest.raises(ValueError, match="sample it with 'meanflow'"):
    samplers.make_sampler(model.config, 'heun')
  with pytest.raises(ValueError, match='a MeanFlow model samples from t = 1'):
    samplers.set_start_time(model.config, 2.0)
  with pytest.raises(ValueError, match='MeanFlow flow map .* not defined for flow maps'):
    edit.run_task(model, 'inpaint', np.zeros((1, 28, 28, 1), np.uint8), num=1, batch_size=1)


def test_meanflow_config_checks():
  from cm_jax import config_validation  # pylint: disable=g-import-not-at-top
  from cm_jax.runtime import errors  # pylint: disable=g-import-not-at-top
  config_validation.validate(_tiny_run_config())
  for overrides, field in (({'model.two_times': False}, 'model.two_times'),
                           ({'sampling.two_step_t': 2.5}, 'sampling.two_step_t'),
                           ({'loss.mf_ratio_r_neq_t': 1.5}, 'loss.mf_ratio_r_neq_t'),
                           ({'loss.mf_norm_c': 0.0}, 'loss.mf_norm_c'),
                           ({'loss.mf_time_order': 'random'}, 'loss.mf_time_order'),
                           ({'sampling.start_t': 1.0}, 'sampling.start_t')):
    with pytest.raises(errors.ConfigError, match=f'config.{field}'):
      config_validation.validate(_tiny_run_config(**overrides))
  ct = test_config.get_config()
  ct.model.two_times = True
  with pytest.raises(errors.ConfigError, match='config.model.two_times'):
    config_validation.validate(ct)


# ------------------------------------------------------------------------------------ Guidance folded into training.
def test_guided_velocity_at_its_fixed_point_is_guidance_of_scale_omega_over_one_minus_kappa():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  v, u_null = jax.random.normal(k1, (5, 4)), jax.random.normal(k2, (5, 4))
  for omega, kappa in ((1.0, 0.5), (0.2, 0.92), (2.0, 0.0), (1.5, 0.3)):
    fixed = u_null + omega / (1.0 - kappa) * (v - u_null)  # What a network trained to the guided field returns.
    np.testing.assert_allclose(mf.guided_velocity(v, fixed, u_null, omega, kappa), fixed, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(mf.guided_velocity(v, None, u_null, 1.0, 0.0), v)  # omega 1, kappa 0: no guidance.


class _LabelAffine(nn.Module):
  """u = a z + emb[label] + w0 t + w1 (t - r): every term of the guided target computable by hand."""
  num_labels: int

  @nn.compact
  def __call__(self, z, t, labels_B=None, train=False, c_noise2_B=None):
    a = self.param('a', lambda k, s: jnp.asarray(0.7, jnp.result_type(float)), ())
    emb = self.param('emb', lambda k, s: jnp.arange(s[0], dtype=jnp.result_type(float)) * 0.3 - 0.5,
                     (self.num_labels,))
    w = self.param('w', lambda k, s: jnp.asarray([0.4, -0.9], jnp.result_type(float)), (2,))
    return a * z + (emb[labels_B] + w[0] * t + w[1] * c_noise2_B)[:, None, None, None]


def test_guided_loss_matches_the_target_computed_by_hand_and_guidance_carries_no_gradient(x64):
  classes, batch = 4, 256
  s = settings(norm_p=0.0, class_dropout=0.3, cfg_omega=1.5, cfg_kappa=0.4, cfg_t_min=0.2, cfg_t_max=0.9,
               null_label=classes)
  flow = mf.FlowMap(_LabelAffine(classes + 1))
  params = flow.model.init(jax.random.PRNGKey(0), jnp.zeros((2, 2, 2, 1)), jnp.zeros((2,)),
                           labels_B=jnp.zeros((2,), jnp.int32), c_noise2_B=jnp.zeros((2,)))['params']
  k1, k2 = jax.random.split(jax.random.PRNGKey(1))
  x0 = jax.random.uniform(k1, (batch, 2, 2, 1), jnp.float64, -1, 1)
  labels = jax.random.randint(k2, (batch,), 0, classes)
  rng = jax.random.PRNGKey(4)

  # The draws of the loss, then the guided target by hand with the parameters as constants.
  rng_times, rng_noise, _ = jax.random.split(rng, 3)
  t, r = mf.sample_times(rng_times, batch, s, jnp.float64)
  e = jax.random.normal(rng_noise, x0.shape, jnp.float64)
  dropped = np.asarray(jax.random.uniform(jax.random.fold_in(rng, 3), (batch,)) < s.class_dropout)
  inside = (np.asarray(t) >= 0.2) & (np.asarray(t) <= 0.9) & ~dropped
  assert dropped.sum() > 30 and inside.sum() > 30 and (~inside & ~dropped).sum() > 10  # Every kind of row.
  lab = np.where(dropped, classes, np.asarray(labels))
  a, emb, w = (np.asarray(params[k], np.float64) for k in ('a', 'emb', 'w'))
  t_, r_, z = np.asarray(t)[:, None, None, None], np.asarray(r)[:, None, None, None], None
  z = (1 - t_) * np.asarray(x0) + t_ * np.asarray(e)
  v = np.asarray(e) - np.asarray(x0)
  u_null = a * z + (emb[classes] + w[0] * t_)
  u_cond = a * z + (emb[lab][:, None, None, None] + w[0] * t_)
  v_g = np.where(inside[:, None, None, None], 1.5 * v + 0.4 * u_cond + (1 - 1.5 - 0.4) * u_null, v)
  target = v_g - (t_ - r_) * (a * v_g + w[0] + w[1])  # du/dt along (v_g, 0, 1).

  def by_hand(p):
    u = p['a'] * z + (p['emb'][lab][:, None, None, None] + p['w'][0] * t_ + p['w'][1] * (t_ - r_))
    return jnp.mean(jnp.sum(jnp.square(u - target), axis=(1, 2, 3)))

  loss_fn = lambda p: mf.meanflow_loss(p, None, x0, 0, rng, labels_B=labels, flow=flow, settings=s)
  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  np.testing.assert_allclose(float(loss), float(by_hand(params)), rtol=1e-10)
  assert float(metrics['frac_null_label']) == pytest.approx(dropped.mean())
  # The guidance terms sit inside the stop-gradient target: the gradient is that of the constant-target loss.
  for key, g in jax.grad(by_hand)(params).items():
    np.testing.assert_allclose(grads[key], g, rtol=1e-9, atol=1e-12)
  # Without guidance the same draws give another loss (the guided rows changed it).
  plain = dataclasses.replace(s, cfg_omega=1.0, cfg_kappa=0.0)
  assert abs(float(mf.meanflow_loss(params, None, x0, 0, rng, labels_B=labels, flow=flow, settings=plain)[0])
             - float(loss)) > 1e-3 * float(loss)


def test_a_class_conditional_bfloat16_run_with_guidance_trains_and_samples_each_class(tmp_path):
  from cm_jax import inference  # pylint: disable=g-import-not-at-top
  from cm_jax import train  # pylint: disable=g-import-not-at-top
  config = _tiny_run_config(**{'model.class_conditional': True, 'model.null_class': True,
                               'loss.mf_class_dropout': 0.1, 'loss.mf_cfg_omega': 1.0, 'loss.mf_cfg_kappa': 0.5,
                               'training.precision': 'bfloat16'})
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 4 and state.params['class_embed']['embedding'].shape[0] == 11  # 10 classes + null.
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state.params))
  model = inference.load(str(tmp_path))
  labels = np.array([0, 3, 9, 10])  # 10: the null label (unguided, unconditional).
  images = model.sample_float(4, steps=1, seed=3, labels=labels)
  assert images.shape == (4, 28, 28, 1) and np.isfinite(images).all()
  assert not np.allclose(images[0], images[1])


def test_guidance_config_checks():
  from cm_jax import config_validation  # pylint: disable=g-import-not-at-top
  from cm_jax.runtime import errors  # pylint: disable=g-import-not-at-top
  cond = {'model.class_conditional': True, 'model.null_class': True}
  config_validation.validate(_tiny_run_config(**cond, **{'loss.mf_class_dropout': 0.1, 'loss.mf_cfg_kappa': 0.5}))
  for overrides, field in (({'model.null_class': True}, 'model.null_class'),
                           ({'model.class_conditional': True, 'loss.mf_class_dropout': 0.1},
                            'loss.mf_class_dropout'),
                           (dict(cond, **{'loss.mf_class_dropout': 1.0}), 'loss.mf_class_dropout'),
                           (dict(cond, **{'loss.mf_cfg_omega': 2.0}), 'loss.mf_cfg_omega'),
                           (dict(cond, **{'loss.mf_class_dropout': 0.1, 'loss.mf_cfg_kappa': 1.0}),
                            'loss.mf_cfg_kappa'),
                           (dict(cond, **{'loss.mf_class_dropout': 0.1, 'loss.mf_cfg_omega': 2.0,
                                          'loss.mf_cfg_t_min': 0.8, 'loss.mf_cfg_t_max': 0.5}),
                            'loss.mf_cfg_t_min')):
    with pytest.raises(errors.ConfigError, match=f'config.{field}'):
      config_validation.validate(_tiny_run_config(**overrides))
  ct = test_config.get_config()
  ct.model.class_conditional, ct.model.null_class, ct.loss.mf_class_dropout = True, True, 0.1
  with pytest.raises(errors.ConfigError, match="MeanFlow's"):
    config_validation.validate(ct)
