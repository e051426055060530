r"""Sample CLI: python -m cm_jax.sample --workdir=DIR --num=10000 --steps=2 --seed=0 --out=samples.npz

An EDM teacher (a run with loss.name = 'edm') is sampled with the EDM ODE sampler:
    python -m cm_jax.sample --workdir=TEACHER --sampler=heun --steps=18 --num=10000 --out=teacher.npz

Writes `arr_0` (uint8, (N, H, W, C), the OpenAI evaluation-suite convention) to --out and a PNG grid of
the first samples next to it. A class-conditional model samples class --class_label, or labels drawn
uniformly; the npz then also holds the labels as `arr_1` (int32 (N,), as the evaluation suite's
class-conditional files do). Loads the latest (or --checkpoint_step) checkpoint read-only and uses the
first sampling EMA unless --ema says otherwise. The same seed, checkpoint and times give the same samples.
"""

from __future__ import annotations

import os
import time
from typing import Optional

from absl import flags
from absl import logging
import numpy as np

from cm_jax import inference
from cm_jax import samplers
from cm_jax.runtime import cli
from cm_jax.runtime import errors
from cm_jax.runtime import images
from cm_jax.runtime import multihost
from cm_jax.runtime import paths

FLAGS = flags.FLAGS


def define_flags() -> None:
  multihost.define_flags()
  flags.DEFINE_string('workdir', None, 'Run directory holding checkpoints/.', required=True)
  flags.DEFINE_integer('num', 10_000, 'Number of samples.')
  flags.DEFINE_integer('steps', None, 'Consistency models: network evaluations, 1 (default) or more (CM '
                       'Algorithm 1). EDM models: Karras-grid steps (default config.sampling.diffusion_steps; '
                       'Heun makes 2 steps - 1 network calls).')
  flags.DEFINE_enum('sampler', None, ['consistency', 'heun', 'euler', 'meanflow'],
                    "Default: 'consistency' for consistency models, config.sampling.diffusion_solver for EDM ones, "
                    "'meanflow' for MeanFlow runs.")
  flags.DEFINE_list('ts', None, 'Descending intermediate times, steps - 1 of them (default: for 2 steps '
                    'config.sampling.two_step_t, otherwise the interior of a Karras grid; MeanFlow: flow times in (0, 1), '
                    'default equal jumps).')
  flags.DEFINE_float('start_t', None, 'Consistency sampling\'s first time, in (sigma_min, sigma_max] (default: '
                     'the run\'s sampling.start_t, else sigma_max).')
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  flags.DEFINE_string('out', None, 'Output .npz path.', required=True)
  flags.DEFINE_string('ema', None, "Sampling EMA rate to use (default: the run's first), or 'online'.")
  flags.DEFINE_integer('checkpoint_step', None, 'Checkpoint step (default: latest).')
  flags.DEFINE_integer('batch_size', 256, 'Samples per device call; lower it if memory runs out.')
  flags.DEFINE_integer('grid', 100, 'How many samples go into the PNG grid (0: none).')
  flags.DEFINE_integer('class_label', None, 'Class-conditional models: sample only this class (num_classes: the '
                       'null label of a network trained with model.null_class; default: labels '
                       'drawn uniformly, label i depending only on (seed, i)).')


def main(argv):
  if len(argv) > 1:
    raise errors.UsageError(f'Unexpected arguments: {argv[1:]} (flags take the form --name=value).')
  if not FLAGS.out.endswith('.npz'):
    raise errors.UsageError(f'--out must end in .npz, got {FLAGS.out!r}.')
  for name, low in (('num', 1), ('batch_size', 1), ('grid', 0)):
    if FLAGS[name].value < low:
      raise errors.UsageError(f'--{name} must be >= {low}, got {FLAGS[name].value}.')
  times = cli.parse_floats('ts', FLAGS.ts)
  multihost.initialize_from_flags()  # Before any device use: TPU pods, SLURM, or the explicit flags.
  # Before the sampling, not after it; every process stops if it fails.
  multihost.on_process_zero(lambda: cli.check_writable_file(FLAGS.out, '--out'))
  model = inference.load(FLAGS.workdir, step=FLAGS.checkpoint_step, ema=FLAGS.ema)
  # Every sample is held in host memory (float32, then uint8) until the npz is written.
  cli.check_fits_in_memory(FLAGS.num * int(np.prod(model.image_shape)) * 5, f'--num={FLAGS.num}',
                           'lower --num, or sample in parts with different --seed values.')
  try:
    samplers.set_start_time(model.config, FLAGS.start_t)
  except ValueError as e:
    raise errors.UsageError(f'--start_t={FLAGS.start_t:g}: {e}') from e
  try:
    spec = samplers.make_sampler(model.config, FLAGS.sampler, FLAGS.steps, times)
  except ValueError as e:
    raise errors.UsageError(str(e)) from e
  try:  # samplers.resolve_labels checks the label against the model.
    labels = model.labels(FLAGS.num, FLAGS.seed, FLAGS.class_label)
  except ValueError as e:
    raise errors.UsageError(f'--class_label={FLAGS.class_label}: {e}') from e
  logging.info('Sampling %d images with %s, from step %d (%s)%s.', FLAGS.num, spec.describe(), model.step,
               model.which_params, '' if labels is None else
               (f', class {FLAGS.class_label}' if FLAGS.class_label is not None else ', uniformly drawn classes'))
  t0 = time.time()
  samples = model.sample(FLAGS.num, steps=FLAGS.steps, ts=times, seed=FLAGS.seed, batch_size=FLAGS.batch_size,
                         sampler=FLAGS.sampler, labels=labels)
  # Every process sampled (its share of each batch) and holds all samples; process 0 writes them, and every
  # process ends with its error if that fails.
  multihost.on_process_zero(lambda: write(samples, labels, time.time() - t0))


def write(samples: np.ndarray, labels: Optional[np.ndarray], seconds: float) -> None:
  paths.write_file(FLAGS.out, lambda f: np.savez(f, *((samples,) if labels is None else (samples, labels))))
  print(f'Wrote {samples.shape} {samples.dtype} samples to {FLAGS.out} in {seconds:.1f} s.')
  if FLAGS.grid:
    png = os.path.splitext(FLAGS.out)[0] + '.png'
    images.save_png(images.make_grid(samples[:FLAGS.grid]), png)
    print(f'Wrote a grid of the first {min(FLAGS.grid, len(samples))} samples to {png}.')


if __name__ == '__main__':
  cli.run(main, define_flags)
