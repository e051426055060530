"""The original CM (2023) consistency-training recipe on Fashion-MNIST, for comparison with iCT.

Adaptive N(k) (s0 = 2, s1 = 150) and target EMA mu(k) (mu0 = 0.9; loss.mu_variant picks the paper's formula
or the official code's), uniform noise index, unweighted l2 (the paper used LPIPS, which cm_jax does not
ship: it leaks ImageNet features into FID). Same network and budget as configs/fashion_mnist_ct.py.
"""

from cm_jax.configs import fashion_mnist_ct


def get_config():
  config = fashion_mnist_ct.get_config()
  config.loss.schedule = 'adaptive'
  config.loss.s0 = 2
  config.loss.s1 = 150
  config.loss.index_distribution = 'uniform'
  config.loss.distance = 'l2'
  config.loss.weighting = 'uniform'
  config.loss.target = 'ema'
  config.loss.mu0 = 0.9
  config.loss.mu_variant = 'paper'
  config.sampling.start_t = None  # Sample from sigma_max: the iCT config's start time was measured for iCT only.
  return config
