"""cm_jax's UNet written in PyTorch, to time PyTorch on the same layer sizes as a cm_jax config.

`vs_pytorch.py` compares cm_jax's default network with the PyTorch reference's own networks, which are 4-16x
wider; this script answers the other question: how fast PyTorch runs *cm_jax's* network. It rebuilds the
UNet of cm_jax/models/unet.py (Fourier time embedding, 3x3-conv residual blocks with GroupNorm/SiLU, strided
downsampling and nearest-upsampling convolutions, one-head self-attention at the `--attn` resolutions and in
the middle, skip concatenations; no patch size, scale-shift or class conditioning) and times a consistency-
training step like cm_jax's: the student's forward and backward at one noise level, the target's forward at
another without gradients, and Adam. FLOPs are counted with torch.utils.flop_counter (matmuls, convolutions
and attention only, as in the reference's `--bench`).

Run it in the PyTorch venv (PyTorch is not a cm_jax dependency):
  /tmp/venv-torch/bin/python benchmarks/torch_same_network.py --ch=16 --ch_mult=1,2,4 --attn=7 --bs=32
Prints one JSON line per memory format (`contiguous_format`, i.e. NCHW, then `channels_last`, NHWC like cm_jax):
model, memory_format, batch, threads, params, flops_per_step, step_s (median of --steps after two warm-up
steps), flops_per_s, images_per_s. The defaults are configs/fashion_mnist_ct.py's network and batch.
"""
import argparse
import json
import math
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode


class ResBlock(nn.Module):
  def __init__(self, ci, co, groups, emb):
    super().__init__()
    self.norm1, self.conv1 = nn.GroupNorm(groups, ci, eps=1e-6), nn.Conv2d(ci, co, 3, padding=1)
    self.emb = nn.Linear(emb, co)
    self.norm2, self.conv2 = nn.GroupNorm(groups, co, eps=1e-6), nn.Conv2d(co, co, 3, padding=1)
    self.skip = nn.Conv2d(ci, co, 1) if ci != co else nn.Identity()

  def forward(self, x, temb):
    h = self.conv1(F.silu(self.norm1(x)))
    h = self.conv2(F.silu(self.norm2(h + self.emb(F.silu(temb))[:, :, None, None])))
    return (self.skip(x) + h) / math.sqrt(2.0)


class AttnBlock(nn.Module):
  def __init__(self, c, groups):
    super().__init__()
    self.norm, self.attn = nn.GroupNorm(groups, c, eps=1e-6), nn.MultiheadAttention(c, 1, batch_first=True)

  def forward(self, x):
    b, c, hgt, wid = x.shape
    h = self.norm(x).flatten(2).transpose(1, 2)
    h = self.attn(h, h, h, need_weights=False)[0]
    return (x + h.transpose(1, 2).reshape(b, c, hgt, wid)) / math.sqrt(2.0)


