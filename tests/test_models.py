"""The UNet: checkpoint compatibility, class conditioning, mixed precision, ADM options, paper-config sizes.

Forward passes use deterministic, non-zero parameters built from eval_shape (no init compile; the zero-init
output layer of a fresh network would hide everything).
"""

import importlib.util
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax import models
from cm_jax.configs import default
from cm_jax.configs import test as test_config
from cm_jax.core import karras

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO_ROOT, 'tests', 'models_golden.npz')


def _param_counts_module():
  spec = importlib.util.spec_from_file_location('param_counts', os.path.join(REPO_ROOT, 'benchmarks',
                                                                            'param_counts.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


param_counts = _param_counts_module()


def fake_params(shapes):
  """Deterministic float32 parameters for a tree of ShapeDtypeStructs: a sine wave per leaf, ~1/sqrt(fan-in)."""
  leaves, treedef = jax.tree_util.tree_flatten(shapes)
  out = []
  for i, leaf in enumerate(leaves):
    wave = np.sin(1.0 + 0.37 * np.arange(leaf.size) + i).reshape(leaf.shape)
    out.append((wave / np.sqrt(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 0.1 * wave).astype(np.float32))
  return jax.tree_util.tree_unflatten(treedef, out)


def param_shapes(model, x_BHWC, labels_B=None):
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), x_BHWC, jnp.zeros(x_BHWC.shape[:1]),
                        labels_B=labels_B)['params']


def num_params(shapes) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))


def tiny_model_config(**overrides):
  mc = default.get_config().model
  mc.update(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, num_groups=4,
            fourier_scale=16.0)
  mc.update(**overrides)
  return mc


def apply_fn(model):
  return jax.jit(lambda p, x, c, labels: model.apply({'params': p}, x, c, labels_B=labels))


X_B883 = jnp.asarray(np.sin(np.arange(3 * 8 * 8 * 3) * 0.3).reshape(3, 8, 8, 3), jnp.float32)
C_NOISE_B = jnp.array([-1.0, 0.2, 0.9])


# ----------------------------------------------------------------------------- Checkpoint compatibility.
@pytest.mark.parametrize('name,config', [('default', default.get_config()), ('test', test_config.get_config())])
def test_models_with_new_fields_at_defaults_keep_the_old_parameter_tree_and_outputs(name, config):
  """Golden file recorded from the UNet before head_channels/scale_shift/resblock_updown/class_conditional."""
  golden = np.load(GOLDEN)
  model = models.create_model(config.model)
  x_BHWC = (0.8 * np.sin(np.arange(2 * 28 * 28) * 0.1)).reshape(2, 28, 28, 1).astype(np.float32)
  c_noise_B = np.array([-1.2, 0.7], np.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x_BHWC, c_noise_B)['params']
  leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
  tree = {jax.tree_util.keystr(path): list(leaf.shape) for path, leaf in leaves}
  assert tree == json.loads(golden[f'{name}/tree'].tobytes()), 'parameter paths or shapes changed: checkpoints break'
  params = fake_params(shapes)
  out_eval = jax.jit(model.apply)({'params': params}, x_BHWC, c_noise_B)
  out_train = jax.jit(lambda p, r: model.apply({'params': p}, x_BHWC, c_noise_B, train=True, rngs={'dropout': r}))(
      params, jax.random.PRNGKey(3))
  message = ('the network computes something else than before issue 9 (if only XLA or the PRNG changed, regenerate '
             'the golden file from the old module)')
  # Equal up to float summation order: which kernels XLA:CPU picks for the convolutions (cm_jax/runtime/xla_flags.py's
  # fusion list, set or not in this process) moves outputs by ~1e-6 relative; a changed network moves them by
  # O(1).
  np.testing.assert_allclose(np.asarray(out_eval), golden[f'{name}/eval'], rtol=1e-5, atol=1e-7, err_msg=message)
  np.testing.assert_allclose(np.asarray(out_train), golden[f'{name}/train'], rtol=1e-5, atol=1e-7, err_msg=message)


