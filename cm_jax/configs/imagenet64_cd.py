"""Consistency distillation (CM, Song et al. 2023) on class-conditional ImageNet 64x64 from
configs/imagenet64_edm.py's teacher.

    python -m cm_jax.train --config=configs/imagenet64_cd.py --workdir=CD_DIR --config.teacher.workdir=TEACHER \
        --config.data.manual_dir=IMAGENET/train

Network: the teacher's ADM UNet, 295,899,363 parameters (benchmarks/param_counts.py), class-conditional on
the 1000 classes; the student starts from the teacher's weights (teacher.init_student), so config.model must
equal the teacher's except dropout.
Recipe (CM's L_CD^N (l2) launch line, openai/consistency_models scripts/launch.sh):
fixed N = 40, n uniform, Heun teacher steps, target EMA mu = 0.95 constant, uniform weighting, RAdam lr 8e-6
without warm-up or decay, dropout 0 (the teacher's 0.1 is off in the student), global batch 2048, 600k steps,
sampling EMAs 0.9999432 / 0.9999 / 0.999, mixed precision (fp16 there, bfloat16 here). Two-step sampling at
sigma = 1.382 (index 22 of the 40-point grid, CM's `--ts 0,22,39`).
Distance: l2. The paper's best ImageNet-64 CD (FID 6.20 / 4.70) used LPIPS, which cm_jax does not ship (it leaks
ImageNet features into the Inception FID); CM also released this l2 variant.
Data: the ImageNet train folder at 64x64, streamed, as configs/imagenet64_edm.py (set data.manual_dir).
Hardware assumed: 64x A100 80GB or a TPU v4-64 slice (a step is a student, a target and two teacher passes of
a ~296M network at batch 2048; not measured).
"""

from cm_jax.configs import common
from cm_jax.configs import imagenet64_edm


def get_config():
  config = imagenet64_edm.get_config()  # The teacher's data, network (dropout aside), EMAs and evaluation.
  common.apply_cd(config, num_points=40, target='ema', mu0=0.95)  # CM's ImageNet-64 CD: N = 40, dropout 0, RAdam.
  config.optim.lr = 8e-6
  config.training.batch_size = 2048
  config.training.num_steps = 600_000
  config.sampling.two_step_t = 1.382
  return config
