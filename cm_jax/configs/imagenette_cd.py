"""Consistency distillation on Imagenette 64x64 from the EDM teacher of configs/imagenette_edm.py.

    python -m cm_jax.train --config=configs/imagenette_cd.py --workdir=CD_DIR --config.teacher.workdir=TEACHER

Network: the teacher's, 84,113,219 parameters (benchmarks/param_counts.py); the student starts from the
teacher's weights (teacher.init_student), so config.model must equal the teacher's except dropout.
Recipe: CM's ImageNet-64 CD settings (openai/consistency_models scripts/launch.sh) where they carry over:
fixed N = 40, n uniform, Heun teacher steps, target EMA mu = 0.95 constant, uniform weighting, dropout 0, RAdam
with no warm-up; l2 instead of LPIPS (LPIPS leaks ImageNet features into FID, see configs/cifar10_cd.py).
cm_jax's choices for one accelerator: lr 1e-5 (CM: 8e-6 at batch 2048), batch 128, 100k steps, sampling EMA
0.9999; two-step sampling at sigma = 1.382 (index 22 of the 40-point grid, CM's ImageNet-64 choice) until
`evaluate --search_two_step` finds Imagenette's.
Hardware assumed: one 80 GB A100 or H100 (a step is a student, a target and two teacher passes).
"""

from cm_jax.configs import common
from cm_jax.configs import imagenette_edm


def get_config():
  config = imagenette_edm.get_config()  # The teacher's data, network (dropout aside), batch and evaluation.
  common.apply_cd(config, num_points=40, target='ema', mu0=0.95)  # CM's ImageNet-64 CD: N = 40, dropout 0, RAdam.
  config.optim.lr = 1e-5
  config.optim.warmup_steps = 0
  config.training.num_steps = 100_000
  config.sampling.two_step_t = 1.382
  return config
