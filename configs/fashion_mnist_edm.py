"""EDM diffusion teacher on Fashion-MNIST (loss.name = 'edm'), for consistency distillation and ECT.

Same network as configs/fashion_mnist_ct.py (ch 16, levels 28/14/7, attention at 7x7), so that CT and CD
compare at equal architecture and the CD/ECT student can start from these weights. EDM loss: ln sigma ~
N(-1.2, 1.2^2), weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2. Sampled with EDM Heun on an 18-point
Karras grid (35 network calls):
    python -m cm_jax.sample --workdir=TEACHER --sampler=heun --steps=18 --num=1000 --out=teacher.npz
Budget: about 30 minutes on an idle 2-core CPU (see the README's measured quality section).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'fashion_mnist'
  config.data.random_flip = True
  config.model.ch = 16
  config.model.ch_mult = (1, 2, 4)
  config.model.attn_resolutions = (7,)
  config.model.dropout = 0.0
  config.loss.name = 'edm'
  config.optim.name = 'adam'
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 100
  config.training.batch_size = 32
  config.training.num_steps = 3300
  config.training.ema_rates = (0.999,)
  config.training.eval_every = 550
  config.training.checkpoint_every = 300
  return config
