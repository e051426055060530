r"""Training throughput of a config on this machine; prints one JSON object.

  python benchmarks/train_throughput.py --config=configs/fashion_mnist_ct.py --steps=20 \
      [--config.model.ch=48 ...]

Times the compiled train step (compile excluded) on random uint8 images of the config's shape. Works for
every loss.name; for 'cd' a randomly initialised network of the student's architecture stands in for the
teacher (the cost is the same), so no teacher workdir is needed.
"""

import functools
import json
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from cm_jax import inference
from cm_jax import losses
from cm_jax import train_step
from cm_jax import train_state as ts

config_flags.DEFINE_config_file('config', 'configs/fashion_mnist_ct.py', 'Config file.', lock_config=True)
flags.DEFINE_integer('steps', 20, 'Timed steps after compilation.')
FLAGS = flags.FLAGS


def main(_):
  config = FLAGS.config
  image_shape = ts.image_shape(config)
  tx = ts.make_optimizer(config)
  teacher, teacher_params = None, None
  state = jax.jit(functools.partial(ts.init_state, config, tx))()
  if config.loss.name == 'cd':
    teacher_config = config.copy_and_resolve_references()
    teacher_config.loss.name = 'edm'
    teacher, teacher_params = inference.make_denoiser(teacher_config), jax.tree.map(jnp.copy, state.params)
  objective = losses.make_loss(config, image_shape, inference.make_denoiser(config), teacher)
  step_fn = jax.jit(functools.partial(train_step.train_step, loss_fn=objective.loss_fn,
                                      target_decay=objective.target_decay, tx=tx, config=config), donate_argnums=0)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (config.training.batch_size,) + image_shape, np.uint8)
  labels = (rng.integers(0, config.model.num_classes, config.training.batch_size).astype(np.int32)
            if config.model.class_conditional else None)
  batch = (images, labels)
  t0 = time.time()
  state, metrics = step_fn(state, batch, teacher_params)
  jax.block_until_ready(metrics)
  compile_s = time.time() - t0
  t0 = time.time()
  for _ in range(FLAGS.steps):
    state, metrics = step_fn(state, batch, teacher_params)
  jax.block_until_ready(metrics)
  elapsed = time.time() - t0
  print(json.dumps({
      'loss': config.loss.name, 'backend': jax.default_backend(), 'devices': jax.device_count(),
      'params': sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params)),
      'batch_size': config.training.batch_size, 'image_shape': image_shape,
      'precision': config.training.precision,
      'model': {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.model.items()},
      'first_step_s': round(compile_s, 2), 'steps': FLAGS.steps,
      'steps_per_sec': round(FLAGS.steps / elapsed, 3),
      'examples_per_sec': round(FLAGS.steps * config.training.batch_size / elapsed, 1),
  }))


if __name__ == '__main__':
  app.run(main)
