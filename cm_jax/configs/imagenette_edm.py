"""EDM diffusion teacher on Imagenette 64x64, unconditional: the teacher of configs/imagenette_cd.py.

    python -m cm_jax.train --config=configs/imagenette_edm.py --workdir=TEACHER

Network: the 84,113,219-parameter UNet of configs/imagenette_ct.py (benchmarks/param_counts.py).
Recipe: the EDM loss (ln sigma ~ N(-1.2, 1.2^2)); Adam lr 2e-4 with a 5,000-step warm-up; dropout 0.1 (CM's
ImageNet-64 EDM teacher used 0.1); batch 128; 200k steps; sampling EMA 0.9999; EDM Heun with 40 steps (79
network calls, as CM's ImageNet-64 teacher). These are cm_jax's choices for one accelerator (EDM's own
ImageNet-64 run used batch 4096 on many GPUs); no published Imagenette teacher exists to compare with.
Hardware assumed: one 80 GB A100 or H100.
"""

from cm_jax.configs import common
from cm_jax.configs import imagenette_ct


def get_config():
  config = imagenette_ct.get_config()  # Data, network and evaluation of the CT run.
  common.apply_edm(config, diffusion_steps=40)  # EDM loss and Adam; Heun sampling, 40 steps.
  config.model.dropout = 0.1
  config.optim.lr = 2e-4
  config.optim.warmup_steps = 5_000
  config.training.num_steps = 200_000
  return config
