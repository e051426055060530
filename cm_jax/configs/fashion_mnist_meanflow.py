"""MeanFlow (Geng et al. 2025) on Fashion-MNIST, trained from data, sized for a CPU budget.

    python -m cm_jax.train --config=configs/fashion_mnist_meanflow.py --workdir=MF_DIR
    python -m cm_jax.evaluate --workdir=MF_DIR --num=2000 --steps=1,2

From the MeanFlow recipe (cm_jax/configs/common.py apply_meanflow, 'improved': py-meanflow's CIFAR-10 v1 script):
t ~ logit-normal(-0.6, 1.6), r ~ logit-normal(-4.0, 1.6), r = min(r, t), r set to t in 25% of the rows, adaptive
weight 1 / (||err||^2 + 1e-3)^0.75; Adam (0.9, 0.999); (t, t - r) embedded with sinusoidal features of t itself.
cm_jax's own, for a 30-minute CPU budget: the network, data (Fashion-MNIST in [-1, 1], random flips), batch 32,
learning rate 1e-3 with a 100-step warm-up and sampling EMA 0.999 of configs/fashion_mnist_ct.py; no dropout
(MeanFlow: 0.2 on CIFAR-10 over 800k steps). Budget: 5500 steps, what `benchmarks/time_to_quality.py
--minutes=30` sized on a 2-core AMD EPYC (0.304 s per step: a jvp, whose primal is the prediction, and a backward
pass). Two-step sampling jumps at flow time t = 0.88, searched on that 30-minute run (`evaluate --steps=2
--search_two_step --num=1000`: 0.88 scored 41.6, 0.82 42.5, 0.94 43.4, 0.5 54.2): a short first jump from the
noise, then the rest. That run scored FD 57.2 in one step and 45.4 in two (docs/results.md). Beside
configs/fashion_mnist_ct.py on one machine (a 2-core Xeon, 30 minutes each) it scored 60.5 / 52.4 against
iCT's 57.2 / 46.7: iCT stays the default recipe.
"""

from cm_jax.configs import common
from cm_jax.configs import fashion_mnist_ct


def get_config():
  config = fashion_mnist_ct.get_config()  # Network, data, batch, learning rate and EMA of the iCT run.
  common.apply_meanflow(config, recipe='improved')
  config.model.dropout = 0.0
  config.training.num_steps = 5500
  config.sampling.two_step_t = 0.88  # Searched (see above); apply_meanflow's default is 0.5.
  return config
