"""A compact DDPM++-style UNet (Linen) for the raw network F(c_in x, c_noise).

The consistency / EDM preconditioning lives in cm_jax/karras.py; this module only maps
(x_in_BHWC, c_noise_B) to an output of the same shape as x_in.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class FourierEmbedding(nn.Module):
  """Random Fourier features of c_noise with a fixed (non-trainable) frequency matrix.

  Frequencies ~ N(0, scale^2): scale 16 in the official CM code, 0.02 in iCT.
  """
  dim: int
  scale: float

  @nn.compact
  def __call__(self, c_noise_B):
    # Stored as a parameter (so it is checkpointed with the model) but never trained.
    w = jax.lax.stop_gradient(self.param('freqs', nn.initializers.normal(stddev=self.scale), (self.dim // 2,)))
    proj_BD = c_noise_B[:, None] * w[None, :] * 2 * np.pi
    return jnp.concatenate([jnp.sin(proj_BD), jnp.cos(proj_BD)], axis=-1)


class PositionalEmbedding(nn.Module):
  """Transformer-style sinusoidal embedding of scale * c_noise (scale 1000 as in the PyTorch CM code)."""
  dim: int
  scale: float
  max_period: float = 10000.0

  @nn.compact
  def __call__(self, c_noise_B):
    half = self.dim // 2
    freqs = jnp.exp(-np.log(self.max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args_BD = (self.scale * c_noise_B)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args_BD), jnp.sin(args_BD)], axis=-1)


class ResBlock(nn.Module):
  out_ch: int
  num_groups: int
  dropout: float

  @nn.compact
  def __call__(self, x_BHWC, temb_BD, train: bool):
    h = nn.silu(nn.GroupNorm(num_groups=self.num_groups)(x_BHWC))
    h = nn.Conv(self.out_ch, (3, 3))(h)
    h = h + nn.Dense(self.out_ch)(nn.silu(temb_BD))[:, None, None, :]
    h = nn.silu(nn.GroupNorm(num_groups=self.num_groups)(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.Conv(self.out_ch, (3, 3), kernel_init=nn.initializers.variance_scaling(1e-10, 'fan_avg', 'uniform'))(h)
    if x_BHWC.shape[-1] != self.out_ch:
      x_BHWC = nn.Conv(self.out_ch, (1, 1))(x_BHWC)
    return (x_BHWC + h) / np.sqrt(2.0)


class AttnBlock(nn.Module):
  num_groups: int
  num_heads: int = 1

  @nn.compact
  def __call__(self, x_BHWC):
    b, hgt, wid, c = x_BHWC.shape
    h = nn.GroupNorm(num_groups=self.num_groups)(x_BHWC).reshape(b, hgt * wid, c)
    h = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, qkv_features=c, out_features=c)(h)
    return (x_BHWC + h.reshape(b, hgt, wid, c)) / np.sqrt(2.0)


class UNet(nn.Module):
  """UNet sized by config.model (see configs/default.py for every field)."""
  ch: int = 64
  ch_mult: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (7,)
  dropout: float = 0.0
  num_groups: int = 8
  embedding: str = 'fourier'
  fourier_scale: float = 16.0
  positional_scale: float = 1000.0

  @nn.compact
  def __call__(self, x_BHWC, c_noise_B, train: bool = False):
    embedders = {
        'fourier': lambda: FourierEmbedding(self.ch, self.fourier_scale),
        'positional': lambda: PositionalEmbedding(self.ch, self.positional_scale),
    }
    temb = embedders[self.embedding]()(c_noise_B)
    temb = nn.Dense(4 * self.ch)(temb)
    temb = nn.Dense(4 * self.ch)(nn.silu(temb))

    def res(h, ch):
      return ResBlock(ch, self.num_groups, self.dropout)(h, temb, train)

    h = nn.Conv(self.ch, (3, 3))(x_BHWC)
    skips = [h]
    for level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        h = res(h, self.ch * mult)
        if h.shape[1] in self.attn_resolutions:
          h = AttnBlock(self.num_groups)(h)
        skips.append(h)
      if level != len(self.ch_mult) - 1:
        h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2))(h)
        skips.append(h)

    h = res(h, h.shape[-1])
    h = AttnBlock(self.num_groups)(h)
    h = res(h, h.shape[-1])

    for level, mult in reversed(list(enumerate(self.ch_mult))):
      for _ in range(self.num_res_blocks + 1):
        h = res(jnp.concatenate([h, skips.pop()], axis=-1), self.ch * mult)
        if h.shape[1] in self.attn_resolutions:
          h = AttnBlock(self.num_groups)(h)
      if level != 0:
        b, hgt, wid, c = h.shape
        h = nn.Conv(c, (3, 3))(jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2))
    assert not skips

    h = nn.silu(nn.GroupNorm(num_groups=self.num_groups)(h))
    return nn.Conv(x_BHWC.shape[-1], (3, 3), kernel_init=nn.initializers.zeros)(h)
