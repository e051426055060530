"""iCT on Fashion-MNIST, sized for a 30-minute training budget on a 2-core CPU with no GPU.

Budget: 7800 steps of batch 32, sized from `python benchmarks/time_to_quality.py --minutes=30` on the 2-core
Intel Xeon (AVX-512) of the development machines, where the train step runs at ~4.6 steps/s with cm_jax's
XLA CPU defaults (cm_jax/runtime/xla_flags.py): 7843 steps trained in 1697 s, 1726 s with start-up. A slower CPU
takes longer (a 2-core AVX2 EPYC ran the step at ~2.1 steps/s); size num_steps from
`python benchmarks/train_step.py --config=configs/fashion_mnist_ct.py` for another machine: the curriculum
and the schedules stretch with it. A 0.7M-parameter UNet (ch 16, levels 28/14/7 with 16/32/64 channels,
attention at 7x7) is what this budget affords: XLA's CPU convolutions are slow, and at equal wall time a
wider patch-2 network (twice the FLOP/s) and an EDM teacher + ECT split of the budget both scored worse
(benchmarks/README.md, "Time to quality").

sigma_data = 0.71, the standard deviation of Fashion-MNIST in [-1, 1], not CIFAR-10's 0.5. Scored with
`python -m cm_jax.evaluate --num=2000` (classifier FD against the test set, not an Inception FID) after 30
minutes, mean over sampling seeds 0, 7, 13: one step 50.1 (52.0 starting at sigma_max = 80 instead of
sampling.start_t = 40; 65.5 at seed 0 with sigma_data 0.5), two steps at t = 2.0 41.3 (42.7 from 80),
against 50.0 for the PyTorch reference (a 2.7M-parameter diffusers UNet trained as an EDM denoiser for the
same 30 minutes on the same machine, 35-call Heun sampling). On a 2-core AMD EPYC (Zen 4), where 30 minutes
gave cm_jax 6451 steps and the reference 841 (1281 on the Xeon): one step 60.7, two steps 48.4, the reference
70.7; at 10 minutes 107.7, 99.7 and 155.7; at 60 minutes (15286 steps) 51.5 and 42.6. Two-step time t = 2.0 from
`evaluate --search_two_step` (Karras-18 index 9, t = 1.92; t = 5.0 scored 46.1, the best t for sigma_data
0.5 is not the best for 0.71). Start time: 30, 40, 50 and 60 scored alike at seed 0 (48.3-48.9 one-step),
20 worse (51.5), 10 much worse (67.6). Cosine lr decay (61-66 one-step), p_mean -0.75 (54-56), lr 2e-3
(57 at seed 0) and the sampling EMA as an exact exponential average (training.ema_warmup = 'debias') at
rates 0.998 / 0.999 / 0.9995 / 0.9998 / 0.9999 (best 0.9995: 51.2-54.7 over two runs, level with the
default's capped warm-up) scored no better.

Earlier choices for the short budget (benchmarks/pixel_fd.py, a pixel-space proxy): Adam at lr 1e-3 beat
5e-4; the iCT curriculum stops at s1 = 160 (five stages: N = 11, 21, 41, 81, 161) instead of 1280 (at 30 minutes
s1 = 80 scored 63.6 one-step, s1 = 320 50.4, level with 160; benchmarks/README.md); no dropout; one sampling
EMA 0.999 with warm-up.
On a GPU, scale up through the config: ch 64-128, batch 128-512, s1 1280, more steps, dropout 0.1-0.3.
"""

from cm_jax.configs import common
from cm_jax.configs import default


def get_config():
  config = default.get_config()
  common.apply_ict(config, s1=160)  # iCT's loss and Adam; the curriculum stops at 160 in this budget (see above).
  config.data.name = 'fashion_mnist'
  config.data.random_flip = True
  config.consistency.sigma_data = 0.71  # Fashion-MNIST in [-1, 1] has std 0.71 (CIFAR-10's 0.5 scored worse).
  config.model.ch = 16
  config.model.ch_mult = (1, 2, 4)
  config.model.attn_resolutions = (7,)
  config.model.dropout = 0.0
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 100
  config.training.batch_size = 32
  config.training.num_steps = 7800
  config.training.ema_rates = (0.999,)
  config.training.eval_every = 1000
  config.training.checkpoint_every = 1000
  config.sampling.two_step_t = 2.0  # Searched for sigma_data 0.71 (5.0 was best with 0.5).
  config.sampling.start_t = 40.0  # f(40 z, 40) first, not sigma_max = 80: ~1.5-2 FD better; 30-60 alike.
  return config
