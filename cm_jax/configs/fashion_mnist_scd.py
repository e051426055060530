"""Continuous-time consistency distillation (sCD; Lu & Song 2024) on Fashion-MNIST from the EDM teacher of
configs/fashion_mnist_edm.py.

    python -m cm_jax.train --config=configs/fashion_mnist_scd.py --workdir=SCD_DIR \
        --config.teacher.workdir=TEACHER_DIR

From the sCM paper: sCT's objective (configs/fashion_mnist_sct.py, cm_jax/core/scm.py) with the teacher's
probability-flow velocity sigma_data F_teacher(x_t / sigma_data, t) in place of the data's; the student starts
from the teacher's weights (the adaptive-weight head from zero) and trains without dropout; RAdam with betas
(0.9, 0.99). cm_jax's own, for the CPU budget: the teacher's network, data and batch; learning rate 4e-4 (as
the CD and ECT students of this teacher; sCM's CIFAR-10 runs use the teacher's times 0.1); tangent warm-up over
400 steps. Budget: 3200 steps, the 60% of a 30-minute budget that benchmarks/time_to_quality.py gave sCD after
the teacher's 40% on a 2-core AMD EPYC (0.31 s per step: a student pass, a jvp and a teacher pass).
Two-step sampling at sigma = sigma_data tan(1.1) = 1.395 (the paper's t = 1.1).
"""

from cm_jax.configs import common
from cm_jax.configs import fashion_mnist_edm


def get_config():
  config = fashion_mnist_edm.get_config()  # The teacher's data, network and batch.
  config.loss.name = 'scd'
  common.apply_scm(config, tangent_warmup_steps=400)  # sCM's objective; dropout 0, starts from the teacher.
  config.optim.lr = 4e-4
  config.optim.warmup_steps = 0
  config.training.num_steps = 3200
  config.training.eval_every = 500
  config.sampling.two_step_t = 1.395  # sigma_data tan(1.1).
  return config