class UNet(nn.Module):
  def __init__(self, ch, ch_mult, num_res_blocks, attn, groups, size, in_ch=1):
    super().__init__()
    self.attn_res = set(attn)
    self.freqs = nn.Parameter(torch.randn(ch // 2) * 0.02, requires_grad=False)
    self.temb = nn.Sequential(nn.Linear(ch, 4 * ch), nn.SiLU(), nn.Linear(4 * ch, 4 * ch))
    self.stem = nn.Conv2d(in_ch, ch, 3, padding=1)
    self.down, skip_ch, c, res = nn.ModuleList(), [ch], ch, size
    for level, mult in enumerate(ch_mult):
      for _ in range(num_res_blocks):
        self.down.append(ResBlock(c, ch * mult, groups, 4 * ch))
        c = ch * mult
        if res in self.attn_res:
          self.down.append(AttnBlock(c, groups))
        skip_ch.append(c)
      if level != len(ch_mult) - 1:
        self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        skip_ch.append(c)
        res //= 2
    self.mid = nn.ModuleList([ResBlock(c, c, groups, 4 * ch), AttnBlock(c, groups), ResBlock(c, c, groups, 4 * ch)])
    self.up = nn.ModuleList()
    for level, mult in reversed(list(enumerate(ch_mult))):
      for _ in range(num_res_blocks + 1):
        self.up.append(ResBlock(c + skip_ch.pop(), ch * mult, groups, 4 * ch))
        c = ch * mult
        if res in self.attn_res:
          self.up.append(AttnBlock(c, groups))
      if level != 0:
        self.up.append(nn.Sequential(nn.Upsample(scale_factor=2.0, mode='nearest'), nn.Conv2d(c, c, 3, padding=1)))
        res *= 2
    self.out = nn.Sequential(nn.GroupNorm(groups, c, eps=1e-6), nn.SiLU(), nn.Conv2d(c, in_ch, 3, padding=1))

  def forward(self, x, c_noise):
    proj = c_noise[:, None] * self.freqs[None, :] * 2 * math.pi
    temb = self.temb(torch.cat([torch.sin(proj), torch.cos(proj)], 1))
    h = self.stem(x)
    skips = [h]
    for layer in self.down:
      h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
      if isinstance(layer, AttnBlock):
        skips[-1] = h  # Attention follows a residual block: its output replaces that block's skip.
      else:
        skips.append(h)
    h = self.mid[2](self.mid[1](self.mid[0](h, temb)), temb)
    for layer in self.up:
      if isinstance(layer, ResBlock):
        h = layer(torch.cat([h, skips.pop()], 1), temb)
      else:
        h = layer(h)
    return self.out(h)


def int_list(text):
  """'1,2,4' -> (1, 2, 4); '' -> (); an argparse type, so a bad value is one usage error, not a traceback."""
  try:
    return tuple(int(v) for v in text.split(',') if v.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(f'{text!r} is not a comma-separated list of integers') from None


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--ch', type=int, default=16)
  ap.add_argument('--ch_mult', type=int_list, default='1,2,4')
  ap.add_argument('--num_res_blocks', type=int, default=1)
  ap.add_argument('--attn', type=int_list, default='7', help='comma-separated resolutions with attention ("" for none)')
  ap.add_argument('--groups', type=int, default=8)
  ap.add_argument('--size', type=int, default=28)
  ap.add_argument('--bs', type=int, default=32)
  ap.add_argument('--steps', type=int, default=10)
  a = ap.parse_args()
  for memory_format in ('contiguous_format', 'channels_last'):
    print(json.dumps(measure(a, memory_format)), flush=True)


def measure(a, memory_format):
  """Times the CT step with activations and weights in `memory_format` (NCHW or NHWC in memory)."""
  torch.manual_seed(0)
  fmt = getattr(torch, memory_format)
  net = UNet(a.ch, a.ch_mult, a.num_res_blocks, a.attn, a.groups, a.size).to(memory_format=fmt)
  target = UNet(a.ch, a.ch_mult, a.num_res_blocks, a.attn, a.groups, a.size).to(memory_format=fmt)
  target.load_state_dict(net.state_dict())
  target.requires_grad_(False)
  opt = torch.optim.Adam(net.parameters(), lr=1e-3)
  x = (torch.rand(a.bs, 1, a.size, a.size) * 2 - 1).contiguous(memory_format=fmt)

  def step():
    z = torch.randn_like(x)
    t = (torch.randn(a.bs) * 2 - 1.1).exp().clamp(0.002, 80)
    t2 = t * 1.1
    with torch.no_grad():
      tgt = target(x + t[:, None, None, None] * z, 0.25 * t.log())
    loss = ((net(x + t2[:, None, None, None] * z, 0.25 * t2.log()) - tgt) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()

  with FlopCounterMode(display=False) as counter:
    step()
  flops = counter.get_total_flops()
  step()
  times = []
  for _ in range(a.steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  return {
      'model': f'cm_jax UNet in PyTorch: ch {a.ch}, ch_mult {",".join(map(str, a.ch_mult))}, {a.num_res_blocks} '
               f'blocks, attention at {",".join(map(str, a.attn)) or "none"}, {a.size}x{a.size}, CT step',
      'memory_format': memory_format, 'batch': a.bs, 'threads': torch.get_num_threads(),
      'params': sum(p.numel() for p in net.parameters()), 'flops_per_step': flops, 'step_s': round(step_s, 4),
      'flops_per_s': flops / step_s, 'images_per_s': round(a.bs / step_s, 1)}


if __name__ == '__main__':
  main()
