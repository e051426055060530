"""What many tests share: configs/test.py's tiny config with dotted overrides, and exact pytree equality."""

import jax
import numpy as np

from cm_jax.configs import test as test_config


def tiny_config(loss_name: str = 'ct', *, local_data: bool = False, **overrides):
  """configs/test.py's config for `loss_name`; `local_data` reads the Fashion-MNIST IDX files (no TFDS).

  Overrides are dotted paths of any depth: tiny_config(**{'training.num_steps': 8, 'model.ch': 4}).
  An unknown field raises, as on the command line.
  """
  config = test_config.get_config(loss_name)
  if local_data:
    config.data.name, config.data.source = 'fashion_mnist', 'local'
  for dotted, value in overrides.items():
    node = config
    *parents, leaf = dotted.split('.')
    for parent in parents:
      node = node[parent]
    if leaf not in node:
      raise KeyError(f'tiny_config: no config field {dotted!r}')
    node[leaf] = value
  return config


def tree_equal(a, b) -> bool:
  """Same structure size and every leaf bit-identical."""
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(leaves_a) == len(leaves_b) and all(
      np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b))
