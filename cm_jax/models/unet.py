"""A DDPM++/ADM-style UNet (Linen) for the raw network F(c_in x, c_noise[, label]).

The consistency / EDM preconditioning lives in cm_jax/core/karras.py; this module only maps
(x_in_BHWC, c_noise_B, labels_B) to an output of the same shape as x_in.

Precision: parameters are always float32; every layer computes in `dtype` (float32 or bfloat16). The noise
embedding's sin/cos features are computed in float32, GroupNorm statistics are float32 whatever `dtype` (GroupNorm
below, like flax's, reduces and normalises in float32 and casts only the result), the attention softmax runs in
float32, and the output is cast back to float32. The time and class embeddings, their projections in every
residual block and the adaptive-weight head compute in float32 too (as ADM keeps its embedding MLP and linear
layers in float32): only the convolutions, norms' outputs and attention take `dtype`.
With head_channels = 0, scale_shift, resblock_updown and class_conditional off, the parameter tree and the
outputs are those of the original cm_jax UNet, so older checkpoints load unchanged.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
SQRT2 = float(np.sqrt(2.0))  # A Python float: weakly typed, so bf16 activations stay bf16.


class FourierEmbedding(nn.Module):
  """Random Fourier features of c_noise with a fixed (non-trainable) frequency matrix, in float32.

  Frequencies ~ N(0, scale^2): scale 16 in the official CM code, 0.02 in iCT.
  """
  dim: int
  scale: float

  @nn.compact
  def __call__(self, c_noise_B: jax.Array) -> jax.Array:
    # Stored as a parameter (so it is checkpointed with the model) but never trained.
    w_D = jax.lax.stop_gradient(self.param('freqs', nn.initializers.normal(stddev=self.scale), (self.dim // 2,)))
    proj_BD = c_noise_B.astype(jnp.float32)[:, None] * w_D[None, :] * 2 * np.pi
    return jnp.concatenate([jnp.sin(proj_BD), jnp.cos(proj_BD)], axis=-1)


class PositionalEmbedding(nn.Module):
  """Transformer-style sinusoidal embedding of scale * c_noise (scale 1000 as in the PyTorch CM code), float32."""
  dim: int
  scale: float
  max_period: float = 10000.0

  @nn.compact
  def __call__(self, c_noise_B: jax.Array) -> jax.Array:
    half = self.dim // 2
    freqs_D = jnp.exp(-np.log(self.max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args_BD = (self.scale * c_noise_B.astype(jnp.float32))[:, None] * freqs_D[None, :]
    return jnp.concatenate([jnp.cos(args_BD), jnp.sin(args_BD)], axis=-1)


def downsample_2x(x_BHWC: jax.Array) -> jax.Array:
  """2x2 average pooling."""
  b, h, w, c = x_BHWC.shape
  return x_BHWC.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def upsample_2x(x_BHWC: jax.Array) -> jax.Array:
  """Nearest-neighbour 2x upsampling."""
  return jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2)


RESAMPLERS = {'none': lambda x: x, 'down': downsample_2x, 'up': upsample_2x}


def space_to_depth(x_BHWC: jax.Array, p: int) -> jax.Array:
  """(B, H, W, C) -> (B, H/p, W/p, p*p*C): each p x p patch becomes one position (channel order (dy, dx, c))."""
  b, h, w, c = x_BHWC.shape
  x = x_BHWC.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x_BHWC: jax.Array, p: int) -> jax.Array:
  """The inverse of space_to_depth: (B, H, W, p*p*C) -> (B, H*p, W*p, C)."""
  b, h, w, c = x_BHWC.shape
  x = x_BHWC.reshape(b, h, w, p, p, c // (p * p)).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * p, w * p, c // (p * p))


class GroupNorm(nn.Module):
  """Group normalisation with flax.linen.GroupNorm's parameters ('scale', 'bias') and maths, faster on CPU.

  As flax: statistics in float32 over H, W and each group's channels, var = E[x^2] - E[x]^2 clamped at 0,
  epsilon 1e-6, y = (x - mean) * rsqrt(var + epsilon) * scale + bias, cast to `dtype`. Unlike flax, the
  statistics are first reduced per channel over the spatial axes and then over each group's channels on the
  small (B, C) array, so no activation is reshaped to (..., groups, C / groups): with 16 channels in 8 groups
  that minor dimension of 2 leaves XLA:CPU's loops unvectorised (2-3x slower forward and backward at 28x28,
  benchmarks/README.md). The parameter tree is flax's, so checkpoints load either way.
  """
  num_groups: int
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    b, c = x_BHWC.shape[0], x_BHWC.shape[-1]
    if self.num_groups <= 0 or c % self.num_groups:
      raise ValueError(f'config.model.num_groups = {self.num_groups} does not divide the {c} channels of a '
                       'GroupNorm layer.')
    group = c // self.num_groups
    scale_C = self.param('scale', nn.initializers.ones, (c,))
    bias_C = self.param('bias', nn.initializers.zeros, (c,))
    x = x_BHWC.astype(jnp.float32)
    spatial = tuple(range(1, x.ndim - 1))
    mean_BG = jnp.mean(x, axis=spatial).reshape(b, self.num_groups, group).mean(-1)
    mean_sq_BG = jnp.mean(jnp.square(x), axis=spatial).reshape(b, self.num_groups, group).mean(-1)
    var_BG = jnp.maximum(0.0, mean_sq_BG - jnp.square(mean_BG))
    mean_BC = jnp.repeat(mean_BG, group, axis=-1)
    mul_BC = jnp.repeat(jax.lax.rsqrt(var_BG + self.epsilon), group, axis=-1) * scale_C
    per_channel = (slice(None),) + (None,) * len(spatial) + (slice(None),)  # (B, C) -> (B, 1, 1, C)
    return ((x - mean_BC[per_channel]) * mul_BC[per_channel] + bias_C).astype(self.dtype)


class ResBlock(nn.Module):
  """GroupNorm-SiLU-Conv twice, with the embedding added (or, scale_shift, scaling and shifting the second norm).

  resample 'down' / 'up' average-pools / nearest-upsamples both branches by 2 after the first norm (BigGAN, ADM).
  """
  out_ch: int
  num_groups: int
  dropout: float
  scale_shift: bool = False
  resample: str = 'none'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC: jax.Array, temb_BD: jax.Array, train: bool) -> jax.Array:
    resample = RESAMPLERS[self.resample]
    h = nn.silu(GroupNorm(num_groups=self.num_groups, dtype=self.dtype)(x_BHWC))
    h = nn.Conv(self.out_ch, (3, 3), dtype=self.dtype)(resample(h))
    x_BHWC = resample(x_BHWC)
    # The embedding's projection computes in float32 (as ADM's linear layers) and only its result takes `dtype`.
    emb_BE = nn.Dense(2 * self.out_ch if self.scale_shift else self.out_ch, dtype=jnp.float32)(
        nn.silu(temb_BD.astype(jnp.float32))).astype(self.dtype)
    h_norm = GroupNorm(num_groups=self.num_groups, dtype=self.dtype)
    if self.scale_shift:
      scale_BC, shift_BC = jnp.split(emb_BE[:, None, None, :], 2, axis=-1)
      h = h_norm(h) * (1 + scale_BC) + shift_BC
    else:
      h = h_norm(h + emb_BE[:, None, None, :])
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    h = nn.Conv(self.out_ch, (3, 3), kernel_init=nn.initializers.variance_scaling(1e-10, 'fan_avg', 'uniform'),
                dtype=self.dtype)(h)
    if x_BHWC.shape[-1] != self.out_ch:
      x_BHWC = nn.Conv(self.out_ch, (1, 1), dtype=self.dtype)(x_BHWC)
    return (x_BHWC + h) / SQRT2


class AdaptiveWeight(nn.Module):
  """phi(c_noise), the log-variance of sCM's adaptive loss weight e^-phi ||.||^2 / D + phi (Lu & Song 2024):
  a linear map of its own Fourier features of c_noise (frequencies N(0, 1), as EDM2's uncertainty head), in
  float32, zero-initialised (weight 1 at the start). A function of the noise level only: no class input."""
  channels: int = 128

  @nn.compact
  def __call__(self, c_noise_B: jax.Array) -> jax.Array:
    features_BD = FourierEmbedding(self.channels, scale=1.0)(c_noise_B)
    return nn.Dense(1, kernel_init=nn.initializers.zeros, dtype=jnp.float32)(features_BD)[:, 0]


class AttnBlock(nn.Module):
  """Self-attention over all positions, residual, scaled by 1/sqrt(2)."""
  num_groups: int
  num_heads: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    b, hgt, wid, c = x_BHWC.shape
    h_BLC = GroupNorm(num_groups=self.num_groups, dtype=self.dtype)(x_BHWC).reshape(b, hgt * wid, c)
    h_BLC = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, qkv_features=c, out_features=c,
                                            dtype=self.dtype, force_fp32_for_softmax=True)(h_BLC)
    return (x_BHWC + h_BLC.reshape(b, hgt, wid, c).astype(x_BHWC.dtype)) / SQRT2


class UNet(nn.Module):
  """UNet sized by config.model (see configs/default.py for every field); `dtype` is the compute dtype."""
  ch: int = 64
  ch_mult: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (7,)
  dropout: float = 0.0
  num_groups: int = 8
  embedding: str = 'fourier'
  fourier_scale: float = 16.0
  positional_scale: float = 1000.0
  head_channels: int = 0
  scale_shift: bool = False
  resblock_updown: bool = False
  class_conditional: bool = False
  num_classes: int = 0
  null_class: bool = False
  patch_size: int = 1
  adaptive_weight: bool = False
  two_times: bool = False
  dtype: Dtype = jnp.float32

  def _check(self, x_BHWC: jax.Array, labels_B: Optional[jax.Array]) -> None:
    if self.class_conditional:
      if self.num_classes < 2:
        raise ValueError(f'config.model.num_classes = {self.num_classes}: a class-conditional model needs >= 2.')
      if labels_B is None:
        raise ValueError('this model is class-conditional (config.model.class_conditional): pass labels_B, '
                         'int class labels of shape (batch,).')
      if labels_B.shape != x_BHWC.shape[:1]:
        raise ValueError(f'labels_B has shape {labels_B.shape}; expected ({x_BHWC.shape[0]},).')
    elif self.null_class:
      raise ValueError('config.model.null_class = True needs a class-conditional model (model.class_conditional).')
    elif labels_B is not None:
      raise ValueError('this model is unconditional (config.model.class_conditional = False): labels_B must be '
                       'None.')
    if self.head_channels < 0:
      raise ValueError(f'config.model.head_channels = {self.head_channels} must be >= 0.')

  def _num_heads(self, channels: int) -> int:
    if self.head_channels == 0:
      return 1
    if channels % self.head_channels:
      raise ValueError(f'config.model.head_channels = {self.head_channels} does not divide the {channels} '
                       'channels of an attention layer.')
    return channels // self.head_channels

  @nn.compact
  def __call__(self, x_BHWC: jax.Array, c_noise_B: jax.Array, labels_B: Optional[jax.Array] = None,
               train: bool = False, return_adaptive_weight: bool = False,
               c_noise2_B: Optional[jax.Array] = None):
    """F (float32, the shape of x_BHWC); with return_adaptive_weight, (F, phi_B) where phi_B (B,) float32 is
    the adaptive-weight head of c_noise alone (model.adaptive_weight). A network with model.two_times takes a
    second time c_noise2_B (B,) (MeanFlow's t - r), embedded as c_noise is by its own MLP, the two summed."""
    self._check(x_BHWC, labels_B)
    if self.two_times != (c_noise2_B is not None):
      raise ValueError('a network with config.model.two_times = True takes a second time c_noise2_B (and only '
                       f'such a network does); two_times = {self.two_times}, c_noise2_B given: '
                       f'{c_noise2_B is not None}.')
    embedders = {
        'fourier': lambda: FourierEmbedding(self.ch, self.fourier_scale),
        'positional': lambda: PositionalEmbedding(self.ch, self.positional_scale),
    }
    # The time and class embeddings compute in float32 whatever `dtype` (as ADM's time_embed): in bfloat16
    # (8 significant bits) neighbouring noise levels of a fine grid would round to one embedding.
    temb_BE = embedders[self.embedding]()(c_noise_B)
    temb_BE = nn.Dense(4 * self.ch, dtype=jnp.float32)(temb_BE)
    temb_BE = nn.Dense(4 * self.ch, dtype=jnp.float32)(nn.silu(temb_BE))
    if self.two_times:  # MeanFlow's interval t - r: its own embedding and MLP (as the official DiT's h_embedder).
      hemb_BE = embedders[self.embedding]()(c_noise2_B)
      hemb_BE = nn.Dense(4 * self.ch, dtype=jnp.float32, name='interval_dense_0')(hemb_BE)
      temb_BE = temb_BE + nn.Dense(4 * self.ch, dtype=jnp.float32, name='interval_dense_1')(nn.silu(hemb_BE))
    if self.class_conditional:
      # With null_class, label num_classes means "no class" (classifier-free guidance).
      temb_BE = temb_BE + nn.Embed(self.num_classes + int(self.null_class), 4 * self.ch, dtype=jnp.float32,
                                   name='class_embed')(labels_B)
    # sCM's adaptive loss weight phi(t) (config.model.adaptive_weight): created whenever the option is on, so
    # that its parameters exist from initialisation; returned only when asked.
    phi_B = AdaptiveWeight(name='adaptive_weight')(c_noise_B) if self.adaptive_weight else None
    if return_adaptive_weight and phi_B is None:
      raise ValueError('return_adaptive_weight=True needs a network built with config.model.adaptive_weight = True.')

    def res(h, ch, resample='none'):
      return ResBlock(ch, self.num_groups, self.dropout, self.scale_shift, resample, self.dtype)(h, temb_BE, train)

    def attn(h):
      return AttnBlock(self.num_groups, self._num_heads(h.shape[-1]), self.dtype)(h)

    p = self.patch_size
    h = nn.Conv(self.ch, (3, 3), dtype=self.dtype)(space_to_depth(x_BHWC.astype(self.dtype), p))
    skips = [h]
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = res(h, self.ch * mult)
        if h.shape[1] in self.attn_resolutions:
          h = attn(h)
        skips.append(h)
      if level != len(self.ch_mult) - 1:
        if self.resblock_updown:
          h = res(h, h.shape[-1], 'down')
        else:
          h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), dtype=self.dtype)(h)
        skips.append(h)

    h = res(h, h.shape[-1])
    h = attn(h)
    h = res(h, h.shape[-1])

    for level, mult in reversed(list(enumerate(self.ch_mult))):
      for _ in range(self.num_res_blocks + 1):
        h = res(jnp.concatenate([h, skips.pop()], axis=-1), self.ch * mult)
        if h.shape[1] in self.attn_resolutions:
          h = attn(h)
      if level != 0:
        if self.resblock_updown:
          h = res(h, h.shape[-1], 'up')
        else:
          h = nn.Conv(h.shape[-1], (3, 3), dtype=self.dtype)(upsample_2x(h))
    assert not skips

    h = nn.silu(GroupNorm(num_groups=self.num_groups, dtype=self.dtype)(h))
    out = nn.Conv(x_BHWC.shape[-1] * p * p, (3, 3), kernel_init=nn.initializers.zeros, dtype=self.dtype)(h)
    out = depth_to_space(out, p).astype(jnp.float32)
    return (out, phi_B) if return_adaptive_weight else out
