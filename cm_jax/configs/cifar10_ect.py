"""Easy consistency tuning (ECT, Geng et al. 2024) on CIFAR-10, starting from configs/cifar10_edm.py's teacher.

    python -m cm_jax.train --config=configs/cifar10_ect.py --workdir=ECT_DIR --config.teacher.workdir=TEACHER

Network: the teacher's, 56,524,355 parameters (benchmarks/param_counts.py); ECT starts from the teacher's
weights (ECT transfers EDM's DDPM++ checkpoint, edm-cifar10-32x32-uncond-vp).
Recipe (ECT paper and its run_ecm.sh / ct_train.py): t ~ lognormal(-1.1, 2.0), r = t (1 - q^-(stage+1)
(1 + k sigmoid(-b t))) with q = 2, k = 8, b = 1; loss ||f(x_t, t) - stopgrad f(x_r, r)||_2 / (t - r) (l2_norm,
inverse_delta as configs/fashion_mnist_ect.py; ECT's current code weights by (t^2 + sigma_data^2) /
(t sigma_data)^2 instead, loss.weighting = 'edm'); RAdam lr 1e-4 (betas 0.9 / 0.999); dropout 0.2; batch 128;
25.6M images = 200k steps; the stage advances every 250 ticks of 12.8k images = 3.2M images = 25,000 steps
(stages 0-7 over the run); EMA 0.9999 (the script's default ema_beta); no augmentation and no flips (the
script's augment 0 and xflip default False); two-step sampling at t = 0.821 (the script's mid_t).
ECT reports a two-step FID of 2.73 after one A100-hour and better with the longer run; its numbers used the
EDM teacher with positional embeddings where cm_jax uses Fourier features (configs/cifar10_edm.py).
Hardware assumed: one to two A100/H100 80GB (batch 128 of a 56M network).
"""

from cm_jax.configs import cifar10_edm
from cm_jax.configs import common


def get_config():
  config = cifar10_edm.get_config()  # The teacher's network (dropout aside) and evaluation.
  common.apply_ect(config, stage_steps=25_000)  # ECT's loss and RAdam; a stage per 3.2M images.
  config.data.random_flip = False
  config.model.dropout = 0.2
  config.optim.lr = 1e-4
  config.optim.warmup_steps = 0
  config.training.batch_size = 128
  config.training.num_steps = 200_000
  config.training.ema_rates = (0.9999,)
  config.sampling.two_step_t = 0.821
  return config
