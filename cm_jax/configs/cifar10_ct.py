"""iCT (Song & Dhariwal 2023) on CIFAR-10, unconditional, at the paper's scale.

    python -m cm_jax.train --config=configs/cifar10_ct.py --workdir=DIR
    python -m cm_jax.evaluate --workdir=DIR --num=50000 --steps=1,2   # the published protocol (below)

Network: 56,524,355 parameters (benchmarks/param_counts.py, jax.eval_shape). iCT uses NCSN++ at ~56M; cm_jax's
UNet has no NCSN++ progressive-input branch or FIR resampling, so the size is matched with the DDPM++/NCSN++
layout of EDM and the CM CIFAR-10 code: ch 128, ch_mult (2, 2, 2) (32/16/8 at 256 channels), 4 residual blocks
per level, attention at 16x16, BigGAN-style residual down/upsampling (2x2 average pool / nearest), GroupNorm
32, Fourier embedding with iCT's scale 0.02 (CM's code used 16).
Recipe (iCT paper): exponential curriculum s0 = 10, s1 = 1280; discretised lognormal noise index (P_mean
-1.1, P_std 2.0); pseudo-Huber with c = 0.00054 sqrt(d) = 0.0299; weight 1/(sigma_{n+1} - sigma_n); no target
EMA (stopgrad); sigma_data 0.5; Adam lr 1e-4 (beta 0.9 / 0.999), no decay; dropout 0.3; sampling EMA 0.99993;
global batch 1024; 400k steps. Not stated in the paper as far as we know, so cm_jax's choices: no lr warm-up,
random horizontal flips (as CM's CIFAR-10 code), EMA warm-up min(rate, (1 + k)/(10 + k)).
Provenance, as far as it could be checked: the loss, curriculum, noise distribution and FIDs are in the iCT
paper's main text; the optimizer (Adam, where CM used RAdam), learning rate, betas, dropout, EMA rate, batch and
length are those of its appendix as first transcribed into this config, and could not be re-read against the
appendix since (no full text was reachable); a secondary source (ECT's README) agrees on batch 1024 and 400k
iterations. Check them against the paper before a paper-scale run.
two_step_t = 0.821 is not from iCT: it is the default intermediate time (`--mid_t`) of ECT's CIFAR-10 code
(locuslab/ect ct_train.py). CM's own two-step CIFAR-10 time is sigma = 0.585 (index 11 of 18, its notebook);
neither is searched for this network: run `evaluate --search_two_step`.
Evaluation: Inception FID of 50,000 samples against the 50,000 training images (reference_split 'train'),
as published (iCT: 2.83 one step, 2.46 two steps). LPIPS is not used (it leaks ImageNet features into FID).
Hardware assumed: 8x A100 80GB (or TPU v4-32) for the 1024 batch in float32; the paper does not tie its
numbers to this, so scale the device count, not the batch, to keep the recipe.
"""

from cm_jax.configs import common
from cm_jax.configs import default


def get_config():
  config = default.get_config()
  common.apply_ict(config)                # iCT's loss (curriculum 10 -> 1280, pseudo-Huber, ...) and Adam.
  config.data.name = 'cifar10'
  config.data.image_size = 0              # 32x32, the dataset's own.
  config.data.random_flip = True

  model = config.model
  model.ch = 128
  model.ch_mult = (2, 2, 2)
  model.num_res_blocks = 4
  model.attn_resolutions = (16,)
  model.num_groups = 32
  model.resblock_updown = True
  model.dropout = 0.3
  model.embedding = 'fourier'
  model.fourier_scale = 0.02

  config.consistency.sigma_data = 0.5
  config.optim.lr = 1e-4
  config.optim.warmup_steps = 0

  training = config.training
  training.batch_size = 1024
  training.num_steps = 400_000
  training.ema_rates = (0.99993,)
  training.log_every = 100
  training.checkpoint_every = 10_000
  training.keep_checkpoints = 3
  training.keep_every = 50_000
  training.eval_every = 10_000

  config.sampling.two_step_t = 0.821
  evaluation = config.evaluation
  evaluation.feature_net = 'inception'
  evaluation.reference_split = 'train'
  evaluation.every = 50_000               # In-training FID of 10k samples: for tracking, not for the paper.
  evaluation.num_samples = 10_000
  return config
