"""MeanFlow (Geng et al. 2025) on Fashion-MNIST, trained from data, sized for a CPU budget.

    python -m cm_jax.train --config=configs/fashion_mnist_meanflow.py --workdir=MF_DIR
    python -m cm_jax.evaluate --workdir=MF_DIR --num=2000 --steps=1,2

From the MeanFlow recipe (cm_jax/configs/common.py apply_meanflow, 'improved': py-meanflow's CIFAR-10 v1 script):
t ~ logit-normal(-0.6, 1.6), r ~ logit-normal(-4.0, 1.6), r = min(r, t), r set to t in 25% of the rows, adaptive
weight 1 / (||err||^2 + 1e-3)^0.75; Adam (0.9, 0.999); (t, t - r) embedded with sinusoidal features of t itself.
cm_jax's own, for a 30-minute CPU budget: the network, data (Fashion-MNIST in [-1, 1], random flips), batch 32,
learning rate 1e-3 with a 100-step warm-up and sampling EMA 0.999 of configs/fashion_mnist_ct.py; no dropout
(MeanFlow: 0.2 on CIFAR-10 over 800k steps); two-step sampling at t = 0.5 (equal jumps). Steps sized by
`benchmarks/time_to_quality.py --minutes=30` on the same 2-core CPU as the other Fashion-MNIST configs.
"""

from cm_jax.configs import common
from cm_jax.configs import fashion_mnist_ct


def get_config():
  config = fashion_mnist_ct.get_config()  # Network, data, batch, learning rate and EMA of the iCT run.
  common.apply_meanflow(config, recipe='improved')
  config.model.dropout = 0.0
  config.training.num_steps = 7400
  return config
