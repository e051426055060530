"""Tests for cm_jax.data.transforms: centre crop and resize."""

import numpy as np
from PIL import Image
import pytest

from cm_jax.data import transforms


def test_center_crop_picks_the_centre():
  x = np.zeros((10, 16, 3), np.uint8)
  x[:, 3:13] = 200  # The central 10x10 square.
  crop = transforms.center_crop_square(x)
  assert crop.shape == (10, 10, 3) and (crop == 200).all()
  tall = np.arange(9 * 4).reshape(9, 4, 1).astype(np.uint8).repeat(3, -1)
  np.testing.assert_array_equal(transforms.center_crop_square(tall), tall[2:6])


@pytest.mark.parametrize('hw', [(100, 60), (33, 47), (8, 8), (5, 12)])
@pytest.mark.parametrize('size', [16, 7])
def test_uniform_colour_stays_that_colour(hw, size):
  x = np.empty(hw + (3,), np.uint8)
  x[...] = (12, 130, 250)
  out = transforms.center_crop_resize(x, size)
  assert out.shape == (size, size, 3) and out.dtype == np.uint8
  assert (out == np.array([12, 130, 250], np.uint8)).all()


def test_no_op_at_the_target_size():
  x = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  assert transforms.center_crop_resize(x, 32) is x


def test_downscale_averages_areas():
  """A 2x2 checkerboard of 8x8 blocks shrunk to 2x2 keeps each block's colour; a fine checkerboard goes grey."""
  blocks = np.kron(np.array([[0, 255], [255, 0]], np.uint8), np.ones((8, 8), np.uint8))
  out = transforms.center_crop_resize(np.stack([blocks] * 3, -1), 2)
  np.testing.assert_array_equal(out[..., 0], [[0, 255], [255, 0]])
  fine = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
  grey = transforms.center_crop_resize(np.stack([fine] * 3, -1), 8)
  assert np.abs(grey.astype(int) - 128).max() <= 1


def test_upscale_and_bad_input():
  out = transforms.center_crop_resize(np.zeros((4, 6, 3), np.uint8), 16)
  assert out.shape == (16, 16, 3)
  with pytest.raises(ValueError, match='RGB'):
    transforms.center_crop_resize(np.zeros((4, 4), np.uint8), 2)


def test_to_rgb_array_converts_modes():
  assert transforms.to_rgb_array(Image.new('L', (3, 2), 77)).shape == (2, 3, 3)
  rgba = transforms.to_rgb_array(Image.new('RGBA', (2, 2), (1, 2, 3, 4)))
  assert rgba.shape == (2, 2, 3) and rgba[0, 0].tolist() == [1, 2, 3]
  pal = Image.new('P', (2, 2), 0)
  pal.putpalette([9, 8, 7] * 256)
  assert transforms.to_rgb_array(pal)[0, 0].tolist() == [9, 8, 7]