# ----------------------------------------------------------------------------- Class conditioning.
def test_class_labels_reach_the_network_and_act_per_example():
  model = models.create_model(tiny_model_config(class_conditional=True, num_classes=5))
  labels_B = jnp.array([0, 1, 4], jnp.int32)
  shapes = param_shapes(model, X_B883, labels_B)
  assert shapes['class_embed']['embedding'].shape == (5, 4 * 8)
  params, apply = fake_params(shapes), apply_fn(model)

  out_a = np.asarray(apply(params, X_B883, C_NOISE_B, labels_B))
  out_b = np.asarray(apply(params, X_B883, C_NOISE_B, jnp.array([2, 1, 3], jnp.int32)))
  # A changed label moves the output (outputs ~0.05 here; the same computation would differ by exactly 0).
  assert np.abs(out_a[0] - out_b[0]).max() > 1e-5 and np.abs(out_a[2] - out_b[2]).max() > 1e-5
  np.testing.assert_array_equal(out_a[1], out_b[1])  # Same label, same example: untouched by the others.

  same_B = jnp.full((3,), 2, jnp.int32)
  out_batch = np.asarray(apply(params, X_B883, C_NOISE_B, same_B))
  out_reversed = np.asarray(apply(params, X_B883[::-1], C_NOISE_B[::-1], same_B))
  np.testing.assert_allclose(out_batch, out_reversed[::-1], rtol=0, atol=1e-5)


def test_labels_are_required_by_a_conditional_model_and_refused_by_an_unconditional_one():
  conditional = models.create_model(tiny_model_config(class_conditional=True, num_classes=5))
  with pytest.raises(ValueError, match='class-conditional'):
    param_shapes(conditional, X_B883)
  with pytest.raises(ValueError, match=r'labels_B has shape \(2,\)'):
    param_shapes(conditional, X_B883, jnp.zeros((2,), jnp.int32))
  unconditional = models.create_model(tiny_model_config())
  with pytest.raises(ValueError, match='this model is unconditional'):
    param_shapes(unconditional, X_B883, jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match='num_classes'):
    models.create_model(tiny_model_config(class_conditional=True, num_classes=1))


# ----------------------------------------------------------------------------- Mixed precision.
def test_compute_dtype_maps_the_precision_field():
  assert models.compute_dtype('float32') == jnp.float32
  assert models.compute_dtype('bfloat16') == jnp.bfloat16
  with pytest.raises(ValueError, match=r'training\.precision'):
    models.compute_dtype('float16')


def test_bfloat16_computes_in_bf16_with_float32_params_and_output_close_to_float32():
  mc = tiny_model_config(class_conditional=True, num_classes=3, head_channels=8, scale_shift=True,
                         resblock_updown=True)
  labels_B = jnp.array([0, 1, 2], jnp.int32)
  model_f32 = models.create_model(mc)
  model_bf16 = models.create_model(mc, dtype=models.compute_dtype('bfloat16'))
  shapes = param_shapes(model_bf16, X_B883, labels_B)
  assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  assert jax.tree.structure(shapes) == jax.tree.structure(param_shapes(model_f32, X_B883, labels_B))
  params = fake_params(shapes)

  out_bf16, state = jax.jit(lambda p: model_bf16.apply({'params': p}, X_B883, C_NOISE_B, labels_B=labels_B,
                                                       capture_intermediates=True))(params)
  out_f32 = apply_fn(model_f32)(params, X_B883, C_NOISE_B, labels_B)
  assert out_bf16.dtype == jnp.float32
  inner = state['intermediates']
  assert inner['Conv_0']['__call__'][0].dtype == jnp.bfloat16
  assert inner['ResBlock_0']['GroupNorm_0']['__call__'][0].dtype == jnp.bfloat16
  assert inner['AttnBlock_0']['MultiHeadDotProductAttention_0']['__call__'][0].dtype == jnp.bfloat16
  # The time and class embeddings and each block's projection of them stay float32 (as ADM's time_embed).
  assert inner['FourierEmbedding_0']['__call__'][0].dtype == jnp.float32
  assert inner['Dense_0']['__call__'][0].dtype == jnp.float32
  assert inner['Dense_1']['__call__'][0].dtype == jnp.float32
  assert inner['class_embed']['__call__'][0].dtype == jnp.float32
  assert inner['ResBlock_0']['Dense_0']['__call__'][0].dtype == jnp.float32
  rel_err = float(jnp.linalg.norm(out_bf16 - out_f32) / jnp.linalg.norm(out_f32))
  assert 0 < rel_err < 0.05, rel_err  # ~0.01 here: bf16 keeps 8 bits of mantissa.


