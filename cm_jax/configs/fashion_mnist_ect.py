"""Easy consistency tuning (ECT, Geng et al. 2024) on Fashion-MNIST, fine-tuning the EDM teacher.

    python -m cm_jax.train --config=configs/fashion_mnist_ect.py --workdir=ECT_DIR \
        --config.teacher.workdir=TEACHER_DIR

t ~ lognormal(-1.1, 2.0); r = t (1 - q^-(stage+1) (1 + k sigmoid(-b t))) with q = 2, k = 8, b = 1; the gap
t - r halves every loss.ect_stage_steps steps (580 steps: stages 0-4 in this budget); loss ||f(x_t, t) -
stopgrad f(x_r, r)||_2 / (t - r), the target at r = 0 being the clean image. Starts from the teacher's weights.
Budget: 2900 steps, about the 28 minutes of configs/fashion_mnist_ct.py on an idle 2-core CPU (~1.8 steps/s),
not counting the teacher's own training.
"""

from cm_jax.configs import common
from cm_jax.configs import fashion_mnist_edm


def get_config():
  config = fashion_mnist_edm.get_config()  # The teacher's data, network and batch.
  common.apply_ect(config, stage_steps=580)  # ECT's loss; stages 0-4 in this budget.
  config.optim.name = 'adam'  # Adam, as the teacher, where ECT uses RAdam.
  config.optim.lr = 4e-4
  config.training.num_steps = 2900
  config.training.eval_every = 580
  config.sampling.two_step_t = 5.0
  return config
