"""Static facts about the supported datasets, and the image shape a data config describes.

Standard library only (no TFDS, PIL or absl), so the train step, the state and benchmarks can size images
without the data readers. cm_jax.input_pipeline re-exports these names; call them through it elsewhere.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Static facts about a supported dataset."""
  kind: str  # 'idx' (MNIST family: IDX files or TFDS) | 'tfds' | 'folder'.
  default_size: int  # Side of the images when data.image_size = 0.
  channels: int
  num_classes: Optional[int]  # None: from the folder listing.
  tfds_name: Optional[str] = None
  tfds_config: Optional[str] = None  # Default builder config (data.tfds_config overrides it).
  test_split: str = 'test'  # The TFDS split that cm_jax's 'test' reads.
  downloadable: bool = True  # Whether TFDS can download it without a login.
  local_dirs: tuple[str, ...] = ()  # Directory names under mnist_family.STANDARD_LOCAL_ROOT (MNIST family).
  install_hint: str = ''  # How to get the data locally.

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.default_size, self.default_size, self.channels)


_MANUAL_IMAGENET = ('it cannot be downloaded automatically (the downsampled ImageNet files need an image-net.org '
                    'account): on a machine with access run `tfds build imagenet_resized/64x64 --data_dir=DIR '
                    '--file_format=array_record`, copy DIR here and set --config.data.data_dir=DIR')
SUPPORTED: dict[str, DatasetSpec] = {
    'mnist': DatasetSpec('idx', 28, 1, 10, 'mnist', local_dirs=('mnist',), install_hint=(
        'no Debian package ships the MNIST IDX files (`apt-cache search mnist` only finds dataset-fashion-mnist)')),
    'fashion_mnist': DatasetSpec('idx', 28, 1, 10, 'fashion_mnist', local_dirs=('fashion-mnist',), install_hint=(
        'install the Debian package: `apt-get install dataset-fashion-mnist`')),
    'cifar10': DatasetSpec('tfds', 32, 3, 10, 'cifar10'),
    'imagenette': DatasetSpec('tfds', 64, 3, 10, 'imagenette', '160px-v2', test_split='validation'),
    'imagenet64': DatasetSpec('tfds', 64, 3, 1000, 'imagenet_resized', '64x64', test_split='validation',
                              downloadable=False, install_hint=_MANUAL_IMAGENET),
    'image_folder': DatasetSpec('folder', 64, 3, None),
}


def dataset_spec(data_config: Any) -> tuple[str, DatasetSpec]:
  """(data.name, its DatasetSpec); ValueError for an unknown name."""
  name = data_config.get('name')
  if name not in SUPPORTED:
    raise ValueError(f'Unknown dataset data.name={name!r}; supported: {sorted(SUPPORTED)}.')
  return name, SUPPORTED[name]


def data_source(data_config: Any) -> str:
  """data.source: 'auto', 'tfds' or 'local'; ValueError for anything else."""
  source = data_config.get('source', 'auto')
  if source not in ('auto', 'tfds', 'local'):
    raise ValueError(f"data.source must be 'auto', 'tfds' or 'local', got {source!r}.")
  return source


def image_size(spec: DatasetSpec, data_config: Any) -> int:
  """Side of the RGB images: data.image_size, or the dataset's own when it is 0."""
  return int(data_config.get('image_size', 0) or 0) or spec.default_size


def image_shape(data_config: Any) -> tuple[int, int, int]:
  """(H, W, C) of the training images that data_config describes (after padding or resizing); reads no data."""
  _, spec = dataset_spec(data_config)
  if spec.kind == 'idx':
    pad_to = data_config.get('pad_to', 0)
    return (pad_to, pad_to, 1) if pad_to else spec.image_shape
  size = image_size(spec, data_config)
  return size, size, 3
