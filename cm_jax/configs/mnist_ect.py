"""ECT on MNIST: configs/fashion_mnist_ect.py with data.name = 'mnist' and no flips (needs an MNIST teacher)."""

from cm_jax.configs import fashion_mnist_ect


def get_config():
  config = fashion_mnist_ect.get_config()
  config.data.name = 'mnist'
  config.data.random_flip = False
  return config
