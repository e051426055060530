"""Consistency distillation (CM 2023) on Fashion-MNIST from the EDM teacher of configs/fashion_mnist_edm.py.

    python -m cm_jax.train --config=configs/fashion_mnist_cd.py --workdir=CD_DIR \
        --config.teacher.workdir=TEACHER_DIR

CM's CIFAR-10 CD recipe at CPU size: fixed N = 18, n uniform, one Heun step of the teacher per pair,
target mu = 0 (stop_gradient of the online network), unweighted l2 (the paper's best used LPIPS, which
cm_jax does not ship). The student starts from the teacher's weights (teacher.init_student, as CM's official
CD runs), so the model section must equal the teacher's. Adam at 4e-4: the student starts from a trained
network and needs a gentler rate than training from scratch.
Budget: 1700 steps, about the 28 minutes of configs/fashion_mnist_ct.py on an idle 2-core CPU (a CD step
costs a student, a target and two teacher calls: ~1.07 steps/s against CT's ~1.45), not counting the
teacher's own training.
"""

from cm_jax.configs import common
from cm_jax.configs import fashion_mnist_edm


def get_config():
  config = fashion_mnist_edm.get_config()  # The teacher's data, network and batch.
  common.apply_cd(config, num_points=18, target='stopgrad')  # CM's CIFAR-10 CD: N = 18, mu = 0, dropout 0, RAdam.
  config.optim.name = 'adam'  # Adam, as the teacher, where CM uses RAdam.
  config.optim.lr = 4e-4
  config.training.num_steps = 1700
  config.training.eval_every = 300
  config.sampling.two_step_t = 5.0
  return config
