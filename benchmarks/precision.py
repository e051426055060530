r"""float32 against bfloat16 (training.precision): speed and loss curve of the same run, side by side.

    python benchmarks/precision.py --config=configs/fashion_mnist_ct.py --steps=300 --workdir=/tmp/prec

Trains the config twice from the same seed (the same data, noise and initial weights), once per precision,
for --steps steps, and prints one JSON object: steps/s after compilation, and the training loss averaged over
each logging interval for both runs with their relative difference. Any extra `--config.*` override applies
to both runs.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import tensorflow as tf

from cm_jax import train

config_flags.DEFINE_config_file('config', 'configs/fashion_mnist_ct.py', 'Config file.', lock_config=True)
flags.DEFINE_integer('steps', 300, 'Training steps of each run.')
flags.DEFINE_string('workdir', None, 'Directory for the two runs (float32/, bfloat16/); must not hold them yet.',
                    required=True)
FLAGS = flags.FLAGS


def losses_from_events(workdir: str) -> dict[int, float]:
  """The 'loss' scalars of a run's TensorBoard events, by step."""
  out = {}
  for path in glob.glob(os.path.join(workdir, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == 'loss':
          out[event.step] = float(tf.make_ndarray(value.tensor)) if value.HasField('tensor') else value.simple_value
  return out


def main(_):
  runs = {}
  for precision in ('float32', 'bfloat16'):
    config = FLAGS.config.copy_and_resolve_references()
    config.training.precision = precision
    config.training.num_steps = FLAGS.steps
    config.training.checkpoint_every = FLAGS.steps
    config.training.eval_every = FLAGS.steps
    config.training.log_every = max(1, FLAGS.steps // 10)
    config.loss.total_steps = FLAGS.config.loss.total_steps or FLAGS.config.training.num_steps  # Same curriculum.
    workdir = os.path.join(FLAGS.workdir, precision)
    if os.path.exists(workdir):
      raise app.UsageError(f'{workdir} exists; give a new --workdir.')
    t0 = time.time()
    train.train_and_evaluate(config, workdir)
    runs[precision] = {'wall_s': round(time.time() - t0, 1), 'loss': losses_from_events(workdir)}
  f32, bf16 = runs['float32']['loss'], runs['bfloat16']['loss']
  print(json.dumps({
      'config': FLAGS.config.data.name, 'steps': FLAGS.steps, 'backend': jax.default_backend(),
      'cpu': platform.processor() or platform.machine(),
      'wall_s': {k: v['wall_s'] for k, v in runs.items()},
      'loss_curve': [{'step': s, 'float32': round(f32[s], 5), 'bfloat16': round(bf16.get(s, float('nan')), 5),
                      'relative_difference': round((bf16.get(s, float('nan')) - f32[s]) / f32[s], 4)}
                     for s in sorted(f32)],
  }))


if __name__ == '__main__':
  app.run(main)
