"""Continuous-time consistency distillation (sCD; Lu & Song 2024) on class-conditional ImageNet 64x64 from
configs/imagenet64_edm.py's teacher.

    python -m cm_jax.train --config=configs/imagenet64_scd.py --workdir=SCD_DIR --config.teacher.workdir=TEACHER \
        --config.data.manual_dir=IMAGENET/train

Recipe (sCM paper, appendix G.2 and its ImageNet 64x64 table): the student starts from the teacher's EMA
weights; ln sigma ~ N(-1.0, 1.6^2); tangent warm-up 10k steps, c = 0.1; the learned adaptive weight; Adam with
betas (0.9, 0.99) and eps 1e-11 (EDM2's), learning rate 1e-4 (the teacher's times 0.01 for their smallest
model); no dropout; batch 2048; 400k steps; two-step sampling at t = 1.1, sigma = 0.5 tan(1.1) = 0.982.
Published (EDM2-XL network): FID 2.44 one step, 1.66 two steps.
cm_jax's own: the teacher's ADM UNet (sCM distils EDM2 networks with positional embeddings and adaptive double
normalisation); a constant learning rate where EDM2 decays it as 1/sqrt(k / 35000); plain sampling EMAs (the
teacher's rates) where sCM samples with EDM2's power EMA of length 0.05; bfloat16 compute with the jvp, the
tangent and the loss in float32 (sCM: FP16 with a FlashAttention jvp).
Hardware assumed: 64x A100 80GB or a TPU v4-64 slice (not measured).
"""

from cm_jax.configs import common
from cm_jax.configs import imagenet64_edm


def get_config():
  config = imagenet64_edm.get_config()  # The teacher's data, network (dropout aside), EMAs and evaluation.
  config.loss.name = 'scd'
  common.apply_scm(config, tangent_warmup_steps=10_000)  # sCM's objective; dropout 0, starts from the teacher.
  config.loss.p_std = 1.6
  config.optim.name = 'adam'
  config.optim.eps = 1e-11
  config.optim.lr = 1e-4
  config.optim.warmup_steps = 0
  config.training.batch_size = 2048
  config.training.num_steps = 400_000
  config.sampling.two_step_t = 0.982  # 0.5 tan(1.1).
  return config
