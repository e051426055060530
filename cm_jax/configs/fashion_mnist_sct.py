"""Continuous-time consistency training (sCT; Lu & Song 2024) on Fashion-MNIST, sized for a CPU budget.

    python -m cm_jax.train --config=configs/fashion_mnist_sct.py --workdir=SCT_DIR

From the sCM paper (Algorithm 1; cm_jax/core/scm.py): ln sigma ~ N(-1.0, 1.4^2), t = arctan(sigma /
sigma_data); the target's time derivative from one jax.jvp of the network with the student's dropout mask;
tangent normalisation c = 0.1; the learned adaptive weight; RAdam with betas (0.9, 0.99).
cm_jax's own, for a 30-minute CPU budget: the network, data, batch (32) and sigma_data (0.71, Fashion-MNIST's
standard deviation in [-1, 1]) of configs/fashion_mnist_ct.py; random initialisation (the paper starts sCT from
a pretrained diffusion model: add --config.teacher.workdir=TEACHER to do the same, with the teacher's time
counted in the budget); learning rate 1e-3 with a 100-step warm-up; tangent warm-up over the first 800 steps
(sCM: 10k of a 400k-step run); no dropout (sCM: 0.2 on CIFAR-10); one sampling EMA 0.999.
Two-step sampling at sigma = sigma_data tan(1.1) = 1.395, the paper's intermediate time t = 1.1 in TrigFlow.
Budget: 7400 steps, what `benchmarks/time_to_quality.py --minutes=30` sized on a 2-core AMD EPYC (0.227 s per
step: a forward, a jvp and a backward pass, level with iCT's two forwards and a backward). There, 30 minutes
scored FD 85.6 one step and 80.4 two steps (one sampling seed; iCT's config 60.7 and 48.4): not yet tuned, and
behind iCT at this budget (docs/results.md).
"""

from cm_jax.configs import common
from cm_jax.configs import fashion_mnist_ct


def get_config():
  config = fashion_mnist_ct.get_config()  # Network, data, batch, sigma_data and EMA of the iCT run.
  config.loss.name = 'sct'
  common.apply_scm(config, tangent_warmup_steps=800)
  config.model.dropout = 0.0
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 100
  config.training.num_steps = 7400
  config.sampling.start_t = None  # sCM starts at sigma_max (t_max = arctan(80 / sigma_data)).
  config.sampling.two_step_t = 1.395  # sigma_data tan(1.1).
  return config
