"""ECT on MNIST: configs/fashion_mnist_ect.py with data.name = 'mnist' and no flips (needs an MNIST teacher)."""

from cm_jax.configs import fashion_mnist_ect
from cm_jax.configs.mnist_ct import MNIST_SIGMA_DATA


def get_config():
  config = fashion_mnist_ect.get_config()
  config.data.name = 'mnist'
  config.data.random_flip = False
  config.consistency.sigma_data = MNIST_SIGMA_DATA
  return config
