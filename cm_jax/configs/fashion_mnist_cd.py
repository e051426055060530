"""Consistency distillation (CM 2023) on Fashion-MNIST from the EDM teacher of configs/fashion_mnist_edm.py.

    python -m cm_jax.train --config=configs/fashion_mnist_cd.py --workdir=CD_DIR \
        --config.teacher.workdir=TEACHER_DIR

CM's CIFAR-10 CD recipe at CPU size: fixed N = 18, n uniform, one Heun step of the teacher per pair,
target mu = 0 (stop_gradient of the online network), unweighted l2 (the paper's best used LPIPS, which
cm_jax does not ship). The student starts from the teacher's weights (teacher.init_student, as CM's official
CD runs), so the model section must equal the teacher's. Adam at 4e-4: the student starts from a trained
network and needs a gentler rate than training from scratch.
Budget: 5400 steps, about 28 minutes on an idle 2-core AMD EPYC (a CD step costs a student, a target and two
teacher calls: 0.313 s against CT's 0.243 s in `benchmarks/train_step.py --sweep=...`, 2026-12-06), not counting
the teacher's own training.
Two-step time t = 0.14 (Karras-18 index 13), searched on a CD run of the 30-minute recipe (a 3022-step teacher,
then 3164 CD steps): `evaluate --search_two_step --num=1000` scored 93.7 at 0.14, 94.6 at 0.06, 94.2 at 0.30,
96.4 at 0.59, 96.5 at 1.09 and 104.6 at 8.4 (a flat valley from 0.06 to 2); over seeds 0, 7 and 13 with 2000
samples t = 0.14 scored 97.3 against 98.3 at t = 2.0 (lower at every seed; one step 101.8). The earlier 5.0 was
searched with sigma_data 0.5.
"""

from cm_jax.configs import common
from cm_jax.configs import fashion_mnist_edm


def get_config():
  config = fashion_mnist_edm.get_config()  # The teacher's data, network and batch.
  common.apply_cd(config, num_points=18, target='stopgrad')  # CM's CIFAR-10 CD: N = 18, mu = 0, dropout 0, RAdam.
  config.optim.name = 'adam'  # Adam, as the teacher, where CM uses RAdam.
  config.optim.lr = 4e-4
  config.training.num_steps = 5400
  config.training.eval_every = 900
  config.sampling.two_step_t = 0.14  # Searched on a CD run (above).
  return config
