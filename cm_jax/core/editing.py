"""Editing maths (the edit CLI is cm_jax/edit.py): zero-shot editing with a consistency model (CM Algorithm 4).

`denoise_fn(x_BHWC, sigma_B) -> x0_BHWC` is the consistency function with its parameters bound, as in
cm_jax/core/sampling.py. Images are NHWC in [-1, 1], any channel count unless a task says otherwise.

Maths. An orthogonal transform A (A^-1 = A^T) maps an image to coefficients of the same shape. A mask Omega
over the coefficients marks what the model generates (Omega = 1) and what the reference y fixes (Omega = 0).
With times t_1 > ... > t_N in (eps, T], eps = sigma_min, T = sigma_max:
    y <- A^-1[(A y)(1 - Omega)]                             keep only the known part of the reference
    x <- P(f(y + t_1 z_1, t_1))                             P(x) = A^-1[(A y)(1 - Omega) + (A x) Omega]
    x <- P(f(x + sqrt(t_n^2 - eps^2) z_n, t_n))             n = 2, ..., N
The projection P is applied after every denoising and last, so the result keeps the known coefficients up
to float rounding (bit for bit when A = I). f's output is clipped to [-1, 1] before P when clip=True (as the
official code); the projected result is not clipped, which would change the known part.

Transforms and masks of the tasks:
- inpainting: A = I, Omega = the mask (1 = missing pixel).
- colorization: per pixel, the 3x3 orthogonal Q whose first column is (0.2989, 0.5870, 0.1140) normalised;
  coefficient 0 is the luminance / |(0.2989, 0.5870, 0.1140)|; Omega = (0, 1, 1) over the channels.
- super-resolution by p: per p x p patch of each channel, the p^2 x p^2 orthogonal Q with constant first
  column 1/p; coefficient 0 (p times the patch mean) is known. Coefficient k of a patch is stored at
  patch position (k // p, k % p), so coefficients keep the image's shape and Omega = 0 at [::p, ::p].
- stroke-guided generation (SDEdit): A = I, Omega = 1, the first step noises the stroke image itself.
- interpolation: slerp between two standard normal noises, then x = f(T z, T).
- denoising: x = f(x_noisy, sigma) for a known sigma in [eps, T].

Noise: one key per example (`sampling.example_keys`); `sampling.draw_noise` turns a (B,) batch of keys
into z_1 and z_2..z_N, so example i depends only on keys[i], whatever the batch.

Default times (noise levels sigma, for the CM constants eps = 0.002, T = 80, rho = 7) are points of the
40-point Karras grid t_i = (T^(1/rho) + i/39 (eps^(1/rho) - T^(1/rho)))^rho that the official PyTorch code
(cm/karras_diffusion.py: iterative_inpainting, _colorization, _superres; steps=40) indexes with `ts`.
- Stroke-guided: (5.38, 2.24), the CM paper's times for stroke-guided generation; grid indices 16 and 20.
- Inpainting, colorization, super-resolution: indices (0, 12, 16, 20, 24) = (80, 11.72, 5.38, 2.24, 0.82).
  cm_jax's choice, not the paper's: the index lists behind the paper's editing figures are not in the
  official scripts (openai/consistency_models scripts/launch.sh lists sampling times only). Pure noise at T,
  then four re-noised steps: five network calls. On 64 Fashion-MNIST test images (CT and ECT runs) the
  centre-inpainting MSE to the originals was 0.44 against 0.87 for one step at T, 0.52 for (0, 16, 20) and
  0.41 for seven steps (0, 8, 12, ..., 28).
Other constants need other times: pass ts (e.g. `times_from_indices`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cm_jax.core import sampling

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]

LUMA_WEIGHTS = (0.2989, 0.5870, 0.1140)  # ITU-R BT.601 luma, as the official colorization code.
EDIT_GRID_POINTS = 40  # Karras grid indexed by the official iterative_* editing functions (steps=40).


def times_from_indices(indices: Sequence[int], sigma_min: float, sigma_max: float, rho: float,
                       num_points: int = EDIT_GRID_POINTS) -> tuple[float, ...]:
  """Times of the official code's descending grid: index 0 is T, index num_points - 1 is eps (float64)."""
  i = np.asarray(indices, np.float64)
  if np.any(i < 0) or np.any(i > num_points - 1) or np.any(i != np.round(i)):
    raise ValueError(f'Grid indices {tuple(indices)} must be integers in [0, {num_points - 1}].')
  hi, lo = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
  return tuple(float(t) for t in (hi + i / (num_points - 1) * (lo - hi)) ** rho)


