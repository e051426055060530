r"""Training throughput of a config on this machine; prints one JSON object.

  python benchmarks/train_throughput.py --config=configs/fashion_mnist_ct.py --steps=20 \
      [--config.model.ch=48 ...]

Times the compiled train step (compile excluded) on random uint8 images of the config's shape.
"""

import functools
import json
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from cm_jax import inference
from cm_jax import losses
from cm_jax import train
from cm_jax import train_state as ts

config_flags.DEFINE_config_file('config', 'configs/fashion_mnist_ct.py', 'Config file.', lock_config=True)
flags.DEFINE_integer('steps', 20, 'Timed steps after compilation.')
FLAGS = flags.FLAGS


def main(_):
  config = FLAGS.config
  image_shape = ts.image_shape(config)
  tx = ts.make_optimizer(config)
  settings = losses.make_ct_settings(config, image_shape)
  loss_fn = functools.partial(losses.consistency_training_loss, denoiser=inference.make_denoiser(config),
                              settings=settings)
  step_fn = jax.jit(functools.partial(train.train_step, loss_fn=loss_fn, target_decay=settings.target_decay,
                                      tx=tx, config=config), donate_argnums=0)
  state = jax.jit(functools.partial(ts.init_state, config, tx))()
  batch = np.random.default_rng(0).integers(0, 256, (config.training.batch_size,) + image_shape, np.uint8)
  t0 = time.time()
  state, metrics = step_fn(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.time() - t0
  t0 = time.time()
  for _ in range(FLAGS.steps):
    state, metrics = step_fn(state, batch)
  jax.block_until_ready(metrics)
  elapsed = time.time() - t0
  print(json.dumps({
      'backend': jax.default_backend(), 'devices': jax.device_count(),
      'params': sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params)),
      'batch_size': config.training.batch_size, 'image_shape': image_shape,
      'model': {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.model.items()},
      'first_step_s': round(compile_s, 2), 'steps': FLAGS.steps,
      'steps_per_sec': round(FLAGS.steps / elapsed, 3),
      'examples_per_sec': round(FLAGS.steps * config.training.batch_size / elapsed, 1),
  }))


if __name__ == '__main__':
  app.run(main)
