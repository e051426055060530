"""Tests of cm_jax/evaluation/metrics.py (analytic cases) and cm_jax/evaluation/inception.py (on a small fake
Inception graph)."""

import hashlib
import os
import pathlib

import numpy as np
import pytest
from scipy import linalg

from cm_jax.evaluation import inception
from cm_jax.evaluation import metrics
from cm_jax.runtime import paths
import fake_inception as fake


def _random_spd(rng: np.random.Generator, dim: int) -> np.ndarray:
  a = rng.normal(size=(dim, 2 * dim))
  return a @ a.T / (2 * dim) + 0.1 * np.eye(dim)


# ---------------------------------------------------------------------------------------- Frechet distance.
def test_frechet_distance_matches_scipy_sqrtm():
  rng = np.random.default_rng(0)
  for dim in (1, 5, 32):
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    s1, s2 = _random_spd(rng, dim), 3.0 * _random_spd(rng, dim)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    np.testing.assert_allclose(metrics.frechet_distance(mu1, s1, mu2, s2), expected, rtol=1e-9)


def test_frechet_distance_identical_is_zero():
  rng = np.random.default_rng(1)
  features = 50.0 * rng.normal(size=(500, 64)) + 10.0
  stats = metrics.FeatureStats.from_features(features)
  fid = metrics.frechet_distance(stats.mu, stats.sigma, stats.mu, stats.sigma)
  assert abs(fid) < 1e-6 * np.trace(stats.sigma)


def test_frechet_distance_isotropic_closed_form():
  dim, s1, s2 = 7, 0.5, 2.0
  mu1, mu2 = np.arange(dim, dtype=float), np.full(dim, 3.0)
  expected = np.sum((mu1 - mu2) ** 2) + dim * (s1 - s2) ** 2
  fid = metrics.frechet_distance(mu1, s1 ** 2 * np.eye(dim), mu2, s2 ** 2 * np.eye(dim))
  np.testing.assert_allclose(fid, expected, rtol=1e-12)


def test_frechet_distance_isotropic_gaussian_samples():
  rng = np.random.default_rng(2)
  dim, n, s1, s2 = 8, 200_000, 1.0, 1.5
  m1, m2 = np.zeros(dim), np.full(dim, 0.5)
  a = metrics.FeatureStats.from_features(m1 + s1 * rng.normal(size=(n, dim)))
  b = metrics.FeatureStats.from_features(m2 + s2 * rng.normal(size=(n, dim)))
  expected = np.sum((m1 - m2) ** 2) + dim * (s1 - s2) ** 2  # 2.0 + 2.0
  assert a.num == n
  np.testing.assert_allclose(metrics.frechet_distance(a.mu, a.sigma, b.mu, b.sigma), expected, rtol=0.02)


def test_frechet_distance_symmetric():
  rng = np.random.default_rng(3)
  mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
  s1, s2 = _random_spd(rng, 16), _random_spd(rng, 16)
  np.testing.assert_allclose(metrics.frechet_distance(mu1, s1, mu2, s2),
                             metrics.frechet_distance(mu2, s2, mu1, s1), rtol=1e-10)


def test_frechet_distance_rejects_bad_input():
  eye = np.eye(3)
  with pytest.raises(ValueError, match='means'):
    metrics.frechet_distance(np.zeros(3), eye, np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match='sigma2'):
    metrics.frechet_distance(np.zeros(3), eye, np.zeros(3), np.eye(4))
  with pytest.raises(ValueError, match='non-finite'):
    metrics.frechet_distance(np.array([0.0, np.nan, 0.0]), eye, np.zeros(3), eye)
  with pytest.raises(ValueError, match='non-finite'):
    metrics.frechet_distance(np.zeros(3), eye, np.zeros(3), np.full((3, 3), np.inf))
  with pytest.raises(ValueError, match='symmetric'):
    metrics.frechet_distance(np.zeros(3), np.triu(np.ones((3, 3))), np.zeros(3), eye)


