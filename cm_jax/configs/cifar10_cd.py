"""Consistency distillation (CM, Song et al. 2023) on CIFAR-10 from the EDM teacher of configs/cifar10_edm.py.

    python -m cm_jax.train --config=configs/cifar10_cd.py --workdir=CD_DIR --config.teacher.workdir=TEACHER

Network: the teacher's, 56,524,355 parameters (benchmarks/param_counts.py); the student starts from the
teacher's weights (teacher.init_student; CM's code sets `finetune = True`), so config.model must equal the
teacher's except dropout.
Recipe (CM paper and the official JAX code, configs/cifar10_ve_cd.py): fixed N = 18, n uniform, one Heun step
of the teacher per pair, target mu = 0 (stopgrad of the online network), uniform weighting; RAdam lr 4e-4 with
the code's linear warm-up over 10M images (19,531 steps); dropout 0; batch 512; 800k steps; sampling EMA
0.9999. Two-step sampling at sigma = 0.585 (index 11 of the 18-point grid, the official ternary search).
Distance: l2, where the paper's best CIFAR-10 result (FID 3.55 / 2.93) used LPIPS. cm_jax does not ship LPIPS:
its VGG features are trained on ImageNet, and a loss in such features leaks ImageNet statistics into the
Inception FID (the argument of iCT), so l2 numbers are the honest comparison. CM's ablations found l2 worse than
LPIPS; expect a higher FID than the paper's.
Architecture differences from CM: NCSN++ with Fourier scale 16 there, the cm_jax UNet with scale 0.02 here (see
configs/cifar10_edm.py).
Hardware assumed: 8x A100 80GB (each step makes a student, a target and two teacher passes of a 56M network).
"""

from cm_jax.configs import cifar10_edm
from cm_jax.configs import common


def get_config():
  config = cifar10_edm.get_config()  # The teacher's data, network (dropout aside) and evaluation.
  common.apply_cd(config, num_points=18, target='stopgrad')  # CM's CIFAR-10 CD: N = 18, mu = 0, dropout 0, RAdam.
  config.optim.lr = 4e-4
  config.optim.warmup_steps = 19_531
  config.training.batch_size = 512
  config.training.num_steps = 800_000
  config.training.ema_rates = (0.9999,)
  config.sampling.two_step_t = 0.585
  return config
