"""Consistency distillation on MNIST: configs/fashion_mnist_cd.py with data.name = 'mnist' and no flips.

Needs an MNIST teacher: `python -m cm_jax.train --config=configs/mnist_edm.py --workdir=TEACHER_DIR`.
"""

from cm_jax.configs import fashion_mnist_cd
from cm_jax.configs.mnist_ct import MNIST_SIGMA_DATA


def get_config():
  config = fashion_mnist_cd.get_config()
  config.data.name = 'mnist'
  config.data.random_flip = False
  config.consistency.sigma_data = MNIST_SIGMA_DATA
  return config
