r"""cm_jax's train step next to the PyTorch yardstick, side by side on one machine; prints JSON lines.

  python benchmarks/vs_pytorch.py --torch_python=/tmp/venv-torch/bin/python \
      [--reference=../shared/peers/pytorch_edm_reference.py] [--rounds=2] \
      [--configs='configs/fashion_mnist_ct.py;configs/fashion_mnist_ct.py|--config.model.ch=64'] [--steps=10] \
      [--same_network]

Alternates, `--rounds` times, the reference's `--bench` (a PyTorch training step of a diffusers UNet and of a
GroupNorm/SiLU conv net; the faster is its last line) and `benchmarks/train_step.py` for each config, each in
its own process, so that both see the same machine at nearly the same moment. Then prints one summary line:
the best FLOP/s of each side over the rounds, their ratio (cm_jax / PyTorch's faster network), the CPU
(`model name` of /proc/cpuinfo) and the 1-minute load average before and after.

PyTorch is no dependency of cm_jax: the reference runs in its own venv (its docstring has the set-up line).
FLOPs are counted differently: PyTorch's torch.utils.flop_counter counts matmuls and convolutions only,
XLA's cost analysis also counts element-wise work (a few percent for these networks).
With `--same_network`, each config's network is also rebuilt in PyTorch and timed right after its cm_jax run
(`benchmarks/torch_same_network.py`, in the torch venv; the config's model fields and batch size from
train_step.py's record; the faster of its two memory formats): PyTorch's speed on the same layer sizes, next
to its speed on its own wider networks. Its records have `side` `pytorch_same_network`; the summary adds
`same_network_flops_per_s` and `ratio_to_same_network` per config. Only what that script rebuilds is accepted
(plain UNet: patch_size 1, no scale-shift, BigGAN up/down, class conditioning or multi-head attention);
another config is one error line.
`--configs` is a ';'-separated list; a config is `path` or `path|--config.a=1|--config.b=(1,2)` (its overrides
separated by '|').
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from machine import cpu_model, load_average  # benchmarks/machine.py, beside this script.

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_REFERENCE = os.path.join(os.path.dirname(REPO_ROOT), 'shared', 'peers', 'pytorch_edm_reference.py')
SAME_NETWORK = os.path.join(REPO_ROOT, 'benchmarks', 'torch_same_network.py')
# model fields torch_same_network.py does not rebuild, with the value it assumes.
UNSUPPORTED = (('patch_size', 1), ('scale_shift', False), ('resblock_updown', False), ('class_conditional', False),
               ('head_channels', 0), ('embedding', 'fourier'))


def same_network_args(record: dict) -> list[str]:
  """torch_same_network.py's arguments for the network and batch of a train_step.py record; ValueError (naming
  the config field) for a network that script does not rebuild."""
  model, (height, width, channels) = record['model'], record['image_shape']
  for field, value in UNSUPPORTED:
    if model.get(field, value) != value:
      raise ValueError(f'--same_network rebuilds only the plain UNet: config.model.{field} = {model[field]!r} '
                       f'(it needs {value!r}).')
  if height != width or channels != 1:
    raise ValueError(f'--same_network rebuilds only square one-channel images; this config has '
                     f'{record["image_shape"]}.')
  return [f'--ch={model["ch"]}', '--ch_mult=' + ','.join(str(m) for m in model['ch_mult']),
          f'--num_res_blocks={model["num_res_blocks"]}',
          '--attn=' + ','.join(str(r) for r in model['attn_resolutions']), f'--groups={model["num_groups"]}',
          f'--size={height}', f'--bs={record["batch_size"]}']


def json_lines(text: str) -> list[dict]:
  out = []
  for line in text.splitlines():
    line = line.strip()
    if line.startswith('{'):
      out.append(json.loads(line))
  return out


def run(command: list[str], timeout: int = 1800) -> list[dict]:
  proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
  if proc.returncode != 0:
    sys.stderr.write(proc.stderr[-3000:])
    raise SystemExit(f'vs_pytorch.py: error: {" ".join(command)} exited with {proc.returncode} (its stderr is '
                     'above).')
  return json_lines(proc.stdout)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--torch_python', required=True, help='Python of a venv with torch, numpy and diffusers.')
  parser.add_argument('--reference', default=DEFAULT_REFERENCE, help='pytorch_edm_reference.py')
  parser.add_argument('--configs', default='configs/fashion_mnist_ct.py',
                      help="';'-separated configs, each 'path' or 'path|--config.a=1|--config.b=(1,2)'.")
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--steps', type=int, default=10, help='Timed cm_jax steps per config.')
  parser.add_argument('--same_network', action='store_true',
                      help="Also time each config's network rebuilt in PyTorch (benchmarks/torch_same_network.py).")
  parser.add_argument('--same_network_script', default=SAME_NETWORK, help='torch_same_network.py')
  args = parser.parse_args()
  for path, what in ((args.torch_python, '--torch_python'), (args.reference, '--reference'),
                     (args.same_network_script, '--same_network_script')):
    if not os.path.exists(path):
      raise SystemExit(f'vs_pytorch.py: error: {what} {path} does not exist.')
  if args.rounds < 1:
    raise SystemExit('vs_pytorch.py: error: --rounds must be >= 1.')
  configs = [c.strip() for c in args.configs.split(';') if c.strip()]
  load_before = load_average()
  best_torch, best_jax, best_same = None, {}, {}
  for round_index in range(args.rounds):
    for record in run([args.torch_python, args.reference, '--bench']):
      record.update(side='pytorch', round=round_index)
      print(json.dumps(record), flush=True)
      if record['model'].startswith('fastest') and (best_torch is None or
                                                    record['flops_per_s'] > best_torch['flops_per_s']):
        best_torch = record
    for spec in configs:
      path, *overrides = spec.split('|')
      command = [sys.executable, os.path.join(REPO_ROOT, 'benchmarks', 'train_step.py'), f'--config={path}',
                 f'--steps={args.steps}'] + overrides
      for record in run(command):
        record.update(side='cm_jax', round=round_index, overrides=overrides)
        print(json.dumps(record), flush=True)
        if spec not in best_jax or record['flops_per_s'] > best_jax[spec]['flops_per_s']:
          best_jax[spec] = record
        if args.same_network:
          try:
            torch_args = same_network_args(record)
          except ValueError as e:
            raise SystemExit(f'vs_pytorch.py: error: {spec}: {e}') from None
          for same in run([args.torch_python, args.same_network_script] + torch_args):
            same.update(side='pytorch_same_network', round=round_index, config=spec)
            print(json.dumps(same), flush=True)
            if spec not in best_same or same['flops_per_s'] > best_same[spec]['flops_per_s']:
              best_same[spec] = same
  summary = {
      'summary': True, 'cpu': cpu_model(), 'cores': os.cpu_count(), 'load_before': load_before,
      'load_after': load_average(), 'rounds': args.rounds,
      'pytorch_model': best_torch['model'], 'pytorch_flops_per_s': best_torch['flops_per_s'],
      'pytorch_images_per_s': best_torch['images_per_s'],
      'cm_jax': [{'config': spec, 'flops_per_s': r['flops_per_s'], 'images_per_s': r['images_per_s'],
                  'peak_fraction': r['peak_fraction'], 'batch_size': r['batch_size'], 'params': r['params'],
                  'ratio_to_pytorch': round(r['flops_per_s'] / best_torch['flops_per_s'], 3),
                  **({'same_network_flops_per_s': best_same[spec]['flops_per_s'],
                      'same_network_images_per_s': best_same[spec]['images_per_s'],
                      'ratio_to_same_network': round(r['flops_per_s'] / best_same[spec]['flops_per_s'], 3)}
                     if spec in best_same else {})}
                 for spec, r in best_jax.items()],
      'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
  }
  print(json.dumps(summary), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
