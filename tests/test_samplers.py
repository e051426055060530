"""cm_jax/samplers.py: specs resolved once from a config, and class labels from a class count alone."""

import dataclasses

import numpy as np
import pytest

from cm_jax import samplers
from cm_jax.configs import test as test_config


def test_a_spec_carries_everything_the_jitted_sampler_reads():
  config = test_config.get_config()
  config.consistency.sigma_min, config.consistency.sigma_max, config.consistency.rho = 0.004, 60.0, 5.0
  config.sampling.clip = False
  spec = samplers.make_sampler(config, steps=2)
  assert (spec.sigma_min, spec.sigma_max, spec.rho, spec.clip) == (0.004, 60.0, 5.0, False)
  assert spec.times == (config.sampling.two_step_t,) and spec.first_time == 60.0
  config.consistency.sigma_max = 1.0  # Later edits of the config do not reach a resolved spec.
  assert spec.sigma_max == 60.0
  hash(spec)  # A static argument of jit.
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.clip = True  # pylint: disable=assigning-non-slot


def test_the_first_time_is_start_t_when_the_run_sets_one():
  config = test_config.get_config()
  config.sampling.start_t = 40.0
  spec = samplers.make_sampler(config, steps=1)
  assert spec.start_t == 40.0 and spec.first_time == 40.0 and spec.sigma_max == config.consistency.sigma_max


def test_edm_specs_keep_the_noise_range_of_their_karras_grid():
  config = test_config.get_config('edm')
  spec = samplers.make_sampler(config)
  assert spec.name == config.sampling.diffusion_solver and spec.steps == config.sampling.diffusion_steps
  assert (spec.sigma_min, spec.sigma_max, spec.rho) == (config.consistency.sigma_min, config.consistency.sigma_max,
                                                         config.consistency.rho)


def test_num_classes_is_zero_for_an_unconditional_model():
  config = test_config.get_config()
  assert samplers.num_classes(config.model) == 0
  config.model.class_conditional, config.model.num_classes = True, 7
  assert samplers.num_classes(config.model) == 7


def test_drawn_labels_depend_only_on_seed_and_index():
  assert samplers.draw_labels(0, 5, seed=0) is None
  short, long = samplers.draw_labels(10, 5, seed=3), samplers.draw_labels(10, 50, seed=3)
  assert short.dtype == np.int32 and np.array_equal(short, long[:5])
  assert long.min() >= 0 and long.max() < 10
  assert not np.array_equal(long, samplers.draw_labels(10, 50, seed=4))


def test_grid_labels_cycle_through_the_classes():
  assert samplers.grid_labels(0, 4) is None
  np.testing.assert_array_equal(samplers.grid_labels(3, 7), [0, 1, 2, 0, 1, 2, 0])


def test_resolved_labels_are_checked_against_the_class_count():
  np.testing.assert_array_equal(samplers.resolve_labels(4, 3, 0, 2), [2, 2, 2])
  np.testing.assert_array_equal(samplers.resolve_labels(4, 3, 0, [0, 3, 1]), [0, 3, 1])
  np.testing.assert_array_equal(samplers.resolve_labels(4, 3, 9), samplers.draw_labels(4, 3, 9))
  with pytest.raises(ValueError, match='unconditional'):
    samplers.resolve_labels(0, 3, 0, 1)
  with pytest.raises(ValueError, match=r'\[0, 4\).*\[4\]'):
    samplers.resolve_labels(4, 2, 0, [1, 4])
  with pytest.raises(ValueError, match='one class label per sample'):
    samplers.resolve_labels(4, 3, 0, [1, 2])


def test_make_sample_fn_refuses_a_config_where_the_mesh_goes():
  config = test_config.get_config()
  with pytest.raises(TypeError, match='mesh must be a jax.sharding.Mesh, got ConfigDict'):
    samplers.make_sample_fn(None, config)  # The signature before the sampler spec carried the config's values.