_CM = dict(sigma_min=0.002, sigma_max=80.0, rho=7.0)  # The CM paper's constants (configs/default.py).
STROKE_TIMES = (5.38, 2.24)  # CM paper (SDEdit-style stroke-guided generation); grid indices 16 and 20.
INPAINT_TIMES = times_from_indices((0, 12, 16, 20, 24), **_CM)  # cm_jax's choice (module docstring).
COLORIZE_TIMES = INPAINT_TIMES
SUPERRES_TIMES = INPAINT_TIMES


def validate_edit_times(ts: Sequence[float], sigma_min: float, sigma_max: float) -> tuple[float, ...]:
  """Checks that ts is non-empty, strictly descending and inside (sigma_min, sigma_max]; returns floats."""
  ts = tuple(float(t) for t in ts)
  if not ts:
    raise ValueError('ts is empty; editing needs at least one time t_1 (e.g. sigma_max for one step).')
  for t in ts:
    if not sigma_min < t <= sigma_max:
      raise ValueError(f'Editing time {t} in ts = {ts} is outside ({sigma_min}, {sigma_max}]; each time must '
                       'be above sigma_min and at most sigma_max (pass ts for other model constants).')
  if any(a <= b for a, b in zip(ts, ts[1:])):
    raise ValueError(f'Editing times ts = {ts} must be strictly descending (t_1 > t_2 > ...).')
  return ts


# --------------------------------------------------------------------------------------------------
# Orthogonal transforms: coefficients have the image's shape; inverse = transpose
# --------------------------------------------------------------------------------------------------
class OrthogonalTransform(Protocol):
  """x_BHWC -> A x (coefficients, same shape) and back with A^-1 = A^T. Pure, jit-able, hashable."""

  def forward(self, x_BHWC: jax.Array) -> jax.Array:
    ...

  def inverse(self, a_BHWC: jax.Array) -> jax.Array:
    ...


def orthogonal_completion(first_column: Sequence[float]) -> np.ndarray:
  """An orthogonal matrix Q (float64) whose first column is first_column / |first_column|, completed by QR.

  The sign is fixed so that the first column is positive (QR may return it negated).
  """
  v = np.asarray(first_column, np.float64)
  m = np.eye(len(v))
  m[:, 0] = v / np.linalg.norm(v)
  q, _ = np.linalg.qr(m)
  return -q if q[:, 0].sum() < 0 else q


@dataclasses.dataclass(frozen=True)
class Identity:
  """A = I (inpainting, stroke-guided generation)."""

  def forward(self, x_BHWC: jax.Array) -> jax.Array:
    return x_BHWC

  def inverse(self, a_BHWC: jax.Array) -> jax.Array:
    return a_BHWC


@dataclasses.dataclass(frozen=True)
class Colorization:
  """Per pixel, coefficients a = Q^T x over the 3 channels; a[..., 0] = luminance / |LUMA_WEIGHTS|."""

  def matrix(self) -> np.ndarray:
    return orthogonal_completion(LUMA_WEIGHTS)

  def _check(self, x_BHWC: jax.Array) -> None:
    if x_BHWC.shape[-1] != 3:
      raise ValueError(f'Colorization acts on RGB images (3 channels), got shape {x_BHWC.shape}.')

  def forward(self, x_BHWC: jax.Array) -> jax.Array:
    self._check(x_BHWC)
    return jnp.einsum('...c,cd->...d', x_BHWC, jnp.asarray(self.matrix(), x_BHWC.dtype))

  def inverse(self, a_BHWC: jax.Array) -> jax.Array:
    self._check(a_BHWC)
    return jnp.einsum('...d,cd->...c', a_BHWC, jnp.asarray(self.matrix(), a_BHWC.dtype))


