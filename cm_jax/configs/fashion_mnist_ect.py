"""Easy consistency tuning (ECT, Geng et al. 2024) on Fashion-MNIST, fine-tuning the EDM teacher.

    python -m cm_jax.train --config=configs/fashion_mnist_ect.py --workdir=ECT_DIR \
        --config.teacher.workdir=TEACHER_DIR

t ~ lognormal(-1.1, 2.0); r = t (1 - q^-(stage+1) (1 + k sigmoid(-b t))) with q = 2, k = 8, b = 1; the gap
t - r halves every loss.ect_stage_steps steps (1280 steps: stages 0-4 in this budget); loss ||f(x_t, t) -
stopgrad f(x_r, r)||_2 / (t - r), the target at r = 0 being the clean image. Starts from the teacher's weights.
Budget: 6400 steps, about 28 minutes on an idle 2-core AMD EPYC (0.262 s per step against CT's 0.243 s in
`benchmarks/train_step.py --sweep=...`, 2026-12-06), not counting the teacher's own training.
Two-step time t = 2.0 from `evaluate --search_two_step --num=1000` on a run of ECT's one-hour recipe (below):
t = 2.0 and 3.26 alike (55.4 / 55.0), 5.3 and 8.4 worse (59.1 / 63.0); 5.0 was searched with sigma_data 0.5.
ECT's own one-hour CIFAR-10 recipe (locuslab/ect run_ecm_1hour.sh: q = 256, no stage doubling, EMA 0.9993) is
`--config.loss.ect_q=256 --config.loss.ect_stage_steps=1000000 --config.training.ema_rates='(0.9993,)'
--config.training.ema_warmup=none`; after a 12-minute teacher, 18 minutes of it scored 71.1 in one step and 59.4
in two, behind 30 minutes of configs/fashion_mnist_ct.py (docs/results.md).
"""

from cm_jax.configs import common
from cm_jax.configs import fashion_mnist_edm


def get_config():
  config = fashion_mnist_edm.get_config()  # The teacher's data, network and batch.
  common.apply_ect(config, stage_steps=1280)  # ECT's loss; stages 0-4 in this budget.
  config.optim.name = 'adam'  # Adam, as the teacher, where ECT uses RAdam.
  config.optim.lr = 4e-4
  config.training.num_steps = 6400
  config.training.eval_every = 1280
  config.sampling.two_step_t = 2.0  # Searched (above); 5.0 was the pick with sigma_data 0.5.
  return config
