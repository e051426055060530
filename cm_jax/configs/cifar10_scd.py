"""Continuous-time consistency distillation (sCD; Lu & Song 2024) on CIFAR-10 from configs/cifar10_edm.py's teacher.

    python -m cm_jax.train --config=configs/cifar10_scd.py --workdir=SCD_DIR --config.teacher.workdir=TEACHER

Recipe (sCM paper, appendix G.2): configs/cifar10_sct.py's with the teacher's velocity in place of the data's
and no dropout; the student starts from the teacher's EMA weights. Published: FID 3.66 one step, 2.52 two steps.
cm_jax's own as for sCT (400k steps, the network, the tangent norm over sqrt(D)).
"""

from cm_jax.configs import cifar10_sct


def get_config():
  config = cifar10_sct.get_config()
  config.loss.name = 'scd'
  config.model.dropout = 0.0  # sCM disables dropout for sCD.
  return config
