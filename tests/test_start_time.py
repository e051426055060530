"""sampling.start_t: consistency sampling's first time (x = T z, f(x, T)) below sigma_max."""

import jax
import numpy as np
import pytest

from cm_jax import config_validation
from cm_jax import samplers
from cm_jax.configs import default
from cm_jax.configs import test as test_config
from cm_jax.core import karras
from cm_jax.core import sampling
from cm_jax.evaluation import two_step_search


class FakeDenoiser:
  """Stands in for denoiser_lib.Denoiser: f(x, sigma) = 0.5 x + sigma, recording the sigmas it is called at."""

  def __init__(self):
    self.sigmas = []

  def __call__(self, params, x_BHWC, sigma_B, labels_B=None):
    self.sigmas.append(sigma_B)
    return 0.5 * x_BHWC + sigma_B[:, None, None, None]


def config_with(start_t, two_step_t=2.0):
  config = test_config.get_config()
  config.sampling.start_t = start_t
  config.sampling.two_step_t = two_step_t
  config.sampling.clip = False
  return config


@pytest.mark.parametrize('start_t', [None, 40.0, 5.0])
def test_one_step_sample_is_f_of_start_t_times_z(start_t):
  config = config_with(start_t)
  spec = samplers.make_sampler(config, steps=1)
  assert spec.start_t == start_t and spec.times == ()
  first = 80.0 if start_t is None else start_t
  assert ('from t =' in spec.describe()) == (start_t is not None)
  keys = sampling.example_keys(jax.random.PRNGKey(3), 0, 4)
  denoiser = FakeDenoiser()
  out = np.asarray(samplers.sample_from_keys(denoiser, None, keys, (4, 2, 2, 1), spec))
  z, _ = sampling.draw_noise(keys, (4, 2, 2, 1), 0)
  np.testing.assert_allclose(out, 0.5 * first * np.asarray(z) + first, rtol=1e-5, atol=1e-5)
  assert len(denoiser.sigmas) == 1 and np.all(np.asarray(denoiser.sigmas[0]) == np.float32(first))


def test_two_steps_start_at_start_t_then_the_intermediate_time():
  config = config_with(40.0, two_step_t=2.0)
  spec = samplers.make_sampler(config, steps=2)
  assert spec.times == (2.0,) and spec.start_t == 40.0
  denoiser = FakeDenoiser()
  keys = sampling.example_keys(jax.random.PRNGKey(4), 0, 3)
  samplers.sample_from_keys(denoiser, None, keys, (3, 2, 2, 1), spec)
  assert [float(s[0]) for s in denoiser.sigmas] == [40.0, 2.0]


def test_start_t_is_checked():
  with pytest.raises(ValueError, match='start_t'):
    samplers.make_sampler(config_with(90.0), steps=1)  # Above sigma_max = 80.
  with pytest.raises(ValueError, match='start_t'):
    samplers.make_sampler(config_with(0.001), steps=1)  # Below sigma_min.
  with pytest.raises(ValueError, match='outside'):
    samplers.make_sampler(config_with(5.0), steps=2, ts_=(10.0,))  # An intermediate time above the start.
  with pytest.raises(ValueError, match='sampling.two_step_t = 2 does not lie'):  # The default time above it.
    samplers.make_sampler(config_with(1.0, two_step_t=2.0), steps=2)
  assert samplers.make_sampler(config_with(1.0, two_step_t=2.0), steps=2, ts_=(0.5,)).times == (0.5,)
  assert samplers.make_sampler(config_with(1.0, two_step_t=2.0), steps=1).start_t == 1.0
  edm = config_with(40.0)
  edm.loss.name = 'edm'
  with pytest.raises(ValueError, match='start_t'):
    samplers.make_sampler(edm)
  for start_t, two_step_t, field in ((100.0, 2.0, 'sampling.start_t'), (1.5, 2.0, 'sampling.two_step_t')):
    config = default.get_config()
    config.sampling.start_t, config.sampling.two_step_t = start_t, two_step_t
    with pytest.raises(ValueError, match=field):
      config_validation.validate(config)
  config = default.get_config()
  config.sampling.start_t = 40.0
  config_validation.validate(config)  # The default two_step_t 2.52 lies below it.
  config.loss.name = 'edm'
  with pytest.raises(ValueError, match='sampling.start_t'):
    config_validation.validate(config)


def test_two_step_search_stays_below_start_t():
  config = config_with(10.0)
  calls = []

  def score_at_time(t):
    calls.append(t)
    return {'classifier_fd': float(np.log(t / 20.0) ** 2)}  # Minimal above the start: the search's top point wins.

  result = two_step_search.search_two_step_time(score_at_time, 'classifier_fd', config, 18)
  grid = np.asarray(karras.karras_grid(18, 0.002, 80.0, 7.0))[::-1]
  below = [i for i in range(1, 17) if grid[i] < 10.0]
  assert all(t < 10.0 for t in calls)
  assert result['best_index'] == below[0] and result['best_t'] == pytest.approx(float(grid[below[0]]))
  with pytest.raises(ValueError, match='start_t'):
    two_step_search.search_two_step_time(score_at_time, 'classifier_fd', config_with(0.0025), 18)
  for outside in (0.002, 90.0):  # A library caller (a notebook) gets the range check config_validation makes.
    with pytest.raises(ValueError, match=r'must lie in \(sigma_min, sigma_max\]'):
      two_step_search.search_two_step_time(score_at_time, 'classifier_fd', config_with(outside), 18)


def test_jitted_sampler_uses_start_t():
  """The CLI path (make_sample_fn, jitted, start_t static) gives the eager result."""
  config = config_with(40.0)
  denoiser = FakeDenoiser()
  keys = sampling.example_keys(jax.random.PRNGKey(5), 0, 2)
  spec = samplers.make_sampler(config, steps=1)
  run = samplers.make_sample_fn(denoiser)
  jitted = np.asarray(run(None, keys, spec, (2, 2, 2, 1)))
  eager = np.asarray(samplers.sample_from_keys(denoiser, None, keys, (2, 2, 2, 1), spec))
  np.testing.assert_allclose(jitted, eager, rtol=1e-6)
