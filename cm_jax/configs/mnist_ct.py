"""iCT on MNIST (TFDS `mnist`; downloads on a machine that is online, or use data.manual_dir).

Same model and budget as configs/fashion_mnist_ct.py, which documents the CPU budget it assumes.
"""

from cm_jax.configs import fashion_mnist_ct


def get_config():
  config = fashion_mnist_ct.get_config()
  config.data.name = 'mnist'
  config.data.random_flip = False  # Flipped digits are not digits.
  return config
