"""cm_jax.runtime.sharding on the 2 fake CPU devices of conftest: the layouts, and FSDP steps == replicated steps."""

import functools

import jax
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cm_jax import train_state as ts
from cm_jax.core import denoiser as denoiser_lib
from cm_jax.core import losses
from cm_jax.data import catalog
from cm_jax.runtime import sharding
from cm_jax.train_step import train_step
from cm_jax.train_step import UpdateSettings

try:
  from cm_jax.configs import test as test_config
except ImportError:
  from configs import test as test_config  # Before configs/ moved into the package.

MIN_SIZE = 64  # Small enough that the tiny model's kernels shard; its biases and norm scales (<= 32) do not.
NUM_STEPS = 3


@pytest.fixture(scope='module', autouse=True)
def fast_compiles():
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', previous)


@pytest.fixture(scope='module')
def tiny():
  """(config, tx, abstract_state, mesh): CT with a target EMA, so every sharded field of the state is present."""
  config = test_config.get_config()
  config.loss.target = 'ema'
  config.model.ch_mult = (1,)  # One resolution: compiles in ~2/3 of the time of the two-level test model.
  tx = ts.make_optimizer(config)
  abstract_state = jax.eval_shape(functools.partial(ts.init_state, config, tx))
  assert abstract_state.target_params is not None and len(abstract_state.ema_params) == 2
  return config, tx, abstract_state, sharding.make_mesh()


def specs(shardings):
  return jax.tree.map(lambda s: s.spec, shardings)


def sharded_axes(spec: P) -> list[int]:
  return [i for i, name in enumerate(spec) if name == sharding.DATA_AXIS]


def test_make_mesh_spans_every_device():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ('data',)
  assert mesh.shape['data'] == jax.device_count() == 2
  assert sharding.batch_sharding(mesh).spec == P('data')
  assert sharding.replicated(mesh).spec == P()


@pytest.mark.parametrize('shape, num_shards, min_size, expected', [
    ((3, 3, 16, 32), 2, 0, P(None, None, None, 'data')),  # The largest divisible dimension.
    ((3, 3, 32, 16), 2, 0, P(None, None, 'data', None)),
    ((3, 3, 16, 16), 2, 0, P(None, None, None, 'data')),  # A tie: the last of the largest.
    ((32, 15), 2, 0, P('data', None)),                    # The largest dimension (15) does not divide.
    ((7, 6, 3), 3, 0, P(None, 'data', None)),    # 3 shards: 6 is the largest multiple.
    ((3, 3, 5, 7), 2, 0, P()),                            # No divisible dimension.
    ((16,), 2, 16, P('data')),                            # min_size elements: sharded.
    ((16,), 2, 17, P()),                                  # Fewer: replicated.
    ((), 2, 0, P()),
])
def test_fsdp_spec(shape, num_shards, min_size, expected):
  assert sharding.fsdp_spec(shape, num_shards, min_size) == expected


def test_replicated_mode_replicates_everything(tiny):
  _, _, abstract_state, mesh = tiny
  shardings = sharding.state_shardings(abstract_state, mesh, 'replicated')
  assert jax.tree.structure(shardings) == jax.tree.structure(abstract_state)
  assert all(spec == P() for spec in jax.tree.leaves(specs(shardings)))
  footprint = sharding.footprint(abstract_state, shardings)
  assert footprint.per_device == footprint.total > 0


def test_fsdp_mode_on_the_tiny_model(tiny):
  _, _, abstract_state, mesh = tiny
  shardings = sharding.state_shardings(abstract_state, mesh, 'fsdp', min_size=MIN_SIZE)
  assert jax.tree.structure(shardings) == jax.tree.structure(abstract_state)
  assert shardings.step.spec == P() and shardings.rng.spec == P()

  params = specs(shardings.params)
  assert params['ResBlock_3']['Conv_0']['kernel'] == P(None, None, 'data', None)  # (3, 3, 16, 8)
  assert params['ResBlock_1']['Conv_1']['kernel'] == P(None, None, None, 'data')  # (3, 3, 8, 8): a tie, the last.
  assert params['ResBlock_1']['Dense_0']['kernel'] == P('data', None)             # (32, 8)
  assert params['Conv_1']['kernel'] == P(None, None, 'data', None)                # (3, 3, 8, 1): 72 elements.
  assert params['ResBlock_1']['Conv_1']['bias'] == P()                            # (8,): under MIN_SIZE.
  # The target, both EMAs and Adam's moments are laid out like the parameters.
  for tree in (shardings.target_params, *shardings.ema_params, shardings.opt_state[1][0].mu,
               shardings.opt_state[1][0].nu):
    assert specs(tree) == specs(shardings.params)

  num_sharded = 0
  for x, s in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(shardings)):
    axes = sharded_axes(s.spec)
    if x.size < MIN_SIZE:
      assert not axes, (x.shape, s.spec)
    else:  # Every large array of the tiny model has an even dimension: split along the largest one.
      assert len(axes) == 1, (x.shape, s.spec)
      assert x.shape[axes[0]] == max(d for d in x.shape if d % 2 == 0)
      num_sharded += 1
  assert num_sharded > 100

  footprint = sharding.footprint(abstract_state, shardings)
  replicated = sharding.footprint(abstract_state, sharding.state_shardings(abstract_state, mesh, 'replicated'))
  assert footprint.total == replicated.total == replicated.per_device
  assert 0.5 * footprint.total < footprint.per_device < 0.55 * footprint.total  # Small arrays stay whole.
  assert sharding.describe(abstract_state, shardings) == (
      f'{footprint.per_device / 1e6:.1f} MB of {footprint.total / 1e6:.1f} MB per device')


