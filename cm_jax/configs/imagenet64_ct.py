"""Consistency training (CM, Song et al. 2023) on class-conditional ImageNet 64x64, from random weights.

    python -m cm_jax.train --config=configs/imagenet64_ct.py --workdir=DIR --config.data.manual_dir=IMAGENET/train

Network: the ADM UNet of configs/imagenet64_edm.py, 295,899,363 parameters (benchmarks/param_counts.py),
class-conditional on the 1000 classes.
Recipe (CM's L_CT^N launch line, openai/consistency_models scripts/launch.sh): adaptive N(k) with s0 = 2,
s1 = 200; adaptive target EMA with mu0 = 0.95, computed from N(k) - 1 as that code does (mu_variant
'official'; 'paper' is the paper's formula); n uniform; uniform weighting; RAdam lr 1e-4 without warm-up or
decay; dropout 0; global batch 2048; 800k steps; sampling EMAs 0.9999432 / 0.9999 / 0.999; mixed precision
(fp16 there, bfloat16 here). Two-step sampling at sigma = 1.913 (index 106 of the final 201-point grid, CM's
`--ts 0,106,200`).
Uncertain: CM's Table 3 may list a different learning rate (8e-6, the CD value) and dropout (0.1); the launch
line, which we follow, says lr 1e-4 and dropout 0.0 (0.1 is its teacher's dropout).
Differences from CM: l2 instead of LPIPS (LPIPS leaks ImageNet features into the Inception FID; the paper's
FID 13.0 used LPIPS), and random initialisation, as the paper describes (the launch line passes an EDM teacher
checkpoint, which cm_jax's CT does not use).
Data: the ImageNet train folder at 64x64, streamed, as configs/imagenet64_edm.py (set data.manual_dir).
Hardware assumed: 64x A100 80GB or a TPU v4-64 slice (not measured).
"""

from cm_jax.configs import common
from cm_jax.configs import imagenet64_edm


def get_config():
  config = imagenet64_edm.get_config()  # Data, network, EMAs, precision and evaluation of the teacher.
  common.apply_ct2023(config, s1=200, mu0=0.95, mu_variant='official')  # CM's ImageNet-64 CT launch line.
  config.model.dropout = 0.0
  config.optim.lr = 1e-4
  config.training.batch_size = 2048
  config.training.num_steps = 800_000
  config.sampling.two_step_t = 1.913
  return config
