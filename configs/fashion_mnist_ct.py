"""iCT on Fashion-MNIST, sized for a 30-minute run on a 2-core CPU (placeholder; tuned below)."""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = 'fashion_mnist'
  config.data.random_flip = True
  config.model.ch = 16
  config.model.ch_mult = (1, 2, 4)
  config.model.dropout = 0.0
  config.optim.name = 'adam'
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 100
  config.loss.s1 = 160
  config.training.batch_size = 32
  config.training.num_steps = 2400
  config.training.eval_every = 300
  config.training.checkpoint_every = 300
  return config
