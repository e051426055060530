"""Tiny config that exercises every part of training in seconds on a CPU (tests and smoke runs).

Works for any data.name, e.g. `--config.data.name=mnist`, `--config.data.name=cifar10`, or an RGB image folder:
`--config.data.name=image_folder --config.data.manual_dir=DIR --config.data.image_size=16` (add
`--config.model.class_conditional=True --config.model.num_classes=K` for a class-conditional model, and
`--config.training.precision=bfloat16` for mixed precision). Not meant to produce good samples.
`--config=configs/test.py:edm` trains a tiny EDM teacher; `:cd`, `:ect` and `:scd` distil or tune it
(with --config.teacher.workdir=TEACHER_DIR); `:sct` is continuous-time consistency training; `:meanflow` a
MeanFlow flow map.

Two-step time of the CT config, 0.06 (Karras-18 index 15): searched on this network trained 2000 steps on
Fashion-MNIST (`--config.data.name=fashion_mnist --config.training.num_steps=2000`), every interior time of the
18-point grid with the same noise, 2000 samples scored with configs/fashion_mnist_ct.py's classifier: 206.2 at
0.06, 206.1 at 0.023, 207.7 for one step, 216.4 at 2.52 (the default of configs/default.py, whose grids showed
speckled backgrounds) and 222.2 at 0.59. A network this small gains nothing from a second step; a late one
keeps its grids as clean as one step's. The other losses keep their own times (not searched).
"""

from cm_jax.configs import common
from cm_jax.configs import default


def get_config(loss_name: str = 'ct'):
  config = default.get_config()
  config.loss.name = loss_name  # 'ct' and 'edm' keep the loss settings of configs/default.py.
  if loss_name == 'cd':
    common.apply_cd(config, num_points=6)  # CM's CD on a 6-point grid (its dropout 0 is overridden below).
  if loss_name == 'ect':
    common.apply_ect(config, stage_steps=2)
  if loss_name in ('sct', 'scd'):
    common.apply_scm(config, tangent_warmup_steps=2)
  if loss_name == 'meanflow':
    common.apply_meanflow(config, recipe='improved')
  if loss_name == 'ct':
    config.sampling.two_step_t = 0.06  # Searched (above); the default 2.52 gave speckled two-step grids.
  config.sampling.diffusion_steps = 4
  config.model.ch = 8
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = ()
  config.model.num_groups = 4
  config.model.dropout = 0.1
  config.training.num_steps = 4
  config.training.batch_size = 8
  config.training.log_every = 2
  config.training.checkpoint_every = 2
  config.training.eval_every = 4
  config.training.num_eval_samples = 4
  config.training.ema_rates = (0.9, 0.99)
  config.training.disable_most_optimizations = True
  config.evaluation.classifier_steps = 10
  config.evaluation.classifier_batch_size = 16
  config.evaluation.num_samples = 8
  config.evaluation.batch_size = 16
  return config
