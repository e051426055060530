"""EDM diffusion teacher on MNIST: configs/fashion_mnist_edm.py with data.name = 'mnist' and no flips."""

from cm_jax.configs import fashion_mnist_edm


def get_config():
  config = fashion_mnist_edm.get_config()
  config.data.name = 'mnist'
  config.data.random_flip = False  # Flipped digits are not digits.
  return config