def test_fsdp_keeps_step_rng_and_indivisible_arrays_replicated():
  sds = jax.ShapeDtypeStruct
  odd = {'kernel': sds((3, 3, 5, 7), jnp.float32), 'w': sds((6, 4), jnp.float32)}
  abstract_state = ts.TrainState(step=sds((), jnp.int32), rng=sds((2,), jnp.uint32), params=odd,
                                 target_params=None, ema_params=(odd,), opt_state=(odd, sds((), jnp.int32)))
  shardings = sharding.state_shardings(abstract_state, sharding.make_mesh(), 'fsdp', min_size=0)
  assert shardings.rng.spec == P()  # (2,) would split, were rng not always replicated.
  assert shardings.target_params is None
  for tree in (shardings.params, shardings.ema_params[0], shardings.opt_state[0]):
    assert specs(tree) == {'kernel': P(), 'w': P('data', None)}


def test_unknown_mode_names_the_config_field(tiny):
  _, _, abstract_state, mesh = tiny
  with pytest.raises(ValueError, match=r"config\.training\.sharding = 'zero3' .*'fsdp', 'replicated'"):
    sharding.state_shardings(abstract_state, mesh, 'zero3')
  assert sharding.MODES == ('fsdp', 'replicated')


def host_tree(tree):
  return jax.tree.map(np.asarray, tree)


def assert_same_up_to_rounding(a: np.ndarray, b: np.ndarray, path: str) -> None:
  """Equal to 1e-5 of the array's largest magnitude (~100 float32 ulps; seen: < 1e-6).

  The attention key bias is the exception: softmax ignores a shift shared by all keys, so its gradient is zero
  in exact arithmetic and the bias, its Adam moments and EMAs hold only rounding noise (~1e-15), which differs
  between the layouts. Those must stay noise in both.
  """
  if "['key']['bias']" in path:
    assert np.abs(a).max() < 1e-9 and np.abs(b).max() < 1e-9, path
    return
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max(), err_msg=path)


def test_fsdp_steps_equal_replicated_steps(tiny):
  """NUM_STEPS jitted train steps (as train.py compiles them) from the same init, in both layouts."""
  config, tx, abstract_state, mesh = tiny
  image_shape = catalog.image_shape(config.data)
  objective = losses.make_loss(config, image_shape, denoiser_lib.make_denoiser(config))
  images_KBHWC = np.random.default_rng(0).integers(
      0, 256, (NUM_STEPS, config.training.batch_size, *image_shape), dtype=np.uint8)
  replicated = sharding.replicated(mesh)

  def run(mode):
    shardings = sharding.state_shardings(abstract_state, mesh, mode, min_size=MIN_SIZE)
    state = jax.jit(functools.partial(ts.init_state, config, tx), out_shardings=shardings)()
    init = host_tree(state)
    step_fn = jax.jit(functools.partial(train_step, loss_fn=objective.loss_fn,
                                        target_decay=objective.target_decay, tx=tx,
                                        settings=UpdateSettings.of(config)),
                      in_shardings=(shardings, sharding.batch_sharding(mesh), replicated),
                      out_shardings=(shardings, None), donate_argnums=0)
    losses_K = []
    for images_BHWC in images_KBHWC:
      state, metrics = step_fn(state, (images_BHWC, None), None)
      losses_K.append(float(metrics['loss']))
    return init, state, losses_K, shardings

  init_r, state_r, losses_r, _ = run('replicated')
  init_f, state_f, losses_f, shardings_f = run('fsdp')

  # Initialisation does not depend on the layout: bit-identical.
  jax.tree.map(np.testing.assert_array_equal, init_f, init_r)
  # The steps differ only in the order of float sums (gradients and norms reduced shard by shard).
  np.testing.assert_allclose(losses_f, losses_r, rtol=1e-6)
  assert int(state_f.step) == int(state_r.step) == NUM_STEPS
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(host_tree(state_f))[0],
                          jax.tree.leaves(host_tree(state_r))):
    assert_same_up_to_rounding(a, b, jax.tree_util.keystr(path))
  assert not np.array_equal(np.asarray(state_f.params['ResBlock_1']['Conv_1']['kernel']),
                            init_f.params['ResBlock_1']['Conv_1']['kernel'])  # The steps did train.

  # The output state really is split: each device holds half of every sharded array.
  num_sharded = 0
  for x, s in zip(jax.tree.leaves(state_f), jax.tree.leaves(shardings_f)):
    assert x.sharding.spec == s.spec
    axes = sharded_axes(s.spec)
    expected = tuple(d // 2 if i in axes else d for i, d in enumerate(x.shape))
    assert [shard.data.shape for shard in x.addressable_shards] == [expected] * 2
    num_sharded += bool(axes)
  assert num_sharded > 100


def test_orbax_restores_an_fsdp_state_in_its_layout(tiny, tmp_path):
  config, tx, abstract_state, mesh = tiny
  shardings = sharding.state_shardings(abstract_state, mesh, 'fsdp', min_size=MIN_SIZE)
  state = jax.jit(functools.partial(ts.init_state, config, tx), out_shardings=shardings)()
  checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
  checkpointer.save(tmp_path / 'state', args=ocp.args.StandardSave(state))
  abstract_sharded = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  abstract_state, shardings)
  restored = checkpointer.restore(tmp_path / 'state', args=ocp.args.StandardRestore(abstract_sharded))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for x, y, s in zip(jax.tree.leaves(restored), jax.tree.leaves(state), jax.tree.leaves(shardings)):
    assert x.sharding.spec == s.spec
    assert [shard.data.shape for shard in x.addressable_shards] == [s.shard_shape(x.shape)] * 2
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert sum(bool(sharded_axes(x.sharding.spec)) for x in jax.tree.leaves(restored)) > 100
