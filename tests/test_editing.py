"""Zero-shot editing (CM Algorithm 4): transforms, the algorithm's invariants on a random-weight tiny UNet
(they hold for any f), and the CLI end to end on a tiny trained run (mock MNIST)."""

import functools
import inspect
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from cm_jax import edit
from cm_jax import inference
from cm_jax import models
from cm_jax import train
from cm_jax.configs import test as test_config
from cm_jax.core import editing
from cm_jax.core import karras
from cm_jax.core import sampling
from cm_jax.core.denoiser import Denoiser
import checkpoint_utils

EPS, T = 0.002, 80.0
BOUNDS = dict(sigma_min=EPS, sigma_max=T)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_denoise_fn(channels: int):
  """f of the tiny test UNet with random N(0, 0.2^2) weights, jitted; images 8x8xchannels. (The real init
  zeroes the output layer, which would make f = c_skip x; compiling it also takes ~40 s on a 2-core CPU.)"""
  config = test_config.get_config()
  config.model.ch_mult = (1,)  # One level: half the compile time; the properties hold for any f.
  denoiser = Denoiser(models.create_model(config.model), sigma_data=0.5, sigma_min=EPS)
  shapes = jax.eval_shape(lambda: denoiser.model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, channels)),
                                                      jnp.zeros((1,)), train=False)['params'])
  rng = np.random.default_rng(channels)
  params = jax.tree.map(lambda s: jnp.asarray(0.2 * rng.normal(size=s.shape), s.dtype), shapes)
  return jax.jit(functools.partial(denoiser, params))


@pytest.fixture(scope='module')
def gray_fn():
  return tiny_denoise_fn(1)


@pytest.fixture(scope='module')
def rgb_fn():
  return tiny_denoise_fn(3)


def images(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, size=shape).astype(np.float32))


def keys(n, start=0, seed=0):
  return sampling.example_keys(jax.random.PRNGKey(seed), start, n)


def dense_matrix(fn, shape):
  """The matrix of a linear map of images of `shape` (one example), from the basis images."""
  dim = int(np.prod(shape))
  basis = jnp.eye(dim, dtype=jnp.float32).reshape((dim,) + shape)
  return np.asarray(fn(basis)).reshape(dim, dim).T  # Column j = image of basis vector j.


# --------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('transform,channels', [
    (editing.Identity(), 2), (editing.Colorization(), 3), (editing.SuperResolution(2), 2),
    (editing.SuperResolution(4), 1)])
def test_transforms_are_orthogonal(transform, channels):
  shape = (8, 8, channels)
  a = dense_matrix(transform.forward, shape)
  a_inv = dense_matrix(transform.inverse, shape)
  np.testing.assert_allclose(a.T @ a, np.eye(len(a)), atol=1e-6)
  np.testing.assert_allclose(a_inv @ a, np.eye(len(a)), atol=1e-6)
  np.testing.assert_allclose(a_inv, a.T, atol=1e-6)


def test_transform_matrices_have_the_required_first_columns():
  luma = np.asarray([0.2989, 0.5870, 0.1140])
  q = editing.Colorization().matrix()
  np.testing.assert_allclose(q.T @ q, np.eye(3), atol=1e-12)
  np.testing.assert_allclose(q[:, 0], luma / np.linalg.norm(luma), atol=1e-12)
  for p in (2, 3, 4):
    q = editing.SuperResolution(p).matrix()
    assert q.shape == (p * p, p * p)
    np.testing.assert_allclose(q.T @ q, np.eye(p * p), atol=1e-12)
    np.testing.assert_allclose(q[:, 0], np.full(p * p, 1.0 / p), atol=1e-12)  # Positive, not -1/p.
  x = images(0, (2, 8, 8, 3))
  # Coefficient 0 is luminance / |luma|, and p times the patch mean, stored at the patch's first pixel.
  np.testing.assert_allclose(editing.Colorization().forward(x)[..., :1] * np.linalg.norm(luma),
                             editing.luminance(x), atol=1e-6)
  coeffs = editing.SuperResolution(4).forward(x)
  np.testing.assert_allclose(coeffs[:, ::4, ::4, :] / 4, editing.patch_average(x, 4)[:, ::4, ::4, :], atol=1e-6)


