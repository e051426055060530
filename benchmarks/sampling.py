r"""Sampling throughput: one-step, two-step and the EDM teacher's Heun sampler; one JSON object per line.

  python benchmarks/sampling.py --config=configs/fashion_mnist_ct.py [--samplers=onestep,twostep,heun]
      [--batch_sizes=250,1000] [--num=10000] [--num_heun=1000] [--config.model.ch=64 ...]

Times `cm_jax.samplers.make_sample_fn` + `sample_in_batches`, the code path of `python -m cm_jax.sample`, on
randomly initialised parameters of the config's network (speed does not depend on the weights; no checkpoint
is needed). The Heun sampler runs the same network as an EDM denoiser (the config with loss.name = 'edm',
config.sampling.diffusion_steps steps, 2 steps - 1 network calls). Per (sampler, batch size), one batch is
run first to compile (`compile_s`), then `num` samples are timed end to end (keys, the network, the copy to
the host): `sample_s`, `images_per_s` and `seconds_per_10k` (the issue's yardstick: 10,000 one-step 28x28
samples). Keys:
  config, sampler, steps, network_calls, batch_size, num, compile_s, sample_s, images_per_s, seconds_per_10k,
  params, backend, devices, cpu, xla_flags, jax_version.
Progress lines of sample_in_batches go to stderr; stdout carries only the JSON lines. Imports cm_jax.inference
(and with it Orbax, for checkpoint loading it does not use here), never TensorFlow or TFDS.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from typing import Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

from cm_jax.runtime import xla_flags  # pylint: disable=g-import-not-at-top
from machine import cpu_model  # pylint: disable=g-import-not-at-top  (benchmarks/machine.py)

XLA_NOTE = xla_flags.apply()  # The CLIs' XLA CPU settings, before any computation.

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from cm_jax import samplers  # pylint: disable=g-import-not-at-top
from cm_jax import train_state as ts  # pylint: disable=g-import-not-at-top
from cm_jax.core import denoiser as denoiser_lib  # pylint: disable=g-import-not-at-top
from cm_jax.data import catalog  # pylint: disable=g-import-not-at-top

SAMPLERS = ('onestep', 'twostep', 'heun')
DEFAULT_CONFIG = os.path.join(REPO_ROOT, 'configs', 'fashion_mnist_ct.py')


def parse_list(text: str, allowed: Sequence[str] = ()) -> list[str]:
  items = [s.strip() for s in text.split(',') if s.strip()]
  if not items:
    raise ValueError('an empty list')
  bad = [s for s in items if allowed and s not in allowed]
  if bad:
    raise ValueError(f'unknown {", ".join(bad)}; choose from {", ".join(allowed)}')
  return items


def sampler_and_config(config, name: str):
  """(Sampler, the config whose denoiser runs it) for 'onestep', 'twostep' or 'heun'."""
  if name == 'heun':
    edm = config.copy_and_resolve_references()
    with edm.unlocked():
      edm.loss.name = 'edm'
    return samplers.make_sampler(edm, 'heun'), edm
  return samplers.make_sampler(config, steps=1 if name == 'onestep' else 2), config


def benchmark(config, name: str, sampler_name: str, batch_size: int, num: int) -> dict:
  spec, run_config = sampler_and_config(config, sampler_name)
  denoiser = denoiser_lib.make_denoiser(run_config)
  image_shape = tuple(catalog.image_shape(run_config.data))
  # The network's parameters as training initialises them (the EMA copies are the same tree).
  params = jax.jit(functools.partial(ts.init_state, run_config, ts.make_optimizer(run_config)))().params
  labels = samplers.draw_labels(samplers.num_classes(run_config.model), num, seed=0)
  sample_fn = samplers.make_sample_fn(denoiser)
  t0 = time.perf_counter()
  first = samplers.sample_in_batches(sample_fn, params, spec, min(batch_size, num), 0, batch_size, image_shape,
                                     labels=None if labels is None else labels[:min(batch_size, num)],
                                     progress_label='Compiling')
  compile_s = time.perf_counter() - t0
  if not np.all(np.isfinite(first)):
    raise RuntimeError(f'{sampler_name}: non-finite samples')
  t0 = time.perf_counter()
  samples = samplers.sample_in_batches(sample_fn, params, spec, num, 1, batch_size, image_shape, labels=labels)
  sample_s = time.perf_counter() - t0
  assert samples.shape == (num,) + image_shape
  calls = spec.steps if spec.name in ('consistency', 'euler') else 2 * spec.steps - 1
  return {
      'config': name, 'sampler': sampler_name, 'steps': spec.steps, 'network_calls': calls,
      'batch_size': batch_size, 'num': num, 'compile_s': round(compile_s, 2), 'sample_s': round(sample_s, 3),
      'images_per_s': round(num / sample_s, 1), 'seconds_per_10k': round(sample_s * 10000 / num, 2),
      'params': int(sum(np.prod(p.shape) for p in jax.tree.leaves(params))),
      'backend': jax.default_backend(), 'devices': jax.device_count(), 'cpu': cpu_model(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''), 'jax_version': jax.__version__,
  }


def define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', DEFAULT_CONFIG,
                                  'Config file (path[:arg]); --config.a.b=v overrides its fields.', lock_config=True)
  flags.DEFINE_string('samplers', ','.join(SAMPLERS), f'Comma-separated, from {", ".join(SAMPLERS)}.')
  flags.DEFINE_string('batch_sizes', '250,1000', 'Comma-separated batch sizes.')
  flags.DEFINE_integer('num', 10000, 'Samples timed per one- and two-step measurement.')
  flags.DEFINE_integer('num_heun', 1000, 'Samples timed per Heun measurement (35 network calls each).')
  return flags.FLAGS


def main(argv: Sequence[str]) -> int:
  del argv
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  try:
    sampler_names = parse_list(FLAGS.samplers, SAMPLERS)
    batch_sizes = [int(b) for b in parse_list(FLAGS.batch_sizes)]
    if min(batch_sizes) < 1 or FLAGS.num < 1 or FLAGS.num_heun < 1:
      raise ValueError('batch sizes, --num and --num_heun must be >= 1')
  except ValueError as e:
    sys.stderr.write(f'sampling.py: error: --samplers/--batch_sizes/--num: {e}.\n')
    return 2
  name = config_flags.get_config_filename(FLAGS['config'])
  print(f'[sampling benchmark] {XLA_NOTE}', file=sys.stderr, flush=True)
  for sampler_name in sampler_names:
    for batch_size in batch_sizes:
      num = FLAGS.num_heun if sampler_name == 'heun' else FLAGS.num
      print(json.dumps(benchmark(FLAGS.config, name, sampler_name, batch_size, num)), flush=True)
  return 0


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  FLAGS = define_flags()
  app.run(lambda argv: sys.exit(main(argv)))
