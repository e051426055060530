"""The update step of every objective: one optimisation step as a pure function of (state, batch).

Imports only jax, optax, ml-collections and light cm_jax modules, so benchmarks can compile it on a machine
without TFDS, TensorFlow, Orbax or clu.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from cm_jax import train_state as ts
from cm_jax.core import pixels


@dataclasses.dataclass(frozen=True)
class UpdateSettings:
  """What the update reads besides the loss and the optimizer, resolved once from the config (`of`).

  random_flip: flip each image left-right with probability 1/2 (data.random_flip). ema_rates, ema_warmup: the
  sampling EMAs and their warm-up (training.ema_rates, training.ema_warmup; see train_state.ema_decay).
  learning_rate: the optimizer's schedule of the step, reported as the 'lr' metric (optim.*).
  """
  random_flip: bool
  ema_rates: tuple[float, ...]
  ema_warmup: str
  learning_rate: Callable[[jax.Array], jax.Array]

  @classmethod
  def of(cls, config: ml_collections.ConfigDict) -> 'UpdateSettings':
    return cls(random_flip=bool(config.data.random_flip), ema_rates=tuple(config.training.ema_rates),
               ema_warmup=config.training.ema_warmup, learning_rate=ts.learning_rate_schedule(config))


def train_step(state: ts.TrainState, batch, teacher_params, *, loss_fn, target_decay, tx,
               settings: UpdateSettings):
  """One optimisation step. batch is (images uint8 (B, H, W, C), labels int32 (B,) or None for an unconditional
  model); teacher_params is None except for 'cd' and 'scd'.

  Returns (new state, metrics of this step). The metrics include 'param_max_abs' of the NEW state (see
  param_max_abs), so the training loop can refuse to save a state whose weights have already exploded.
  """
  batch_BHWC, labels_B = batch
  rng = jax.random.fold_in(state.rng, state.step)
  rng_flip, rng_loss = jax.random.split(rng)
  x0_BHWC = pixels.to_model_range(batch_BHWC)
  if settings.random_flip:
    flip_B = jax.random.bernoulli(rng_flip, 0.5, (x0_BHWC.shape[0],))
    x0_BHWC = jnp.where(flip_B[:, None, None, None], x0_BHWC[:, :, ::-1, :], x0_BHWC)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (_, metrics), grads = grad_fn(state.params, state.target_params, x0_BHWC, state.step, rng_loss, teacher_params,
                                labels_B)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = jax.tree.map(lambda p, u: p + u, state.params, updates)

  target_params = None
  if state.target_params is not None:
    mu = metrics['mu'] = target_decay(state.step)
    target_params = ts.ema_update(state.target_params, params, mu)
  ema_params = tuple(
      ts.ema_update(ema, params, ts.ema_decay(rate, state.step, settings.ema_warmup))
      for ema, rate in zip(state.ema_params, settings.ema_rates))

  metrics['grad_norm'] = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
  metrics['lr'] = settings.learning_rate(state.step)
  metrics['param_max_abs'] = param_max_abs(params, target_params, ema_params)
  new_state = state.replace(step=state.step + 1, params=params, target_params=target_params,
                            ema_params=ema_params, opt_state=opt_state)
  return new_state, metrics


def param_max_abs(*trees) -> jax.Array:
  """max |w| over every array of `trees` (online params, target, EMAs): a float32 scalar, NaN if any entry is NaN.

  A too-high learning rate can blow the weights up (to 1e6 after one Adam step at lr = 1e6) while the loss
  still reads finite; a checkpoint of such a state resumes into a NaN loss whatever the new learning rate. One
  read of the arrays (jnp.max propagates NaN), cheap next to the forward and backward pass. None trees (no
  target network) hold no arrays.
  """
  maxima = [jnp.max(jnp.abs(leaf)).astype(jnp.float32) for tree in trees for leaf in jax.tree.leaves(tree)]
  return jnp.max(jnp.stack(maxima)) if maxima else jnp.zeros((), jnp.float32)

