"""Continuous-time consistency training (sCT; Lu & Song 2024) on CIFAR-10, unconditional, at the paper's settings.

    python -m cm_jax.train --config=configs/cifar10_sct.py --workdir=SCT_DIR --config.teacher.workdir=TEACHER

Recipe (sCM paper, Algorithm 1 and appendix G.2): initialised from the EMA weights of the diffusion teacher
(configs/cifar10_edm.py; without teacher.workdir the run starts from random weights); ln sigma ~ N(-1.0, 1.4^2),
t = arctan(sigma / 0.5); tangent warm-up over 10k steps, normalisation c = 0.1; the learned adaptive weight;
RAdam lr 1e-4, betas (0.9, 0.99), eps 1e-8, no schedule; dropout 0.2; batch 512 (the teacher's); sampling EMA
with a half-life of 0.5M images, 0.5^(512 / 500000) = 0.99929; one-step sampling from sigma_max = 80
(t_max = arctan(160)); two-step sampling at t = 1.1, sigma = 0.5 tan(1.1) = 0.982. Published: FID 2.85 one step,
2.06 two steps.
cm_jax's own: 400k steps (the paper states no CIFAR-10 length; its ImageNet 64x64 runs train 400k); the
teacher's network (cm_jax's DDPM++-like UNet with Fourier features of ln(sigma) / 4, where sCM uses positional
features of t and adaptive double normalisation); the tangent norm divided by sqrt(D) (as NVIDIA FastGen).
Hardware assumed: 8x A100 80GB (a step is a forward, a jvp and a backward pass of a 56M network at batch 512).
"""

from cm_jax.configs import cifar10_edm
from cm_jax.configs import common


def get_config():
  config = cifar10_edm.get_config()  # The teacher's data, network and evaluation protocol.
  config.loss.name = 'sct'
  common.apply_scm(config, tangent_warmup_steps=10_000)
  config.model.dropout = 0.2
  config.optim.lr = 1e-4
  config.optim.warmup_steps = 0
  config.training.batch_size = 512
  config.training.num_steps = 400_000
  config.training.ema_rates = (0.99929,)
  config.sampling.two_step_t = 0.982  # 0.5 tan(1.1).
  return config