# --------------------------------------------------------------------------------------------------
# The algorithm's invariants
# --------------------------------------------------------------------------------------------------
def test_inpainting_keeps_known_pixels_bitwise_and_fills_the_mask(gray_fn):
  x = images(1, (3, 8, 8, 1))
  mask = editing.named_mask('center', 8, 8)
  out = np.asarray(editing.inpaint(gray_fn, x, mask, keys(3), **BOUNDS))
  known = np.broadcast_to(mask == 0, out.shape)
  np.testing.assert_array_equal(out[known], np.asarray(x)[known])
  missing = out[~known]
  assert np.all(np.abs(missing) <= 1.0)  # f's output, clipped.
  assert np.mean(np.abs(missing - np.asarray(x)[~known])) > 0.05 and np.std(missing) > 0.01
  # A (H, W, 1) mask broadcasts the same way.
  np.testing.assert_array_equal(np.asarray(editing.inpaint(gray_fn, x, mask[0], keys(3), **BOUNDS)), out)


def test_clipping_is_of_f_before_the_projection():
  """f = identity returns y + t z, far outside [-1, 1]: clipped where generated, the known part untouched
  even where it lies outside [-1, 1]."""
  y = images(15, (3, 8, 8, 1)) * 1.5
  mask = editing.named_mask('left', 8, 8)
  identity = lambda x, sigma: x
  known = np.broadcast_to(mask == 0, y.shape)
  for clip in (True, False):
    out = np.asarray(editing.inpaint(identity, y, mask, keys(3), clip=clip, **BOUNDS))
    np.testing.assert_array_equal(out[known], np.asarray(y)[known])
    assert np.max(np.abs(out[known])) > 1.2
    if clip:
      assert np.max(np.abs(out[~known])) == 1.0
    else:
      assert np.max(np.abs(out[~known])) > 2.0