def test_feature_stats_round_trip(tmp_path):
  rng = np.random.default_rng(4)
  features = rng.normal(size=(40, 6)).astype(np.float32)
  stats = metrics.FeatureStats.from_features(features)
  np.testing.assert_allclose(stats.mu, features.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(stats.sigma, np.cov(features.astype(np.float64), rowvar=False), rtol=1e-12)
  path = tmp_path / 'sub' / 'stats.npz'
  stats.save(path)
  assert os.listdir(path.parent) == ['stats.npz']  # No temporary file left behind.
  loaded = metrics.FeatureStats.load(path)
  assert loaded.num == 40 and loaded.mu.dtype == np.float64
  np.testing.assert_array_equal(loaded.mu, stats.mu)
  np.testing.assert_array_equal(loaded.sigma, stats.sigma)
  np.savez(tmp_path / 'foreign.npz', mu=stats.mu, sigma=stats.sigma)
  with pytest.raises(ValueError, match='num'):
    metrics.FeatureStats.load(tmp_path / 'foreign.npz')
  with pytest.raises(ValueError, match='at least 2'):
    metrics.FeatureStats.from_features(features[:1])


# ----------------------------------------------------------------------------------------- Inception score.
def test_inception_score_confident_uniform_is_num_classes():
  num_classes = 10
  labels = np.tile(np.arange(num_classes), 100)  # Every split of 100 holds each class 10 times.
  mean, std = metrics.inception_score(np.eye(num_classes)[labels], splits=10)
  np.testing.assert_allclose(mean, num_classes, rtol=1e-12)
  assert std < 1e-9


def test_inception_score_identical_rows_is_one():
  probs = np.tile(np.array([0.7, 0.2, 0.1, 0.0]), (50, 1))
  mean, std = metrics.inception_score(probs, splits=5)
  np.testing.assert_allclose(mean, 1.0, rtol=1e-12)
  assert std < 1e-12


def test_inception_score_rejects_bad_input():
  with pytest.raises(ValueError, match='splits'):
    metrics.inception_score(np.full((5, 2), 0.5), splits=10)
  with pytest.raises(ValueError, match='probability'):
    metrics.inception_score(np.full((20, 2), 0.6), splits=2)


# --------------------------------------------------------------------------------------- Precision/recall.
def _clusters(rng, centres_KD, per_cluster, std=1.0):
  return np.concatenate([c + std * rng.normal(size=(per_cluster, len(c))) for c in centres_KD])


def test_precision_recall_identical_sets():
  x = np.random.default_rng(5).normal(size=(300, 4))
  assert metrics.precision_recall(x, x.copy(), k=3, batch_size=64) == {'precision': 1.0, 'recall': 1.0}


def test_precision_recall_far_apart():
  x = np.random.default_rng(6).normal(size=(200, 4))
  assert metrics.precision_recall(x, x + 100.0, k=3) == {'precision': 0.0, 'recall': 0.0}


def test_precision_recall_half_the_modes():
  rng = np.random.default_rng(7)
  centres = 100.0 * rng.normal(size=(10, 2))
  real = _clusters(rng, centres, 100)
  fake = _clusters(rng, centres[:5], 200)  # Faithful samples of half of the modes.
  pr = metrics.precision_recall(real, fake, k=3, batch_size=128)
  assert pr['precision'] > 0.9
  assert 0.4 < pr['recall'] <= 0.5


def test_precision_recall_matches_brute_force():
  rng = np.random.default_rng(8)
  real, fake = rng.normal(size=(70, 3)), rng.normal(size=(50, 3)) + 0.3
  for k in (1, 3):
    d_rr = np.linalg.norm(real[:, None] - real[None], axis=-1)
    d_ff = np.linalg.norm(fake[:, None] - fake[None], axis=-1)
    d_rf = np.linalg.norm(real[:, None] - fake[None], axis=-1)
    r_real, r_fake = np.sort(d_rr, 1)[:, k], np.sort(d_ff, 1)[:, k]  # Column 0 is the point itself.
    expected = {'precision': np.mean(np.any(d_rf <= r_real[:, None], axis=0)),
                'recall': np.mean(np.any(d_rf <= r_fake[None, :], axis=1))}
    assert 0.0 < expected['precision'] < 1.0 and 0.0 < expected['recall'] < 1.0
    assert metrics.precision_recall(real, fake, k=k, batch_size=16) == pytest.approx(expected)


# -------------------------------------------------------------------------------- Nearest neighbours, copying.
def test_nearest_neighbour_distances_brute_force():
  rng = np.random.default_rng(9)
  queries, refs = rng.normal(size=(37, 5)), rng.normal(size=(53, 5))
  expected = np.min(np.linalg.norm(queries[:, None] - refs[None], axis=-1), axis=1)
  distances = metrics.nearest_neighbour_distances(queries, refs, batch_size=8)
  np.testing.assert_allclose(distances, expected, rtol=1e-12)
  far = 1000.0 + 50.0 * rng.normal(size=(20, 784))  # Large norms: |q|^2 - 2 q.r + |r|^2 cancels badly.
  assert np.all(metrics.nearest_neighbour_distances(far[::2], far) == 0.0)


def test_memorization_copies():
  rng = np.random.default_rng(10)
  train, heldout = rng.normal(size=(1000, 16)), rng.normal(size=(300, 16))
  result = metrics.memorization(train[:200] * 1.0, train, heldout, batch_size=128)
  assert result['samples_median'] == result['samples_min'] == 0.0
  assert result['ratio_median'] == 0.0
  assert result['fraction_closer_than_heldout_p1'] == 1.0
  assert result['heldout_p1'] > 0.0


def test_memorization_fresh_draws():
  rng = np.random.default_rng(11)
  train, heldout, samples = (rng.normal(size=(n, 16)) for n in (2000, 500, 500))
  result = metrics.memorization(samples, train, heldout)
  assert 0.9 < result['ratio_median'] < 1.1
  assert result['fraction_closer_than_heldout_p1'] < 0.04
  assert result['heldout_p1'] <= result['heldout_median']


# ----------------------------------------------------------------------------- Inception plumbing (fake graph).
_SIZE, _DIM, _CLASSES = fake.SIZE, fake.DIM, fake.CLASSES
_expected_outputs = fake.expected_outputs


@pytest.fixture(scope='module')
def fake_inception(tmp_path_factory):
  """(weights, path of the .pb, path of a .tgz packing it as classify_image_graph_def.pb with a label file)."""
  return fake.write(tmp_path_factory.mktemp('fake_inception'))


@pytest.mark.parametrize('which', ['pb', 'tgz'])
def test_inception_net_matches_numpy(fake_inception, which):
  weights, pb, tgz = fake_inception
  net = inception.InceptionNet(pb if which == 'pb' else tgz)
  assert (net.feature_dim, net.num_classes) == (_DIM, _CLASSES)
  rng = np.random.default_rng(13)
  for height, width in ((8, 8), (16, 16), (5, 11)):
    images = rng.integers(0, 256, size=(7, height, width, 3), dtype=np.uint8)
    expected_f, expected_p = _expected_outputs(images, weights)
    for batch_size in (1, 3, 16):
      features, probs = net(images, batch_size=batch_size)
      assert features.shape == (7, _DIM) and probs.shape == (7, _CLASSES)
      np.testing.assert_allclose(features, expected_f, rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(probs, expected_p, rtol=1e-4, atol=1e-6)


def test_inception_net_gray_and_bad_input(fake_inception):
  weights, pb, _ = fake_inception
  net = inception.InceptionNet(pb)
  gray = np.random.default_rng(14).integers(0, 256, size=(4, 8, 8, 1), dtype=np.uint8)
  features, probs = net(gray)
  rgb_features, rgb_probs = net(np.repeat(gray, 3, axis=-1))
  np.testing.assert_array_equal(features, rgb_features)
  np.testing.assert_array_equal(probs, rgb_probs)
  np.testing.assert_allclose(features, _expected_outputs(gray, weights)[0], rtol=1e-4, atol=1e-5)
  with pytest.raises(TypeError, match='uint8'):
    net(gray.astype(np.float32) / 255.0)
  with pytest.raises(ValueError, match='shape'):
    net(gray[..., 0])
  empty_f, empty_p = net(gray[:0])
  assert empty_f.shape == (0, _DIM) and empty_p.shape == (0, _CLASSES)


def test_inception_protocol(fake_inception):
  _, pb, tgz = fake_inception
  sha = lambda path: hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()
  from_pb, from_tgz = inception.InceptionNet(pb).protocol(), inception.InceptionNet(tgz).protocol()
  assert from_pb['name'] == 'inception-2015-12-05 (pool_3)'
  assert from_pb['path'] == pb and from_pb['sha256'] == sha(pb) == from_pb['graph_sha256']
  assert from_tgz['path'] == tgz and from_tgz['sha256'] == sha(tgz)
  assert from_tgz['graph_sha256'] == sha(pb)  # The same graph, whichever file it came from.
  assert 'gray replicated to RGB' in from_pb['input'] and 'ResizeBilinear' in from_pb['input']
  assert (from_pb['feature_dim'], from_pb['num_classes']) == (_DIM, _CLASSES)


def test_inception_net_rejects_other_graphs(tmp_path):
  other = tmp_path / 'other.pb'
  tf = inception._tf()  # pylint: disable=protected-access
  graph = tf.Graph()
  with graph.as_default():
    tf.constant(1.0, name='ExpandDims')
  other.write_bytes(graph.as_graph_def().SerializeToString())
  with pytest.raises(ValueError, match='not the Inception graph'):
    inception.InceptionNet(str(other))
  with pytest.raises(FileNotFoundError, match='nowhere.pb'):
    inception.InceptionNet(str(tmp_path / 'nowhere.pb'))


# ------------------------------------------------------------------------------------------- resolve_weights.
def test_resolve_weights_given_path(fake_inception, tmp_path):
  _, pb, _ = fake_inception
  assert inception.resolve_weights(pb, str(tmp_path)) == pb
  missing = str(tmp_path / 'missing.pb')
  with pytest.raises(FileNotFoundError, match='missing.pb'):
    inception.resolve_weights(missing, str(tmp_path))


@pytest.mark.parametrize('which', ['pb', 'tgz'])
def test_resolve_weights_downloads_then_reuses_cache(fake_inception, tmp_path, monkeypatch, which):
  weights, pb, tgz = fake_inception
  source = pb if which == 'pb' else tgz
  unreachable = 'http://127.0.0.1:9/inception-2015-12-05.tgz'
  monkeypatch.setattr(inception, 'WEIGHTS_URLS', (unreachable, pathlib.Path(source).as_uri()))
  path = inception.resolve_weights(None, str(tmp_path))
  assert path == os.path.join(str(tmp_path), 'inception', inception.GRAPH_FILE)
  assert os.listdir(os.path.dirname(path)) == [inception.GRAPH_FILE]  # No temporary file left behind.
  assert pathlib.Path(path).read_bytes() == pathlib.Path(pb).read_bytes()
  images = np.full((2, 8, 8, 3), 200, np.uint8)
  np.testing.assert_allclose(inception.InceptionNet(path)(images)[0], _expected_outputs(images, weights)[0],
                             rtol=1e-4, atol=1e-5)
  monkeypatch.setattr(inception, 'WEIGHTS_URLS', (unreachable,))
  assert inception.resolve_weights(None, str(tmp_path)) == path  # The cached copy; no download.


def test_resolve_weights_offline_error(tmp_path, monkeypatch):
  unreachable = 'http://127.0.0.1:9/inception-2015-12-05.tgz'
  monkeypatch.setattr(inception, 'WEIGHTS_URLS', (unreachable,))
  monkeypatch.setattr(inception, 'DOWNLOAD_TIMEOUT_S', 5.0)
  cached = os.path.join(str(tmp_path), 'inception', inception.GRAPH_FILE)
  for download in (True, False):
    with pytest.raises(inception.InceptionWeightsUnavailableError) as error:
      inception.resolve_weights(None, str(tmp_path), download=download)
    message = str(error.value)
    for needle in (unreachable, cached, inception.GRAPH_FILE, 'evaluation.inception_path', '--inception_path'):
      assert needle in message
  assert not os.path.exists(cached)


def test_resolve_weights_refuses_a_corrupt_download(tmp_path, monkeypatch):
  junk = tmp_path / 'junk.pb'
  junk.write_bytes(b'\x00this is not a graph' * 100)
  monkeypatch.setattr(inception, 'WEIGHTS_URLS', (junk.as_uri(),))
  with pytest.raises(inception.InceptionWeightsUnavailableError, match='junk.pb'):
    inception.resolve_weights(None, str(tmp_path / 'cache'))
  assert os.listdir(tmp_path / 'cache' / 'inception') == []


def test_write_atomic_leaves_nothing_on_failure(tmp_path):
  path = tmp_path / 'sub' / 'cache.npz'

  def fail(f):
    f.write(b'half')
    raise OSError('disk full')

  with pytest.raises(OSError, match='disk full'):
    paths.write_file(path, fail)
  assert os.listdir(tmp_path / 'sub') == []  # Neither the file nor its temporary.
  assert paths.write_file(path, lambda f: f.write(b'whole')) == str(path)
  assert path.read_bytes() == b'whole' and os.listdir(tmp_path / 'sub') == ['cache.npz']
