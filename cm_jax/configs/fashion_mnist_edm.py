"""EDM diffusion teacher on Fashion-MNIST (loss.name = 'edm'), for consistency distillation and ECT.

Same network as configs/fashion_mnist_ct.py (ch 16, levels 28/14/7, attention at 7x7), so that CT and CD
compare at equal architecture and the CD/ECT student can start from these weights. EDM loss: ln sigma ~
N(-1.2, 1.2^2), weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2. Sampled with EDM Heun on an 18-point
Karras grid (35 network calls):
    python -m cm_jax.sample --workdir=TEACHER --sampler=heun --steps=18 --num=1000 --out=teacher.npz
Budget: 8400 steps, about 28 minutes on an idle 2-core AMD EPYC (0.198 s per step in
`python benchmarks/train_step.py --sweep=configs/fashion_mnist_ct.py,configs/fashion_mnist_edm.py,...`, 2026-12-06,
against CT's 0.243 s: an EDM step is one network pass where CT makes two). Resize num_steps from that script on
another machine.
sigma_data = 0.71 (Fashion-MNIST's standard deviation in [-1, 1], as the CT config). EDM's preconditioning treats
the data as zero-mean, and this data's mean is -0.43, so its RMS 0.83 was tried too: after 3022 steps (the teacher
of the 30-minute distillation recipes) Heun-18 scored FD 57.8 with 0.71 against 60.3 with 0.83 (`python -m
cm_jax.evaluate --num=2000 --seed=S`, seeds 0 and 7: 56.3 / 57.8 and 59.3 / 62.7), so 0.71 stays.
"""

from cm_jax.configs import common
from cm_jax.configs import fashion_mnist_ct


def get_config():
  config = fashion_mnist_ct.get_config()  # Network, data, optimizer and batch: equal to the CT run's.
  common.apply_edm(config, diffusion_steps=18)  # EDM loss (Adam, as the CT run); Heun sampling, 18 steps.
  # EDM samples from sigma_max; its CD and ECT students (configs derived from this one) keep CM's start too:
  # the CT config's start_t = 40 was measured for CT only.
  config.sampling.start_t = None
  config.training.num_steps = 8400
  config.training.eval_every = 1400
  return config
