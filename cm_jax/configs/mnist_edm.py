"""EDM diffusion teacher on MNIST: configs/fashion_mnist_edm.py with data.name = 'mnist' and no flips."""

from cm_jax.configs import fashion_mnist_edm
from cm_jax.configs.mnist_ct import MNIST_SIGMA_DATA


def get_config():
  config = fashion_mnist_edm.get_config()
  config.data.name = 'mnist'
  config.data.random_flip = False  # Flipped digits are not digits.
  config.consistency.sigma_data = MNIST_SIGMA_DATA
  return config