def test_bfloat16_time_embedding_tells_neighbouring_levels_of_the_finest_ict_grid_apart():
  """At N = 1281 (iCT's last stage) neighbouring levels above sigma = 2 differ by < 1% in sigma: in bfloat16
  (8 significant bits) their embeddings would round together; in float32 they stay as far apart as float32's."""
  mc = tiny_model_config()
  model_f32 = models.create_model(mc)
  model_bf16 = models.create_model(mc, dtype=models.compute_dtype('bfloat16'))
  params = fake_params(param_shapes(model_f32, X_B883))
  sigma = karras.karras_grid(1281, 0.002, 80.0, 7.0)[1200:1202]  # sigma ~ 50, a 0.4% step.
  c_noise = karras.c_noise(sigma)
  x = jnp.zeros((2,) + X_B883.shape[1:])

  def embedding(model):
    _, state = model.apply({'params': params}, x, c_noise, capture_intermediates=True)
    return state['intermediates']['Dense_1']['__call__'][0]

  e16, e32 = embedding(model_bf16), embedding(model_f32)
  np.testing.assert_array_equal(e16, e32)  # Same float32 computation, bit for bit.
  assert float(jnp.max(jnp.abs(e16[0] - e16[1]))) > 0


# ----------------------------------------------------------------------------- ADM options.
def test_head_channels_split_attention_into_heads_without_changing_the_parameter_count():
  base = param_shapes(models.create_model(tiny_model_config()), X_B883)
  heads = param_shapes(models.create_model(tiny_model_config(head_channels=4)), X_B883)
  # Attention at 4x4 (16 channels) and in the middle (16 channels): 4 heads of 4 channels.
  assert base['AttnBlock_0']['MultiHeadDotProductAttention_0']['query']['kernel'].shape == (16, 1, 16)
  assert heads['AttnBlock_0']['MultiHeadDotProductAttention_0']['query']['kernel'].shape == (16, 4, 4)
  assert num_params(heads) == num_params(base)
  out = apply_fn(models.create_model(tiny_model_config(head_channels=4)))(fake_params(heads), X_B883, C_NOISE_B,
                                                                          None)
  assert out.shape == X_B883.shape and bool(jnp.all(jnp.isfinite(out)))
  with pytest.raises(ValueError, match='head_channels = 6 does not divide'):
    param_shapes(models.create_model(tiny_model_config(head_channels=6)), X_B883)


def test_scale_shift_doubles_each_residual_blocks_embedding_projection():
  base = param_shapes(models.create_model(tiny_model_config()), X_B883)
  shifted = param_shapes(models.create_model(tiny_model_config(scale_shift=True)), X_B883)
  assert jax.tree.structure(base) == jax.tree.structure(shifted)
  blocks = [name for name in base if name.startswith('ResBlock_')]
  extra = 0
  for name in blocks:
    emb_dim, out_ch = base[name]['Dense_0']['kernel'].shape
    assert shifted[name]['Dense_0']['kernel'].shape == (emb_dim, 2 * out_ch)
    extra += (emb_dim + 1) * out_ch
  assert num_params(shifted) == num_params(base) + extra
  out = apply_fn(models.create_model(tiny_model_config(scale_shift=True)))(fake_params(shifted), X_B883, C_NOISE_B,
                                                                           None)
  assert out.shape == X_B883.shape and bool(jnp.all(jnp.isfinite(out)))


