"""Linen networks. `create_model(config.model, dtype)` builds the raw network F named by the config."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections

from cm_jax.models.unet import UNet

ARCHITECTURES = {'unet': UNet}
COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(precision: str) -> Any:
  """The network's compute dtype for config.training.precision ('float32' | 'bfloat16')."""
  if precision not in COMPUTE_DTYPES:
    raise ValueError(f'config.training.precision = {precision!r} is not one of {sorted(COMPUTE_DTYPES)}.')
  return COMPUTE_DTYPES[precision]


def create_model(model_config: ml_collections.ConfigDict, dtype: Any = jnp.float32):
  """The raw network F(x_in, c_noise, labels_B=None, train=False) described by config.model.

  Parameters are float32; `dtype` (jnp.float32 or jnp.bfloat16, see compute_dtype) is what the layers compute
  in. The output is float32 either way.
  """
  fields = dict(model_config)
  name = fields.pop('name')
  if name not in ARCHITECTURES:
    raise ValueError(f'Unknown config.model.name {name!r}; choose one of {sorted(ARCHITECTURES)}.')
  for key in ('ch_mult', 'attn_resolutions'):
    fields[key] = tuple(fields[key])
  if fields.get('class_conditional') and fields.get('num_classes', 0) < 2:
    raise ValueError(f'config.model.class_conditional needs config.model.num_classes >= 2, got '
                     f'{fields.get("num_classes", 0)}.')
  return ARCHITECTURES[name](**fields, dtype=dtype)
