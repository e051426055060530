"""The train state (arrays only) and the optimizer, both built from the config."""

from __future__ import annotations

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from cm_jax import models
from cm_jax.data import catalog


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training. Learning rate, N(k) and mu(k) are functions of `step`.

  rng is the root key (from config.seed); step k uses fold_in(rng, k). target_params is None when the
  target is stop_gradient(params) (mu = 0, iCT). ema_params holds one EMA per config.training.ema_rates.
  """
  step: jax.Array
  rng: jax.Array
  params: Any
  target_params: Optional[Any]
  ema_params: tuple
  opt_state: Any


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  oc = config.optim
  decay_end = config.training.num_steps if oc.decay_steps is None else oc.decay_steps
  decays = {
      'constant': lambda: optax.constant_schedule(oc.lr),
      'cosine': lambda: optax.cosine_decay_schedule(oc.lr, max(1, decay_end - oc.warmup_steps)),
  }
  if oc.decay not in decays:
    raise ValueError(f'config.optim.decay = {oc.decay!r} is not one of {sorted(decays)}.')
  if oc.warmup_steps <= 0:
    return decays[oc.decay]()
  warmup = optax.linear_schedule(0.0, oc.lr, oc.warmup_steps)
  return optax.join_schedules([warmup, decays[oc.decay]()], [oc.warmup_steps])


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  oc = config.optim
  optimizers = {'adam': optax.adam, 'radam': optax.radam}
  if oc.name not in optimizers:
    raise ValueError(f'config.optim.name = {oc.name!r} is not one of {sorted(optimizers)}.')
  tx = optimizers[oc.name](learning_rate_schedule(config), b1=oc.b1, b2=oc.b2, eps=oc.eps)
  # Always chained (inf = no clipping), so the optimizer state has one structure and a run can resume with
  # a different clipping value.
  return optax.chain(optax.clip_by_global_norm(oc.grad_clip if oc.grad_clip > 0 else float('inf')), tx)


def has_target_ema(config: ml_collections.ConfigDict) -> bool:
  """Whether the state keeps target params theta^- (CT/CD with loss.target = 'ema'); else the target is
  stop_gradient(params) or there is none (EDM)."""
  return config.loss.name in ('ct', 'cd') and config.loss.target == 'ema'


STUDENT_ONLY_MODULES = ('adaptive_weight',)  # Parameters a student may have beyond its EDM teacher's.


def fits_student(teacher_params, student_params) -> bool:
  """Whether a teacher's parameter tree is the student's, but for the student's own heads (STUDENT_ONLY_MODULES):
  the same modules, leaf structure and shapes."""
  student = {k: v for k, v in student_params.items() if k not in STUDENT_ONLY_MODULES or k in teacher_params}
  if jax.tree.structure(teacher_params) != jax.tree.structure(student):
    return False
  return all(a.shape == b.shape for a, b in zip(jax.tree.leaves(teacher_params), jax.tree.leaves(student)))


def init_state(config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
               init_params: Optional[Any] = None) -> TrainState:
  """A fresh train state; run under jax.jit or jax.eval_shape.

  init_params (e.g. an EDM teacher's weights) replace the random initialisation of params, target params
  and every EMA; the rng keys are the same either way.
  """
  model = models.create_model(config.model)
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  h, w, c = catalog.image_shape(config.data)
  labels = jnp.zeros((1,), jnp.int32) if config.model.class_conditional else None
  times = {'c_noise2_B': jnp.zeros((1,))} if config.model.get('two_times', False) else {}  # MeanFlow: (t, t - r).
  params = model.init(init_rng, jnp.zeros((1, h, w, c)), jnp.zeros((1,)), labels_B=labels, train=False,
                      **times)['params']
  if init_params is not None:
    # The teacher's weights; a head only the student has (the adaptive weight of sCM) keeps its initialisation.
    params = {**params, **init_params}
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      rng=train_rng,
      params=params,
      target_params=params if has_target_ema(config) else None,
      ema_params=tuple(params for _ in config.training.ema_rates),
      opt_state=tx.init(params),
  )


def ema_decay(rate: float, step, warmup: str):
  """Sampling-EMA decay for the update after step `step` (0-based: the step just taken).

  'capped': min(rate, (1 + k)/(10 + k)) (TensorFlow's ExponentialMovingAverage num_updates warm-up).
  'debias': rate (1 - rate^k)/(1 - rate^(k+1)): the EMA is then exactly the normalised average
    sum_j rate^(k-j) p_j / sum_j rate^(k-j) of the iterates p_0..p_k after each update (Adam's bias
    correction, done on line), so the initial parameters get no weight whatever the rate.
  'none': rate from the start (the initial parameters keep weight rate^(k+1)).
  """
  rate = jnp.asarray(rate, jnp.float32)
  k = jnp.asarray(step, jnp.float32)
  if warmup == 'none':
    return rate
  if warmup == 'capped':
    return jnp.minimum(rate, (1.0 + k) / (10.0 + k))
  if warmup == 'debias':
    # expm1 keeps 1 - rate^k = -expm1(k log rate) accurate for rates close to 1.
    log_rate = jnp.log(rate)
    return jnp.where(k == 0, 0.0, rate * jnp.expm1(k * log_rate) / jnp.expm1((k + 1.0) * log_rate))
  raise ValueError(f"training.ema_warmup: {warmup!r} is not one of ['capped', 'debias', 'none'].")


def ema_update(ema, params, decay):
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


# Fields whose None means "training.num_steps": the horizons of the lr decay and of the N(k)/mu(k) curriculum.
SCHEDULE_HORIZONS = ('loss.total_steps', 'optim.decay_steps')


def pin_schedule_horizons(config: ml_collections.ConfigDict,
                          saved: Optional[ml_collections.ConfigDict]) -> ml_collections.ConfigDict:
  """A copy of `config` whose schedule horizons (SCHEDULE_HORIZONS) are numbers, fixed when the run started.

  A fresh run (saved is None) pins None to training.num_steps. A resumed run keeps the horizon its checkpoint
  recorded (checkpoints written before horizons were pinned recorded None: their training.num_steps), so
  raising training.num_steps to extend a finished run continues the schedules it was trained with instead of
  stretching them. A value the user sets explicitly wins (and is logged as a change on resume).
  """
  config = config.copy_and_resolve_references()
  for field in SCHEDULE_HORIZONS:
    section, name = field.split('.')
    if config[section][name] is not None:
      continue
    if saved is None:
      value = config.training.num_steps
    else:
      value = saved[section].get(name)
      value = saved.training.num_steps if value is None else value
    with config.unlocked():
      config[section][name] = int(value)
  return config
