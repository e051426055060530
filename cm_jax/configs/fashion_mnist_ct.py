"""iCT on Fashion-MNIST, sized for a 30-minute training budget on a 2-core CPU with no GPU.

Budget: 2400 steps of batch 32. On an idle 2-core x86 CPU the train step runs at ~1.3-1.45 steps/s
(measured with the predecessor of `python benchmarks/train_step.py --config=configs/fashion_mnist_ct.py`), so
training takes ~30 minutes including compilation and the eight sample grids. A 0.7M-parameter UNet (ch 16,
levels 28/14/7 with 16/32/64 channels, attention at 7x7) is what this budget affords: XLA's CPU convolutions
are slow, and a batch of 64 or ch 32 costs 2-4x more per example.

Choices for the short budget (measured with benchmarks/pixel_fd.py, a pixel-space proxy, not FID): Adam at
lr 1e-3 beat 5e-4 (one-step 29.2 vs 33.4; two-step 24.9 vs 27.4 at t = 2.52); the iCT curriculum stops at
s1 = 160 (stages of 480 steps: N = 11, 21, 41, 81, 161) instead of 1280, no dropout, one sampling EMA 0.999
with warm-up. Two-step sampling at t = 5.0 and t = 2.52 are within noise of each other (24.6 vs 24.9 in
the lr trial, 24.2 vs 23.9 in the final run); t = 5.0 is the default here.
On a GPU, scale up through the config: ch 64-128, batch 128-512, s1 1280, more steps, dropout 0.1-0.3.
"""

from cm_jax.configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'fashion_mnist'
  config.data.random_flip = True
  config.model.ch = 16
  config.model.ch_mult = (1, 2, 4)
  config.model.attn_resolutions = (7,)
  config.model.dropout = 0.0
  config.optim.name = 'adam'
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 100
  config.loss.s1 = 160
  config.training.batch_size = 32
  config.training.num_steps = 2400
  config.training.ema_rates = (0.999,)
  config.training.eval_every = 300
  config.training.checkpoint_every = 300
  config.sampling.two_step_t = 5.0
  return config
