"""Binds a Linen network to the preconditioning of cm_jax/core/karras.py: f_theta(x, sigma).

`make_denoiser(config)` builds the one a run trains. Imports only jax, flax, ml-collections and light cm_jax
modules (the train step and benchmarks build it without Orbax or the data readers).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cm_jax import models
from cm_jax.core import karras
from cm_jax.core import meanflow


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """f(params, x, sigma) = c_skip x + c_out F(c_in x, c_noise).

  sigma_min is eps for a consistency model (boundary condition f(x, eps) = x) and 0 for an EDM denoiser.
  A dropout rng switches the network to training mode; pass the same rng to student and target calls so
  both see the same dropout mask. labels_B (int (B,)) are the class labels of a class-conditional network,
  None for an unconditional one. The output is float32 whatever the network's compute dtype.
  """
  model: nn.Module
  sigma_data: float
  sigma_min: float

  def __call__(self, params: Any, x_BHWC: jax.Array, sigma_B: jax.Array,
               dropout_rng: Optional[jax.Array] = None, labels_B: Optional[jax.Array] = None) -> jax.Array:
    def net(x_in_BHWC, c_noise_B):
      return self.network(params, x_in_BHWC, c_noise_B, dropout_rng, labels_B)

    return karras.precondition(net, x_BHWC, sigma_B, sigma_data=self.sigma_data, sigma_min=self.sigma_min)

  def network(self, params: Any, x_in_BHWC: jax.Array, c_noise_B: jax.Array,
              dropout_rng: Optional[jax.Array] = None, labels_B: Optional[jax.Array] = None, **kwargs):
    """The raw network F(c_in x, c_noise) without the preconditioning (training mode when dropout_rng is given;
    kwargs go to the network, e.g. return_adaptive_weight)."""
    train = dropout_rng is not None
    rngs = {'dropout': dropout_rng} if train else {}
    return self.model.apply({'params': params}, x_in_BHWC, c_noise_B, labels_B=labels_B, train=train, rngs=rngs,
                            **kwargs)

  def in_float32(self) -> 'Denoiser':
    """The same denoiser computing in float32 (same parameters), for a network with a `dtype` field; itself
    otherwise. sCT/sCD run their jvp and the teacher on it under training.precision = 'bfloat16'."""
    if getattr(self.model, 'dtype', None) not in (None, jnp.float32):
      return dataclasses.replace(self, model=self.model.clone(dtype=jnp.float32))
    return self


def is_diffusion_model(config: ml_collections.ConfigDict) -> bool:
  """True for an EDM denoiser (loss 'edm'), False for a consistency model or a flow map."""
  return config.loss.name == 'edm'


def is_flow_model(config: ml_collections.ConfigDict) -> bool:
  """True for a MeanFlow flow map (loss 'meanflow': the linear path in flow time, cm_jax/core/meanflow.py)."""
  return config.loss.name == 'meanflow'


def family(config: ml_collections.ConfigDict) -> str:
  """'diffusion' (an EDM denoiser), 'flow' (a MeanFlow flow map) or 'consistency': what samplers, evaluation and
  editing dispatch on."""
  return 'diffusion' if is_diffusion_model(config) else 'flow' if is_flow_model(config) else 'consistency'


# Consistency models trained in continuous TrigFlow time (sCM) have their boundary at sigma = 0, unshifted.
UNSHIFTED_LOSSES = ('sct', 'scd')


def boundary(config: ml_collections.ConfigDict) -> float:
  """eps of the run's consistency function at sampling and editing, f(x, eps) = x: consistency.sigma_min for
  CT, CD and ECT (ECT trains unshifted and shifts at sampling, as its code); 0 for sCM runs ('sct', 'scd',
  trained and sampled unshifted) and EDM denoisers."""
  if is_diffusion_model(config) or config.loss.name in UNSHIFTED_LOSSES:
    return 0.0
  return float(config.consistency.sigma_min)


# Losses that train the consistency function without the eps shift and sample it with the shift (ECT's code,
# locuslab/ect ECMPrecond: `self.training` selects the unshifted c_skip / c_out).
TRAINED_UNSHIFTED_LOSSES = ('ect',)


def make_denoiser(config: ml_collections.ConfigDict, training: bool = False) -> Denoiser | meanflow.FlowMap:
  """The network of a run with its preconditioning: the consistency function f_theta (eps-shifted, or unshifted
  for sCM), or for an EDM teacher the denoiser D (eps = 0); for a MeanFlow run its flow map u(z, r, t) (no
  preconditioning). training=True gives the form the loss trains, which differs only for ECT (unshifted in
  training, shifted at sampling)."""
  network = models.create_model(config.model, dtype=models.compute_dtype(config.training.precision))
  if is_flow_model(config):
    return meanflow.FlowMap(network)
  sigma_min = 0.0 if training and config.loss.name in TRAINED_UNSHIFTED_LOSSES else boundary(config)
  return Denoiser(network, sigma_data=config.consistency.sigma_data, sigma_min=sigma_min)