def test_resblock_updown_replaces_the_resampling_convolutions_with_residual_blocks():
  base = param_shapes(models.create_model(tiny_model_config()), X_B883)
  updown = param_shapes(models.create_model(tiny_model_config(resblock_updown=True)), X_B883)
  top_convs = lambda tree: sorted(name for name in tree if name.startswith('Conv_'))
  assert top_convs(base) == ['Conv_0', 'Conv_1', 'Conv_2', 'Conv_3']  # In, down, up, out.
  assert top_convs(updown) == ['Conv_0', 'Conv_1']                    # In, out.
  num_blocks = lambda tree: sum(name.startswith('ResBlock_') for name in tree)
  assert num_blocks(updown) == num_blocks(base) + 2
  # Per resampling: a residual block c -> c (two 3x3 convs, two norms, the embedding projection from 4 ch = 32)
  # instead of one 3x3 conv: 9 c^2 + 32 c + 6 c more parameters; down at c = 8, up at c = 16.
  extra = sum(9 * c * c + 32 * c + 6 * c for c in (8, 16))
  assert num_params(updown) == num_params(base) + extra
  model = models.create_model(tiny_model_config(resblock_updown=True))
  out = apply_fn(model)(fake_params(updown), X_B883, C_NOISE_B, None)
  assert out.shape == X_B883.shape and bool(jnp.all(jnp.isfinite(out)))


# ----------------------------------------------------------------------------- Paper configs.
@pytest.mark.parametrize('path', param_counts.PAPER_CONFIGS)
def test_every_paper_config_builds_its_model_under_eval_shape(path):
  config = param_counts.load_config(path)
  count = param_counts.count_params(config)
  assert count > 1_000_000
  if path == 'configs/cifar10_ct.py':
    assert 50e6 <= count <= 62e6, f'{count} parameters; iCT/NCSN++ is ~56M'
  if path.startswith('configs/imagenet64_'):
    assert config.model.class_conditional and config.model.num_classes == 1000


# ----------------------------------------------------------------------------- Patches (model.patch_size).
def test_space_to_depth_is_a_lossless_regrouping_of_each_patch():
  from cm_jax.models import unet  # pylint: disable=g-import-not-at-top
  x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
  y = unet.space_to_depth(x, 2)
  assert y.shape == (2, 2, 3, 12)
  # Position (i, j) holds the 2x2 patch at rows 2i..2i+1, columns 2j..2j+1, channels ordered (dy, dx, c).
  np.testing.assert_array_equal(np.asarray(y[1, 1, 2]), np.asarray(x[1, 2:4, 4:6, :]).reshape(-1))
  np.testing.assert_array_equal(np.asarray(unet.depth_to_space(y, 2)), np.asarray(x))
  np.testing.assert_array_equal(np.asarray(unet.space_to_depth(x, 1)), np.asarray(x))


def test_patch_size_1_keeps_the_parameter_tree_and_a_patch_model_maps_images_to_images():
  x = jnp.asarray(np.sin(np.arange(2 * 16 * 16 * 1) * 0.3).reshape(2, 16, 16, 1), jnp.float32)
  c = jnp.array([-1.0, 0.5])
  base = models.create_model(tiny_model_config())
  same = models.create_model(tiny_model_config(patch_size=1))
  assert jax.tree.map(lambda s: s.shape, param_shapes(base, x)) == jax.tree.map(lambda s: s.shape,
                                                                                param_shapes(same, x))
  patched = models.create_model(tiny_model_config(patch_size=2))
  shapes = param_shapes(patched, x)
  # The stem sees 2*2*1 channels and the output layer writes them; the body is unchanged.
  assert shapes['Conv_0']['kernel'].shape == (3, 3, 4, 8)
  last = sorted((k for k in shapes if k.startswith('Conv_')), key=lambda k: int(k.split('_')[1]))[-1]
  assert shapes[last]['kernel'].shape[-1] == 4
  params = fake_params(shapes)
  out = apply_fn(patched)(params, x, c, None)
  assert out.shape == x.shape and out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
  # The output layer's 4 channels land on the 4 pixels of each patch: zeroing channel k of the output conv
  # zeroes exactly pixel (k // 2, k % 2) of every patch.
  zeroed = dict(params)
  kernel, bias = np.array(params[last]['kernel']), np.array(params[last]['bias'])
  kernel[..., 3], bias[3] = 0.0, 0.0
  zeroed[last] = {'kernel': kernel, 'bias': bias}
  out_zeroed = np.asarray(apply_fn(patched)(zeroed, x, c, None))
  np.testing.assert_array_equal(out_zeroed[:, 1::2, 1::2, 0], 0.0)
  np.testing.assert_array_equal(out_zeroed[:, 0::2, :, 0], np.asarray(out)[:, 0::2, :, 0])
  np.testing.assert_array_equal(out_zeroed[:, :, 0::2, 0], np.asarray(out)[:, :, 0::2, 0])


