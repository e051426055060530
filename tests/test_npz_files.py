"""The one reader of images in .npz files (cm_jax.runtime.npz_files), behind edit --input and evaluate --samples."""

import pickle

import numpy as np
import pytest

from cm_jax.runtime import errors
from cm_jax.runtime import npz_files


@pytest.fixture
def images():
  return np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3)).astype(np.uint8)


def test_reads_the_only_array_or_the_named_one(tmp_path, images):
  path = str(tmp_path / 'x.npz')
  np.savez(path, whatever=images)
  np.testing.assert_array_equal(npz_files.read_images(path, '--input'), images)
  np.savez(path, images[:1], other=images[:2])  # numpy.savez's positional array is 'arr_0'.
  np.testing.assert_array_equal(npz_files.read_images(path, '--input'), images[:1])
  np.savez(path, samples=images[:2], labels=np.arange(2))
  np.testing.assert_array_equal(npz_files.read_images(path, '--samples'), images[:2])


def test_grayscale_images_get_a_channel_axis(tmp_path, images):
  path = str(tmp_path / 'gray.npz')
  np.savez(path, images[..., 0])
  out = npz_files.read_images(path, '--input')
  assert out.shape == (3, 8, 8, 1)
  np.testing.assert_array_equal(out[..., 0], images[..., 0])


def test_bad_files_raise_one_line_naming_the_flag_and_file(tmp_path, images, monkeypatch):
  monkeypatch.setattr(pickle, 'loads', lambda *a, **k: pytest.fail('something was unpickled'))
  (tmp_path / 'junk.npz').write_bytes(b'PK\x03\x04 not really a zip file')
  np.savez(tmp_path / 'objects.npz', np.array([{'a': 1}], dtype=object))
  np.savez(tmp_path / 'floats.npz', images.astype(np.float32))
  np.savez(tmp_path / 'vector.npz', np.zeros(5, np.uint8))
  np.savez(tmp_path / 'empty.npz', np.zeros((0, 8, 8), np.uint8))
  np.savez(tmp_path / 'two.npz', a=images, b=images)
  for name, message in [('missing.npz', 'no such file'), ('junk.npz', 'not a readable .npz file'),
                        ('objects.npz', 'pickle'), ('floats.npz', 'expected uint8 images'),
                        ('vector.npz', 'expected uint8 images'), ('empty.npz', 'no images in it'),
                        ('two.npz', "holds arrays ['a', 'b']; expected one array, or one named 'arr_0' or "
                                    "'samples'")]:
    path = str(tmp_path / name)
    with pytest.raises(errors.InputFileError) as raised:
      npz_files.read_images(path, '--samples')
    text = str(raised.value)
    assert text.startswith(f'--samples={path}: ') and message in text and '\n' not in text, text
