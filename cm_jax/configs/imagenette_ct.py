"""iCT on Imagenette (10 easy ImageNet classes, ~9.5k training images) at 64x64, unconditional, sized for one
accelerator.

    python -m cm_jax.train --config=configs/imagenette_ct.py --workdir=DIR

There is no published consistency model on Imagenette: this is cm_jax's natural-image benchmark between
CIFAR-10 and ImageNet 64x64, and every choice below is cm_jax's (untested at full length) unless a source is
named.
Network: 84,113,219 parameters (benchmarks/param_counts.py, jax.eval_shape): a smaller ADM-style UNet
(ADM's ImageNet-64 one is 296M): ch 128, ch_mult (1, 2, 2, 4) (64/32/16/8 at 128/256/256/512 channels), 2
residual blocks per level, attention at 16 and 8 with 64-channel heads, scale-shift GroupNorm (32 groups) and
residual down/upsampling as ADM; Fourier embedding at iCT's 0.02.
Data: the TFDS imagenette builder (data.tfds_config None: cm_jax's '160px-v2'), centre-cropped and resized to
64x64, random horizontal flips.
Recipe: iCT's (configs/cifar10_ct.py: exponential curriculum 10 -> 1280, lognormal index, pseudo-Huber with
c = 0.00054 sqrt(64 * 64 * 3) = 0.0599, stopgrad target, Adam 1e-4), with dropout 0.2, batch 128, 100k steps
(~1,350 epochs: the curriculum's 8 stages of 12.5k steps) and sampling EMA 0.9999.
Evaluation: Inception FID against the ~9.5k training images (reference_split 'train'); with so few reference
images the FID is biased upwards, so compare cm_jax runs with each other, and check copying with
`evaluate --memorization=2000` (an 84M network can memorise 9.5k images).
Hardware assumed: one 80 GB A100 or H100 in float32 (--config.training.precision=bfloat16 should be
faster on both; not measured).
"""

from cm_jax.configs import common
from cm_jax.configs import default


def get_config():
  config = default.get_config()
  common.apply_ict(config)                # iCT's loss and Adam, as configs/cifar10_ct.py.
  config.data.name = 'imagenette'
  config.data.image_size = 64
  config.data.random_flip = True

  common.apply_adm_unet(config, ch=128, ch_mult=(1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16, 8))
  config.model.dropout = 0.2
  config.model.class_conditional = False

  config.optim.lr = 1e-4
  training = config.training
  training.batch_size = 128
  training.num_steps = 100_000
  training.ema_rates = (0.9999,)
  training.log_every = 100
  training.checkpoint_every = 5_000
  training.keep_every = 25_000
  training.eval_every = 5_000

  config.sampling.diffusion_steps = 40    # EDM sampling at 64x64 (CM's ImageNet-64 teacher: Heun, 40 steps).
  evaluation = config.evaluation
  evaluation.feature_net = 'inception'
  evaluation.reference_split = 'train'
  evaluation.every = 25_000
  evaluation.num_samples = 5_000
  return config