# ----------------------------------------------------------------------------- GroupNorm.
@pytest.mark.parametrize('shape,groups,dtype', [((3, 6, 6, 16), 8, jnp.float32), ((2, 5, 7, 12), 3, jnp.float32),
                                                ((2, 4, 4, 8), 8, jnp.float32), ((2, 6, 6, 16), 4, jnp.bfloat16)])
def test_group_norm_matches_flax_group_norm_in_value_gradient_and_parameters(shape, groups, dtype):
  """cm_jax's GroupNorm reduces per channel first (a CPU speed-up): the same parameters and maths as flax's."""
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from cm_jax.models import unet  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(3.0 * np.sin(np.arange(math.prod(shape)) * 0.7).reshape(shape) + 1.5, dtype)
  ours, theirs = unet.GroupNorm(groups, dtype=dtype), nn.GroupNorm(num_groups=groups, dtype=dtype)
  shapes_ours = jax.eval_shape(ours.init, jax.random.PRNGKey(0), x)
  assert jax.tree.map(lambda s: (s.shape, s.dtype), shapes_ours) == jax.tree.map(
      lambda s: (s.shape, s.dtype), jax.eval_shape(theirs.init, jax.random.PRNGKey(0), x))
  params = {'params': {'scale': jnp.linspace(0.5, 2.0, shape[-1]), 'bias': jnp.linspace(-1.0, 1.0, shape[-1])}}
  weights = jnp.asarray(np.cos(np.arange(math.prod(shape)) * 0.3).reshape(shape), jnp.float32)

  def loss(module):
    return lambda p, x: jnp.sum(module.apply(p, x).astype(jnp.float32) * weights)

  y_ours, y_theirs = ours.apply(params, x), theirs.apply(params, x)
  assert y_ours.dtype == y_theirs.dtype == dtype
  tol = dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(y_ours, np.float32), np.asarray(y_theirs, np.float32), **tol)
  grads_ours = jax.grad(loss(ours), argnums=(0, 1))(params, x)
  grads_theirs = jax.grad(loss(theirs), argnums=(0, 1))(params, x)
  for g_ours, g_theirs in zip(jax.tree.leaves(grads_ours), jax.tree.leaves(grads_theirs)):
    np.testing.assert_allclose(np.asarray(g_ours, np.float32), np.asarray(g_theirs, np.float32),
                               **(tol if dtype == jnp.bfloat16 else dict(rtol=1e-4, atol=1e-4)))
  # Normalised per (example, group): with unit scale and zero bias each group has mean 0 and variance ~1.
  unit = {'params': {'scale': jnp.ones(shape[-1]), 'bias': jnp.zeros(shape[-1])}}
  plain = unet.GroupNorm(groups).apply(unit, x.astype(jnp.float32))
  grouped = np.asarray(plain).reshape(shape[0], -1, groups, shape[-1] // groups).transpose(0, 2, 1, 3)
  grouped = grouped.reshape(shape[0], groups, -1)
  np.testing.assert_allclose(grouped.mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(grouped.var(-1), 1.0, rtol=1e-3)


def test_group_norm_names_the_config_field_when_groups_do_not_divide_the_channels():
  from cm_jax.models import unet  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r'config.model.num_groups = 3 does not divide the 8 channels'):
    jax.eval_shape(unet.GroupNorm(3).init, jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 8)))