@dataclasses.dataclass(frozen=True)
class SuperResolution:
  """Per p x p patch of each channel, coefficients a = Q^T patch (p^2 values); a_0 = p * patch mean.

  Coefficient k of a patch is stored at its position (k // p, k % p): coefficients keep the image shape.
  """
  factor: int

  def __post_init__(self):
    if not isinstance(self.factor, (int, np.integer)) or self.factor < 1:
      raise ValueError(f'Super-resolution factor must be a positive integer, got {self.factor!r}.')

  def matrix(self) -> np.ndarray:
    return orthogonal_completion(np.ones(self.factor**2))

  def _apply(self, x_BHWC: jax.Array, q: np.ndarray) -> jax.Array:
    b, h, w, c = x_BHWC.shape
    p = self.factor
    check_divisible(h, w, p)
    patches = x_BHWC.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4).reshape(
        b, h // p, w // p, c, p * p)
    out = jnp.einsum('...k,kl->...l', patches, jnp.asarray(q, x_BHWC.dtype))
    return out.reshape(b, h // p, w // p, c, p, p).transpose(0, 1, 4, 2, 5, 3).reshape(b, h, w, c)

  def forward(self, x_BHWC: jax.Array) -> jax.Array:
    return self._apply(x_BHWC, self.matrix())

  def inverse(self, a_BHWC: jax.Array) -> jax.Array:
    return self._apply(a_BHWC, self.matrix().T)


def check_divisible(height: int, width: int, factor: int) -> None:
  if height % factor or width % factor:
    raise ValueError(f'Super-resolution factor {factor} does not divide the image size {height}x{width}; '
                     f'pick a factor that divides both (e.g. {_divisors(height, width)}).')


def _divisors(height: int, width: int) -> list[int]:
  return [p for p in range(2, min(height, width) + 1) if height % p == 0 and width % p == 0]


# --------------------------------------------------------------------------------------------------
# Algorithm 4
# --------------------------------------------------------------------------------------------------
def _omega_like(omega, coeffs_shape: tuple[int, ...], dtype) -> jax.Array:
  omega = jnp.asarray(omega, dtype)
  try:
    shape = jnp.broadcast_shapes(omega.shape, coeffs_shape)
  except ValueError:
    shape = None
  if shape != tuple(coeffs_shape):
    raise ValueError(f'omega of shape {omega.shape} does not broadcast to the coefficients {coeffs_shape}; '
                     'give it shape (H, W, 1), (1, H, W, C), (B, H, W, C) or similar.')
  return omega


def known_part(y_BHWC: jax.Array, omega, transform: OrthogonalTransform) -> jax.Array:
  """A^-1[(A y)(1 - Omega)]: the reference with the generated coefficients set to 0."""
  a_y = transform.forward(y_BHWC)
  return transform.inverse(a_y * (1.0 - _omega_like(omega, a_y.shape, a_y.dtype)))


def edit_from_noise(denoise_fn: DenoiseFn, y_BHWC: jax.Array, omega, transform: OrthogonalTransform,
                    z_BHWC: jax.Array, noise_KBHWC: jax.Array, ts: Sequence[float], *, sigma_min: float,
                    clip: bool = True, start_BHWC: Optional[jax.Array] = None) -> jax.Array:
  """CM Algorithm 4 with given noise: z_BHWC for t_1, noise_KBHWC[k] for ts[k + 1] (K = len(ts) - 1).

  start_BHWC: what is noised to t_1 (default: the known part of y, as Algorithm 4; stroke-guided
  generation passes the stroke image). ts must already be valid (`validate_edit_times`).
  """
  if noise_KBHWC.shape[0] != len(ts) - 1:
    raise ValueError(f'noise_KBHWC has {noise_KBHWC.shape[0]} draws for {len(ts)} times (needs len(ts) - 1).')
  a_y = transform.forward(y_BHWC)
  omega = _omega_like(omega, a_y.shape, a_y.dtype)
  known_a = a_y * (1.0 - omega)
  batch = y_BHWC.shape[0]

  def project(x):
    return transform.inverse(known_a + transform.forward(x) * omega)

  def denoise(x, t):
    x0 = denoise_fn(x, jnp.full((batch,), t, x.dtype))
    return jnp.clip(x0, -1.0, 1.0) if clip else x0

  start = transform.inverse(known_a) if start_BHWC is None else start_BHWC
  x = project(denoise(start + ts[0] * z_BHWC, ts[0]))
  for k, t in enumerate(ts[1:]):
    x = x + jnp.sqrt(t**2 - sigma_min**2) * noise_KBHWC[k]  # As sampling.multistep_sample.
    x = project(denoise(x, t))
  return x


def edit(denoise_fn: DenoiseFn, y_BHWC: jax.Array, omega, transform: OrthogonalTransform, keys: jax.Array,
         ts: Sequence[float], *, sigma_min: float, sigma_max: float, clip: bool = True,
         start_BHWC: Optional[jax.Array] = None) -> jax.Array:
  """CM Algorithm 4 with noise drawn per example from keys, a (B,) batch (`sampling.example_keys`)."""
  ts = validate_edit_times(ts, sigma_min, sigma_max)
  if keys.shape[0] != y_BHWC.shape[0]:
    raise ValueError(f'keys has {keys.shape[0]} keys for {y_BHWC.shape[0]} images; pass one key per image.')
  _omega_like(omega, y_BHWC.shape, y_BHWC.dtype)  # Coefficients have the image's shape: fail before the noise.
  z_BHWC, noise_KBHWC = sampling.draw_noise(keys, y_BHWC.shape, len(ts) - 1)
  return edit_from_noise(denoise_fn, y_BHWC, omega, transform, z_BHWC.astype(y_BHWC.dtype),
                         noise_KBHWC.astype(y_BHWC.dtype), ts, sigma_min=sigma_min, clip=clip,
                         start_BHWC=start_BHWC)


# --------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------
def inpaint(denoise_fn: DenoiseFn, images_BHWC: jax.Array, mask, keys: jax.Array,
            ts: Sequence[float] = INPAINT_TIMES, *, sigma_min: float, sigma_max: float,
            clip: bool = True) -> jax.Array:
  """Fills the pixels where mask = 1 (missing); keeps the others bit for bit. mask broadcasts to images."""
  return edit(denoise_fn, images_BHWC, mask, Identity(), keys, ts, sigma_min=sigma_min, sigma_max=sigma_max,
              clip=clip)


def colorization_omega() -> np.ndarray:
  """Omega of colorization, shape (3,): the luminance coefficient is known, the other two generated."""
  return np.asarray([0.0, 1.0, 1.0], np.float32)


def colorize(denoise_fn: DenoiseFn, images_BHW3: jax.Array, keys: jax.Array,
             ts: Sequence[float] = COLORIZE_TIMES, *, sigma_min: float, sigma_max: float,
             clip: bool = True) -> jax.Array:
  """Colours RGB images keeping their luminance 0.2989 R + 0.5870 G + 0.1140 B (an RGB model is needed).

  For a grayscale picture pass `gray_to_rgb(gray_BHW1)`, whose luminance is the gray value.
  """
  if images_BHW3.shape[-1] != 3:
    raise ValueError(f'colorize needs RGB images and an RGB model (3 channels), got {images_BHW3.shape[-1]} '
                     'channel(s): a grayscale model has no colour to generate. For a grayscale picture and an '
                     'RGB model, pass gray_to_rgb(gray_BHW1).')
  return edit(denoise_fn, images_BHW3, colorization_omega(), Colorization(), keys, ts, sigma_min=sigma_min,
              sigma_max=sigma_max, clip=clip)


def superres_omega(height: int, width: int, factor: int) -> np.ndarray:
  """Omega of super-resolution, shape (1, H, W, 1): 0 at each patch's first coefficient ([::p, ::p])."""
  check_divisible(height, width, factor)
  omega = np.ones((1, height, width, 1), np.float32)
  omega[:, ::factor, ::factor, :] = 0.0
  return omega


def super_resolve(denoise_fn: DenoiseFn, images_BHWC: jax.Array, factor: int, keys: jax.Array,
                  ts: Sequence[float] = SUPERRES_TIMES, *, sigma_min: float, sigma_max: float,
                  clip: bool = True) -> jax.Array:
  """Full-resolution images whose factor x factor patch means equal those of images_BHWC.

  images_BHWC: full-resolution images whose patch means are the known low-resolution pixels, e.g.
  `upsample_nearest(low_res, factor)` or any image with those means (only the means are used).
  """
  _, h, w, _ = images_BHWC.shape
  return edit(denoise_fn, images_BHWC, superres_omega(h, w, factor), SuperResolution(factor), keys, ts,
              sigma_min=sigma_min, sigma_max=sigma_max, clip=clip)


def stroke_guided(denoise_fn: DenoiseFn, strokes_BHWC: jax.Array, keys: jax.Array,
                  ts: Sequence[float] = STROKE_TIMES, *, sigma_min: float, sigma_max: float,
                  clip: bool = True) -> jax.Array:
  """SDEdit with a consistency model: x = f(strokes + t_1 z, t_1), then re-noise and denoise at t_2, ...

  Algorithm 4 with A = I and Omega = 1 (nothing kept), starting from the stroke image itself.
  """
  return edit(denoise_fn, strokes_BHWC, 1.0, Identity(), keys, ts, sigma_min=sigma_min, sigma_max=sigma_max,
              clip=clip, start_BHWC=strokes_BHWC)


def slerp(z1_BHWC: jax.Array, z2_BHWC: jax.Array, alphas_A: jax.Array) -> jax.Array:
  """Spherical interpolation per example: sin((1-a) th)/sin th z1 + sin(a th)/sin th z2, shape (A, B, H, W, C).

  th is the angle between z1 and z2. For (near-)parallel noises the formula tends to linear interpolation,
  which is used where sin th < 1e-6.
  """
  axes = tuple(range(1, z1_BHWC.ndim))
  dot = jnp.sum(z1_BHWC * z2_BHWC, axis=axes)
  norms = jnp.sqrt(jnp.sum(z1_BHWC**2, axis=axes) * jnp.sum(z2_BHWC**2, axis=axes))
  theta_B = jnp.arccos(jnp.clip(dot / norms, -1.0, 1.0))
  a = jnp.asarray(alphas_A, z1_BHWC.dtype)[:, None]  # (A, 1)
  sin_theta = jnp.sin(theta_B)
  parallel = sin_theta < 1e-6
  safe_sin = jnp.where(parallel, 1.0, sin_theta)
  w1 = jnp.where(parallel, 1.0 - a, jnp.sin((1.0 - a) * theta_B) / safe_sin)  # (A, B)
  w2 = jnp.where(parallel, a, jnp.sin(a * theta_B) / safe_sin)
  expand = (...,) + (None,) * (z1_BHWC.ndim - 1)
  return w1[expand] * z1_BHWC + w2[expand] * z2_BHWC


def interpolate(denoise_fn: DenoiseFn, z1_BHWC: jax.Array, z2_BHWC: jax.Array, alphas_A, *, sigma_max: float,
                clip: bool = True) -> jax.Array:
  """One-step samples x = f(T z, T) along the slerp path from z1 to z2 (standard normal): (A, B, H, W, C)."""
  z_ABHWC = slerp(z1_BHWC, z2_BHWC, alphas_A)
  flat = z_ABHWC.reshape((-1,) + z_ABHWC.shape[2:])
  x = denoise_fn(sigma_max * flat, jnp.full((flat.shape[0],), sigma_max, flat.dtype))
  x = jnp.clip(x, -1.0, 1.0) if clip else x
  return x.reshape(z_ABHWC.shape)


def denoise(denoise_fn: DenoiseFn, x_noisy_BHWC: jax.Array, sigma: float, *, sigma_min: float,
            sigma_max: float, clip: bool = True) -> jax.Array:
  """x = f(x_noisy, sigma) for images with Gaussian noise of known std sigma in [sigma_min, sigma_max].

  At sigma = sigma_min the result is x_noisy itself, the boundary condition f(x, eps) = x, without a network
  call: with the boundary at 0 (sCT / sCD runs) the network's noise input ln(sigma) / 4 would be -inf.
  """
  sigma = float(sigma)
  if not sigma_min <= sigma <= sigma_max:
    raise ValueError(f'sigma = {sigma} is outside [{sigma_min}, {sigma_max}]; the consistency function is '
                     'defined for noise levels between sigma_min and sigma_max.')
  if sigma == sigma_min:
    x = jnp.asarray(x_noisy_BHWC)
  else:
    x = denoise_fn(x_noisy_BHWC, jnp.full((x_noisy_BHWC.shape[0],), sigma, x_noisy_BHWC.dtype))
  return jnp.clip(x, -1.0, 1.0) if clip else x


# --------------------------------------------------------------------------------------------------
# Degradations and helpers (numpy or jax arrays)
# --------------------------------------------------------------------------------------------------
def luminance(images_BHW3):
  """0.2989 R + 0.5870 G + 0.1140 B, shape (B, H, W, 1)."""
  if images_BHW3.shape[-1] != 3:
    raise ValueError(f'luminance needs RGB images (3 channels), got shape {images_BHW3.shape}.')
  w = np.asarray(LUMA_WEIGHTS, np.float32)
  return (images_BHW3 * w).sum(axis=-1, keepdims=True)


def gray_to_rgb(gray_BHW1):
  """An RGB image of equal channels whose luminance is exactly the gray value: gray / sum(LUMA_WEIGHTS)."""
  if gray_BHW1.shape[-1] != 1:
    raise ValueError(f'gray_to_rgb needs one-channel images, got shape {gray_BHW1.shape}.')
  xp = jnp if isinstance(gray_BHW1, jax.Array) else np
  return xp.concatenate([gray_BHW1] * 3, axis=-1) / np.float32(sum(LUMA_WEIGHTS))


def patch_average(images_BHWC, factor: int):
  """Each factor x factor patch of each channel replaced by its mean (the image super-resolution keeps)."""
  b, h, w, c = images_BHWC.shape
  check_divisible(h, w, factor)
  p = factor
  xp = jnp if isinstance(images_BHWC, jax.Array) else np
  means = images_BHWC.reshape(b, h // p, p, w // p, p, c).mean(axis=(2, 4), keepdims=True)
  return xp.broadcast_to(means, (b, h // p, p, w // p, p, c)).reshape(b, h, w, c)


def upsample_nearest(low_res_BhwC, factor: int):
  """Nearest-neighbour upsampling (each pixel becomes a factor x factor patch): input of super_resolve."""
  if factor < 1:
    raise ValueError(f'factor must be >= 1, got {factor}.')
  xp = jnp if isinstance(low_res_BhwC, jax.Array) else np
  return xp.repeat(xp.repeat(low_res_BhwC, factor, axis=1), factor, axis=2)


MASKS = ('center', 'left', 'right', 'top', 'bottom', 'checker')


def named_mask(name: str, height: int, width: int) -> np.ndarray:
  """A (1, H, W, 1) float32 inpainting mask, 1 = missing: 'center' (the middle half square), 'left' /
  'right' / 'top' / 'bottom' (that half), 'checker' (4 x 4 blocks, alternate ones missing)."""
  mask = np.zeros((height, width), np.float32)
  rows, cols = np.arange(height)[:, None], np.arange(width)[None, :]
  if name == 'center':
    mask[height // 4:height - height // 4, width // 4:width - width // 4] = 1.0
  elif name == 'left':
    mask[:, :width // 2] = 1.0
  elif name == 'right':
    mask[:, width // 2:] = 1.0
  elif name == 'top':
    mask[:height // 2, :] = 1.0
  elif name == 'bottom':
    mask[height // 2:, :] = 1.0
  elif name == 'checker':
    mask = (((rows * 4 // height) + (cols * 4 // width)) % 2).astype(np.float32)
  else:
    raise ValueError(f'Unknown mask {name!r}; choose one of {MASKS} or give a PNG path.')
  return mask[None, :, :, None]

