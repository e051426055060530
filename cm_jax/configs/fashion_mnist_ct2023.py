"""The original CM (2023) consistency-training recipe on Fashion-MNIST, for comparison with iCT.

Adaptive N(k) (s0 = 2, s1 = 150) and target EMA mu(k) (mu0 = 0.9; loss.mu_variant picks the paper's formula
or the official code's), uniform noise index, unweighted l2 (the paper used LPIPS, which cm_jax does not
ship: it leaks ImageNet features into FID). Same network and budget as configs/fashion_mnist_ct.py.
"""

from cm_jax.configs import common
from cm_jax.configs import fashion_mnist_ct


def get_config():
  config = fashion_mnist_ct.get_config()
  common.apply_ct2023(config, s1=150, mu0=0.9, mu_variant='paper')  # CM's CIFAR-10 CT values.
  config.optim.name = 'adam'  # Adam, as the iCT run, where CM uses RAdam: only the loss differs.
  config.sampling.start_t = None  # Sample from sigma_max: the iCT config's start time was measured for iCT only.
  return config
