r"""Parameter counts of the paper configs (and the Fashion-MNIST ones); prints one JSON object.

  python benchmarks/param_counts.py [configs/cifar10_ct.py ...]

{config path: {params, image_shape, class_conditional, batch_size, num_steps}}. Counted from the shapes of
jax.eval_shape(model.init): nothing is allocated, so ImageNet-size models count in seconds on a laptop.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

from cm_jax import models  # pylint: disable=g-import-not-at-top
from cm_jax.data import catalog  # pylint: disable=g-import-not-at-top

PAPER_CONFIGS = (
    'configs/cifar10_ct.py', 'configs/cifar10_edm.py', 'configs/cifar10_cd.py', 'configs/cifar10_ect.py',
    'configs/imagenette_ct.py', 'configs/imagenette_edm.py', 'configs/imagenette_cd.py',
    'configs/imagenet64_edm.py', 'configs/imagenet64_ct.py', 'configs/imagenet64_cd.py',
)
FASHION_MNIST_CONFIGS = (
    'configs/fashion_mnist_ct.py', 'configs/fashion_mnist_ct2023.py', 'configs/fashion_mnist_edm.py',
    'configs/fashion_mnist_cd.py', 'configs/fashion_mnist_ect.py',
)
def load_config(path: str) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location('config_module', os.path.join(REPO_ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(H, W, C) of the training images, from config.data alone (no data is read)."""
  return tuple(catalog.image_shape(config.data))


def param_shapes(config: ml_collections.ConfigDict):
  """The parameter tree of config.model as jax.ShapeDtypeStructs (no allocation)."""
  model = models.create_model(config.model)
  h, w, c = image_shape(config)
  labels_B = jnp.zeros((1,), jnp.int32) if config.model.class_conditional else None
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, h, w, c)), jnp.zeros((1,)),
                             labels_B=labels_B)
  return variables['params']


def count_params(config: ml_collections.ConfigDict) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(param_shapes(config)))


def summary(path: str) -> dict:
  config = load_config(path)
  return {
      'params': count_params(config),
      'image_shape': list(image_shape(config)),
      'class_conditional': bool(config.model.class_conditional),
      'batch_size': config.training.batch_size,
      'num_steps': config.training.num_steps,
  }


def main(argv: list[str]) -> None:
  paths = argv or PAPER_CONFIGS + FASHION_MNIST_CONFIGS
  rows = [f' {json.dumps(path)}: {json.dumps(summary(path))}' for path in paths]
  print('{\n' + ',\n'.join(rows) + '\n}')  # One JSON object, one config per line.


if __name__ == '__main__':
  main(sys.argv[1:])