@pytest.mark.parametrize('factor', [2, 4])
def test_super_resolution_keeps_patch_means(gray_fn, factor):
  low = images(2, (3, 8 // factor, 8 // factor, 1))
  y = editing.upsample_nearest(low, factor)
  out = editing.super_resolve(gray_fn, y, factor, keys(3), **BOUNDS)
  np.testing.assert_allclose(np.asarray(editing.patch_average(out, factor)), np.asarray(y), atol=1e-5)
  assert np.mean(np.abs(np.asarray(out - y))) > 0.05  # Detail was generated inside the patches.


def test_colorization_keeps_luminance(rgb_fn):
  x = images(3, (3, 8, 8, 3))
  out = editing.colorize(rgb_fn, x, keys(3), **BOUNDS)
  np.testing.assert_allclose(np.asarray(editing.luminance(out)), np.asarray(editing.luminance(x)), atol=1e-5)
  gray = images(4, (3, 8, 8, 1))
  out = np.asarray(editing.colorize(rgb_fn, editing.gray_to_rgb(gray), keys(3), **BOUNDS))
  w = np.asarray([0.2989, 0.5870, 0.1140], np.float32)
  np.testing.assert_allclose((out * w).sum(-1, keepdims=True), np.asarray(gray), atol=1e-5)
  assert np.mean(np.abs(out[..., 0] - out[..., 2])) > 0.05  # Coloured, not gray.


def test_omega_zero_returns_the_reference(gray_fn, rgb_fn):
  x = images(5, (3, 8, 8, 1))
  out = editing.edit(gray_fn, x, 0.0, editing.Identity(), keys(3), editing.INPAINT_TIMES, **BOUNDS)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
  x3 = images(6, (3, 8, 8, 3))
  out = editing.edit(rgb_fn, x3, np.zeros((8, 8, 3)), editing.Colorization(), keys(3), editing.INPAINT_TIMES,
                     **BOUNDS)
  np.testing.assert_allclose(np.asarray(out), np.asarray(x3), atol=1e-6)


def test_omega_one_identity_is_multistep_sampling(gray_fn):
  """Nothing known, A = I: Algorithm 4 is Algorithm 1 with the same noise (pins sqrt(t^2 - eps^2))."""
  ts = (T, 5.0, 1.0, 0.1, 0.003)  # At 0.003, sqrt(t^2 - eps^2) = 0.00224 is far from t.
  k = keys(3, seed=7)
  z, noise = sampling.draw_noise(k, (3, 8, 8, 1), 4)
  want = sampling.multistep_sample(gray_fn, z, noise, ts[1:], **BOUNDS)
  got = editing.edit(gray_fn, images(7, (3, 8, 8, 1)), 1.0, editing.Identity(), k, ts, **BOUNDS)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_stroke_guided_defaults_and_start_from_the_strokes():
  assert editing.STROKE_TIMES == (5.38, 2.24)
  assert inspect.signature(editing.stroke_guided).parameters['ts'].default == (5.38, 2.24)
  # The paper's times are points 16 and 20 of the official 40-point Karras grid.
  np.testing.assert_allclose(editing.times_from_indices((16, 20), EPS, T, 7.0), (5.38, 2.24), rtol=2e-4)
  calls = []

  def recorder(x, sigma):
    calls.append((np.asarray(x), np.asarray(sigma)))
    return jnp.zeros_like(x)

  strokes = images(8, (3, 8, 8, 1))
  k = keys(3)
  out = editing.stroke_guided(recorder, strokes, k, **BOUNDS)
  z, noise = sampling.draw_noise(k, strokes.shape, 1)
  assert [float(s[0]) for _, s in calls] == [np.float32(5.38), np.float32(2.24)]
  np.testing.assert_allclose(calls[0][0], strokes + 5.38 * z, atol=1e-5)  # Noised strokes, not zeros.
  np.testing.assert_allclose(calls[1][0], np.sqrt(2.24**2 - EPS**2) * noise[0], atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_slerp_endpoints_and_norm():
  rng = np.random.default_rng(9)
  z1 = rng.normal(size=(3, 4, 4, 2)).astype(np.float32)
  z2 = rng.normal(size=(3, 4, 4, 2)).astype(np.float32)
  norm = lambda z: np.linalg.norm(z.reshape(3, -1), axis=1)[:, None, None, None]
  z2 *= norm(z1) / norm(z2)  # Equal norms: slerp stays on their sphere.
  alphas = np.asarray([0.0, 0.25, 0.5, 1.0], np.float32)
  z = np.asarray(editing.slerp(jnp.asarray(z1), jnp.asarray(z2), alphas))
  assert z.shape == (4, 3, 4, 4, 2)
  np.testing.assert_allclose(z[0], z1, atol=1e-5)
  np.testing.assert_allclose(z[-1], z2, atol=1e-5)
  norms = np.linalg.norm(z.reshape(4, 3, -1), axis=-1)
  np.testing.assert_allclose(norms, np.broadcast_to(norms[0], norms.shape), rtol=1e-5)  # On the sphere ...
  lerp_mid = np.linalg.norm((0.5 * (z1 + z2)).reshape(3, -1), axis=-1)
  assert np.all(lerp_mid < 0.9 * norms[2])  # ... where the straight line cuts inside it.
  same = np.asarray(editing.slerp(jnp.asarray(z1), jnp.asarray(z1), alphas))  # Parallel: the limit, finite.
  np.testing.assert_allclose(same, np.broadcast_to(z1, same.shape), atol=1e-5)


def test_interpolate_and_denoise_are_one_call_of_f(gray_fn):
  z1, z2 = images(10, (3, 8, 8, 1)), images(11, (3, 8, 8, 1))
  affine = lambda x, sigma: 0.02 * x + 0.001 * sigma[:, None, None, None]
  x = editing.interpolate(affine, z1, z2, [0.0, 0.5, 1.0], sigma_max=T, clip=False)
  assert x.shape == (3, 3, 8, 8, 1)
  np.testing.assert_allclose(np.asarray(x[0]), 0.02 * T * z1 + 0.001 * T, atol=1e-5)
  np.testing.assert_allclose(np.asarray(x[2]), 0.02 * T * z2 + 0.001 * T, atol=1e-5)
  np.testing.assert_allclose(np.asarray(x[1]),
                             0.02 * T * editing.slerp(z1, z2, np.asarray([0.5]))[0] + 0.001 * T, atol=1e-5)
  assert np.all(np.abs(np.asarray(editing.interpolate(affine, z1, z2, [0.5], sigma_max=T))) <= 1.0)
  noisy = images(12, (3, 8, 8, 1)) * 2
  f = np.asarray(gray_fn(noisy, jnp.full((3,), 0.5)))
  np.testing.assert_array_equal(np.asarray(editing.denoise(gray_fn, noisy, 0.5, clip=False, **BOUNDS)), f)
  np.testing.assert_array_equal(np.asarray(editing.denoise(gray_fn, noisy, 0.5, **BOUNDS)), np.clip(f, -1, 1))
  for sigma in (0.001, 81.0):
    with pytest.raises(ValueError, match='sigma'):
      editing.denoise(gray_fn, noisy, sigma, **BOUNDS)


def test_denoise_at_the_boundary_returns_the_input_also_with_the_boundary_at_zero():
  """f(x, sigma_min) = x exactly. With sCM's boundary at 0 the network's noise input ln(0) / 4 is -inf and the
  preconditioned call is NaN (c_out = 0 times an infinite output); denoise answers with the boundary condition."""
  net = lambda x_in, c_noise: jnp.tanh(x_in) * c_noise[:, None, None, None]
  scm_fn = lambda x, sigma: karras.precondition(net, x, sigma, sigma_data=0.5, sigma_min=0.0)
  noisy = images(15, (2, 8, 8, 1)) * 2
  assert np.isnan(np.asarray(scm_fn(noisy, jnp.zeros((2,))))).any()  # What a network call at sigma = 0 gives.
  np.testing.assert_array_equal(np.asarray(editing.denoise(scm_fn, noisy, 0.0, sigma_min=0.0, sigma_max=T,
                                                           clip=False)), noisy)
  np.testing.assert_array_equal(np.asarray(editing.denoise(scm_fn, noisy, 0.0, sigma_min=0.0, sigma_max=T)),
                                np.clip(noisy, -1, 1))
  assert np.all(np.isfinite(np.asarray(editing.denoise(scm_fn, noisy, 0.01, sigma_min=0.0, sigma_max=T))))


def test_each_example_depends_only_on_its_key(gray_fn):
  """Example 1 keeps its image and key in another batch (other images and keys around it): same result."""
  x, others = images(13, (3, 8, 8, 1)), images(14, (3, 8, 8, 1))
  mask = editing.named_mask('checker', 8, 8)
  k, other_keys = keys(3, seed=4), keys(3, start=10, seed=4)
  batch = np.asarray(editing.inpaint(gray_fn, x, mask, k, **BOUNDS))
  mixed_x = jnp.stack([others[0], x[1], others[2]])
  mixed_keys = jnp.stack([other_keys[0], k[1], other_keys[2]])
  mixed = np.asarray(editing.inpaint(gray_fn, mixed_x, mask, mixed_keys, **BOUNDS))
  np.testing.assert_allclose(mixed[1], batch[1], atol=1e-5)  # Up to float rounding of the convolutions.
  assert not np.allclose(mixed[0], batch[0], atol=1e-3)
  shifted = np.asarray(editing.inpaint(gray_fn, x, mask, other_keys, **BOUNDS))  # Same images, other keys.
  assert not np.allclose(shifted[1], batch[1], atol=1e-3)


def test_bad_inputs_raise_clear_errors(gray_fn):
  x = images(14, (3, 8, 8, 1))
  with pytest.raises(ValueError, match='factor 3 does not divide the image size 8x8'):
    editing.super_resolve(gray_fn, x, 3, keys(3), **BOUNDS)
  with pytest.raises(ValueError, match='colorize needs RGB images.*1 channel'):
    editing.colorize(gray_fn, x, keys(3), **BOUNDS)
  with pytest.raises(ValueError, match='strictly descending'):
    editing.inpaint(gray_fn, x, 1.0, keys(3), (1.0, 5.0), **BOUNDS)
  with pytest.raises(ValueError, match=r'outside \(0.002, 80.0\]'):
    editing.inpaint(gray_fn, x, 1.0, keys(3), (100.0, 5.0), **BOUNDS)
  with pytest.raises(ValueError, match='ts is empty'):
    editing.inpaint(gray_fn, x, 1.0, keys(3), (), **BOUNDS)
  with pytest.raises(ValueError, match='does not broadcast'):
    editing.inpaint(gray_fn, x, np.ones((4, 4, 1)), keys(3), **BOUNDS)
  with pytest.raises(ValueError, match='one key per image'):
    editing.inpaint(gray_fn, x, 1.0, keys(2), **BOUNDS)
  with pytest.raises(ValueError, match='Unknown mask'):
    editing.named_mask('circle', 8, 8)


# --------------------------------------------------------------------------------------------------
# CLI on a tiny trained run
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def ct_run(tmp_path_factory):
  """4 CT steps of the tiny test config, with one UNet level for faster compiles, on mock MNIST (28x28x1)."""
  config = test_config.get_config('ct')
  config.data.name, config.data.source = 'mnist', 'tfds'
  config.model.ch_mult = (1,)
  config.training.checkpoint_every = config.training.log_every = 4
  config.training.num_eval_samples = 1  # The sample grid written at the last step.
  workdir = tmp_path_factory.mktemp('ct')
  with tfds.testing.mock_data(num_examples=16):
    train.train_and_evaluate(config, str(workdir))
  return str(workdir)


def run_edit(*args):
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or '')
  return subprocess.run([sys.executable, '-m', 'cm_jax.edit', *args], capture_output=True, text=True,
                        cwd=REPO_ROOT, env=env, timeout=600)


def test_command_line_inpaint_end_to_end(ct_run, tmp_path):
  clean = np.random.default_rng(0).integers(0, 256, size=(3, 28, 28), dtype=np.uint8)  # NHW, as sample.py.
  np.savez(tmp_path / 'in.npz', clean)
  out = tmp_path / 'out'
  result = run_edit(f'--workdir={ct_run}', '--task=inpaint', f'--input={tmp_path / "in.npz"}', f'--out={out}',
                    '--mask=left', '--num=2', '--ts=80,2')
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'Wrote {out}/inpaint.npz' in result.stdout and f'Wrote {out}/inpaint.png' in result.stdout
  assert os.path.getsize(out / 'inpaint.png') > 0
  saved = np.load(out / 'inpaint.npz')
  assert sorted(saved) == ['degraded', 'original', 'result']
  assert all(saved[k].dtype == np.uint8 and saved[k].shape == (2, 28, 28, 1) for k in saved)
  np.testing.assert_array_equal(saved['original'][..., 0], clean[:2])
  np.testing.assert_array_equal(saved['result'][:, :, 14:], saved['original'][:, :, 14:])  # Known right half.
  assert not np.array_equal(saved['result'][:, :, :14], saved['original'][:, :, :14])


def test_command_line_refuses_an_edm_run_and_wrong_sizes(ct_run, tmp_path):
  fake = tmp_path / 'edm_run'
  shutil.copytree(ct_run, fake)
  checkpoint_utils.rewrite_saved_config(fake, lambda saved: saved['loss'].update(name='edm'))
  result = run_edit(f'--workdir={fake}', '--task=interpolate', f'--out={tmp_path / "out"}')
  assert result.returncode != 0 and 'EDM diffusion model' in result.stderr
  assert 'editing needs a consistency model' in result.stderr
  model = inference.load(ct_run)
  with pytest.raises(ValueError, match='are 32x32, but the model makes 28x28'):
    edit.run_task(model, 'inpaint', np.zeros((2, 32, 32, 1), np.uint8))
  with pytest.raises(ValueError, match='colorize needs an RGB model'):
    edit.run_task(model, 'colorize', np.zeros((2, 28, 28, 1), np.uint8))
  with pytest.raises(ValueError, match='3 channel.*model 1'):
    edit.run_task(model, 'denoise', np.zeros((2, 28, 28, 3), np.uint8))


def test_default_editing_times_start_where_sampling_starts():
  from cm_jax import edit  # pylint: disable=g-import-not-at-top
  assert edit.default_times('inpaint', 80.0, 80.0) == editing.INPAINT_TIMES
  assert edit.default_times('inpaint', 40.0, 80.0) == (40.0,) + editing.INPAINT_TIMES[1:]
  assert edit.default_times('superres', 40.0, 80.0)[0] == 40.0
  assert edit.default_times('stroke', 40.0, 80.0) == editing.STROKE_TIMES  # Starts below either.
  assert edit.default_times('inpaint', 10.0, 80.0) == (10.0,) + editing.INPAINT_TIMES[2:]  # 11.72 dropped.
