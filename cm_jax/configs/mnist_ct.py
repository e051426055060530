"""iCT on MNIST (TFDS `mnist`; downloads on a machine that is online, or use data.manual_dir).

Same model and budget as configs/fashion_mnist_ct.py, which documents the CPU budget it assumes.
"""

from cm_jax.configs import fashion_mnist_ct

# MNIST's standard deviation in [-1, 1]: 2 x 0.3081 (the usual [0, 1] std of the 60k training digits) = 0.616,
# not Fashion-MNIST's 0.71. The teacher, CD and ECT configs of MNIST use it too (teacher and student must agree).
# The sampling times (two_step_t, start_t) are Fashion-MNIST's, not searched on MNIST.
MNIST_SIGMA_DATA = 0.62


def get_config():
  config = fashion_mnist_ct.get_config()
  config.data.name = 'mnist'
  config.data.random_flip = False  # Flipped digits are not digits.
  config.consistency.sigma_data = MNIST_SIGMA_DATA
  return config
