"""Linen networks. `create_model(config.model)` builds the raw network F named by the config."""

from __future__ import annotations

import ml_collections

from cm_jax.models.unet import UNet

ARCHITECTURES = {'unet': UNet}


def create_model(model_config: ml_collections.ConfigDict):
  """The raw network F(x_in, c_noise, train) described by config.model."""
  fields = dict(model_config)
  name = fields.pop('name')
  if name not in ARCHITECTURES:
    raise ValueError(f'Unknown config.model.name {name!r}; choose one of {sorted(ARCHITECTURES)}.')
  for key in ('ch_mult', 'attn_resolutions'):
    fields[key] = tuple(fields[key])
  return ARCHITECTURES[name](**fields)
