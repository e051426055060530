"""runtime/device_map.map_batches: the one pad -> shard -> run -> gather -> cut -> progress loop."""

import jax
import numpy as np
import pytest

from cm_jax.runtime import device_map
from cm_jax.runtime import progress as progress_lib
from cm_jax.runtime import sharding


def test_rows_come_back_in_order_and_the_padded_rows_are_cut():
  x = np.arange(10, dtype=np.float32)[:, None]
  seen = []

  def fn(start, batch):
    seen.append((start, batch.shape[0], batch[:, 0].tolist()))
    return batch * 2
  out = device_map.map_batches(fn, [x], num=10, batch_size=4)
  np.testing.assert_array_equal(out, x * 2)
  assert [s[:2] for s in seen] == [(0, 4), (4, 4), (8, 4)]  # One shape: the last batch is padded ...
  assert seen[-1][2] == [8.0, 9.0, 9.0, 9.0]  # ... by repeating its last row.


def test_without_padding_the_last_batch_is_short():
  x = np.arange(5)
  sizes = []
  out = device_map.map_batches(lambda start, b: (sizes.append(len(b)), b + start)[1], [x], 5, 2, pad_last=False)
  assert sizes == [2, 2, 1]
  np.testing.assert_array_equal(out, [0, 1, 4, 5, 8])


def test_tuple_outputs_are_concatenated_leaf_by_leaf():
  x = np.arange(7, dtype=np.float32)
  features, probs = device_map.map_batches(lambda start, b: (b[:, None] * np.ones((1, 3)), b + 0.5), [x], 7, 3)
  assert features.shape == (7, 3) and probs.shape == (7,)
  np.testing.assert_array_equal(probs, x + 0.5)


def test_with_no_arrays_fn_makes_its_rows_from_the_start_index():
  out = device_map.map_batches(lambda start: np.arange(start, start + 4), [], num=6, batch_size=4)
  np.testing.assert_array_equal(out, np.arange(6))


def test_on_a_mesh_batches_are_split_over_the_devices_and_rounded_up():
  mesh = sharding.make_mesh()
  n = mesh.size
  assert n == 2  # tests/conftest.py: two fake CPU devices.
  shardings = []

  @jax.jit
  def double(b):
    return b * 2

  def fn(start, b):
    shardings.append((b.shape, b.sharding.is_equivalent_to(sharding.batch_sharding(mesh), b.ndim)))
    return double(b)
  x = np.arange(5, dtype=np.float32)
  out = device_map.map_batches(fn, [x], num=5, batch_size=3, mesh=mesh)
  np.testing.assert_array_equal(out, x * 2)
  assert device_map.batch_size_for(3, 5, mesh) == 4
  assert shardings == [((4,), True), ((4,), True)]


def test_before_batch_runs_before_every_batch_and_may_stop_the_loop():
  calls = []

  def before():
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt('stop')
  with pytest.raises(KeyboardInterrupt):
    device_map.map_batches(lambda start, b: b, [np.arange(6)], 6, 2, before_batch=before)
  assert len(calls) == 2


def test_progress_is_reported_with_the_label_and_unit(monkeypatch):
  lines = []
  monkeypatch.setattr(progress_lib, '_log_info', lines.append)
  device_map.map_batches(lambda start, b: b, [np.arange(6)], 6, 4, progress_label='Editing (inpaint)',
                         unit='noise pairs')
  assert len(lines) == 1 and lines[0].startswith('Editing (inpaint): 6 noise pairs in ')
  lines.clear()
  device_map.map_batches(lambda start, b: b, [np.arange(6)], 6, 4)  # No label: silent.
  assert not lines


def test_nothing_to_map_is_an_error():
  with pytest.raises(ValueError, match='num >= 1'):
    device_map.map_batches(lambda start, b: b, [np.arange(0)], 0, 4)
