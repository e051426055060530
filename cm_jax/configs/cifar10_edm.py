"""EDM diffusion teacher (Karras et al. 2022) on CIFAR-10, unconditional: the teacher of cifar10_cd.py and the
starting point of cifar10_ect.py.

    python -m cm_jax.train --config=configs/cifar10_edm.py --workdir=TEACHER
    python -m cm_jax.evaluate --workdir=TEACHER --num=50000   # Heun, 18 steps (35 network calls)

Network: the 56,524,355-parameter UNet of configs/cifar10_ct.py (benchmarks/param_counts.py), which follows
EDM's DDPM++ layout (ch 128, ch_mult (2, 2, 2), 4 blocks, attention at 16, residual down/upsampling with
[1, 1] filters = average pool / nearest); EDM's paper gives ~56M for it, as we read it. One difference,
cm_jax's choice: EDM's DDPM++ embeds c_noise with positional features, cm_jax with iCT's Fourier features
(scale 0.02), so that every CIFAR-10 config shares one network and the CD/ECT students can start from these
weights.
Recipe (EDM paper and the CIFAR-10 EDM config of CM's code, cifar10_k_ve.py): EDM loss with ln sigma ~
N(-1.2, 1.2^2); Adam lr 1e-3 with a linear warm-up over 10M images (19,531 steps), no decay; dropout 0.13;
batch 512; 200M images = 390,625 steps (CM's code trained its teacher for 400k steps); sampling EMA with a
half-life of 0.5M images, 0.5^(512 / 500000) = 0.99929; EDM Heun with 18 steps.
Not reproduced: EDM's non-leaking augmentation pipeline (probability 0.12), which cm_jax does not have; random
flips stand in for part of it, so expect an FID somewhat above EDM's 1.97 (unconditional VP).
Hardware assumed: 8 GPUs of the V100/A100 class (EDM trained its CIFAR-10 models on 8 V100s in about two days,
as we read the paper; not re-measured).
"""

from cm_jax.configs import cifar10_ct
from cm_jax.configs import common


def get_config():
  config = cifar10_ct.get_config()  # Data, network and evaluation protocol of the CT run.
  common.apply_edm(config, diffusion_steps=18)  # EDM loss and Adam; Heun sampling, 18 steps.
  config.model.dropout = 0.13
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 19_531      # 10M images at batch 512.
  config.training.batch_size = 512
  config.training.num_steps = 390_625     # 200M images.
  config.training.ema_rates = (0.99929,)  # Half-life 0.5M images at batch 512.
  return config
