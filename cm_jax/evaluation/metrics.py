"""Sample-quality metrics on feature vectors: pure numpy, float64 inside.

The protocol these functions implement (the feature network is a separate choice, see cm_jax/evaluation/inception.py):
  * Frechet distance (FID when the features are Inception pool_3): ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2)
    between the Gaussians fitted to two feature sets; covariances with ddof=1 (np.cov), as TTUR and the ADM
    evaluator. The trace of the matrix square root is computed from the eigenvalues of the symmetric
    S1^1/2 S2 S1^1/2 (same spectrum as S1 S2), so there is no complex round-off to discard (scipy's sqrtm has).
  * Inception score: exp(E_x KL(p(y|x) || p(y))) on `splits` equal consecutive parts, mean and std over parts
    (improved-gan / TTUR; the ADM evaluator instead splits into parts of 5000 and reports the mean).
  * Improved precision and recall (Kynkaanniemi et al. 2019), k = 3 in the ADM evaluator: each point's ball has
    the radius of its k-th nearest neighbour within its own set (itself excluded); precision is the fraction of
    fake points inside some real ball, recall the fraction of real points inside some fake ball (<= on the
    boundary). Distances here are float64 (the ADM evaluator uses float16 when finite).
  * Memorisation: nearest-train distances of samples against those of held-out images (see `memorization`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterator, Optional

import numpy as np

from cm_jax.runtime import paths

DEFAULT_BATCH_SIZE = 1024  # Rows per distance block: a block holds batch_size * M float64 distances.


# ------------------------------------------------------------------------------------------------ Validation.
def _as_matrix(name: str, x: np.ndarray) -> np.ndarray:
  """x as a finite float64 (N, D) array, or a ValueError naming `name`."""
  x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(f'{name} must be 2-D (N, D), got shape {x.shape}')
  x = x.astype(np.float64, copy=False)
  if not np.all(np.isfinite(x)):
    raise ValueError(f'{name} has non-finite entries')
  return x


def _check_same_dim(**arrays_ND: np.ndarray) -> None:
  dims = {name: a.shape[1] for name, a in arrays_ND.items()}
  if len(set(dims.values())) != 1:
    raise ValueError(f'feature dimensions differ: {dims}')


def _check_nonempty(**arrays_ND: np.ndarray) -> None:
  for name, a in arrays_ND.items():
    if len(a) == 0:
      raise ValueError(f'{name} is empty')


# ---------------------------------------------------------------------------------------- Gaussian statistics.
@dataclasses.dataclass(frozen=True, eq=False)
class FeatureStats:
  """Mean (D,) and covariance (D, D) of `num` feature vectors: the sufficient statistics of a FID."""
  mu: np.ndarray
  sigma: np.ndarray
  num: int

  def __post_init__(self):
    mu = np.array(self.mu, np.float64)
    sigma = np.array(self.sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
      raise ValueError(f'FeatureStats wants mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}')
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
      raise ValueError('FeatureStats: non-finite mu or sigma')
    if int(self.num) != self.num or self.num < 2:
      raise ValueError(f'FeatureStats: num must be an integer >= 2, got {self.num}')
    mu.flags.writeable = False
    sigma.flags.writeable = False
    object.__setattr__(self, 'mu', mu)
    object.__setattr__(self, 'sigma', sigma)
    object.__setattr__(self, 'num', int(self.num))

  @classmethod
  def from_features(cls, features_ND: np.ndarray) -> FeatureStats:
    """Sample mean and unbiased covariance (ddof=1, as np.cov, TTUR and the ADM evaluator)."""
    features_ND = _as_matrix('features_ND', features_ND)
    if len(features_ND) < 2:
      raise ValueError(f'need at least 2 feature vectors for a covariance, got {len(features_ND)}')
    return cls(features_ND.mean(axis=0), np.cov(features_ND, rowvar=False), len(features_ND))

  def save(self, path: str | os.PathLike[str]) -> None:
    """Writes an .npz (mu, sigma, num) atomically: a temporary file in the same folder, then os.replace."""
    paths.write_file(path, lambda f: np.savez(f, mu=self.mu, sigma=self.sigma, num=np.int64(self.num)))

  @classmethod
  def load(cls, path: str | os.PathLike[str]) -> FeatureStats:
    """Reads a file written by `save`; a ValueError names the file if a key is missing."""
    with np.load(os.fspath(path), allow_pickle=False) as data:
      missing = {'mu', 'sigma', 'num'} - set(data.files)
      if missing:
        raise ValueError(f'{os.fspath(path)}: not a FeatureStats file (missing {sorted(missing)}; '
                         f'has {sorted(data.files)})')
      return cls(data['mu'], data['sigma'], int(data['num']))


def _sqrt_psd(sigma_DD: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix (round-off negative eigenvalues clipped to 0)."""
  eigvals, eigvecs = np.linalg.eigh(sigma_DD)
  return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def _as_covariance(name: str, sigma: np.ndarray, dim: int) -> np.ndarray:
  sigma = np.asarray(sigma, np.float64)
  if sigma.shape != (dim, dim):
    raise ValueError(f'{name} must have shape ({dim}, {dim}) to match the means, got {sigma.shape}')
  if not np.all(np.isfinite(sigma)):
    raise ValueError(f'{name} has non-finite entries')
  scale = np.max(np.abs(sigma), initial=0.0)
  if np.max(np.abs(sigma - sigma.T), initial=0.0) > 1e-5 * scale:
    raise ValueError(f'{name} is not symmetric: not a covariance matrix')
  return 0.5 * (sigma + sigma.T)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
  """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^1/2), the squared Frechet (W2) distance.

  tr (sigma1 sigma2)^1/2 is the sum of the square roots of the eigenvalues of sigma1^1/2 sigma2 sigma1^1/2, a
  symmetric PSD matrix with the spectrum of sigma1 sigma2: real arithmetic throughout, no eps regulariser.
  """
  mu1 = np.asarray(mu1, np.float64)
  mu2 = np.asarray(mu2, np.float64)
  if mu1.ndim != 1 or mu1.shape != mu2.shape:
    raise ValueError(f'means must be 1-D of equal length, got {mu1.shape} and {mu2.shape}')
  if not (np.all(np.isfinite(mu1)) and np.all(np.isfinite(mu2))):
    raise ValueError('means have non-finite entries')
  sigma1 = _as_covariance('sigma1', sigma1, mu1.size)
  sigma2 = _as_covariance('sigma2', sigma2, mu1.size)
  sqrt1 = _sqrt_psd(sigma1)
  inner = sqrt1 @ sigma2 @ sqrt1
  eigvals = np.linalg.eigvalsh(0.5 * (inner + inner.T))
  tr_covmean = np.sum(np.sqrt(np.clip(eigvals, 0.0, None)))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


# ---------------------------------------------------------------------------------------------- Inception score.
def inception_score(probs_NC: np.ndarray, splits: int = 10) -> tuple[float, float]:
  """exp(mean_x KL(p(y|x) || p(y))) on `splits` consecutive parts (p(y): the part's mean); (mean, std)."""
  probs_NC = _as_matrix('probs_NC', probs_NC)
  if splits < 1 or len(probs_NC) < splits:
    raise ValueError(f'need at least splits={splits} >= 1 rows, got {len(probs_NC)}')
  if np.any(probs_NC < 0) or not np.allclose(probs_NC.sum(axis=1), 1.0, atol=1e-3):
    raise ValueError('probs_NC rows must be probability vectors (non-negative, summing to 1)')
  scores = []
  for part in np.array_split(probs_NC, splits):
    marginal_C = part.mean(axis=0)
    with np.errstate(divide='ignore', invalid='ignore'):
      terms = np.where(part > 0, part * (np.log(part) - np.log(marginal_C)), 0.0)  # 0 log 0 = 0.
    scores.append(np.exp(terms.sum(axis=1).mean()))
  return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------------------------------- Pairwise distances.
def _sq_distance_blocks(queries_ND: np.ndarray, references_MD: np.ndarray,
                        batch_size: int) -> Iterator[tuple[slice, np.ndarray]]:
  """Yields (row slice, squared distances (b, M)) for row blocks of the queries; clamped at 0."""
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  ref_sq_M = np.einsum('md,md->m', references_MD, references_MD)
  for start in range(0, len(queries_ND), batch_size):
    rows = slice(start, min(start + batch_size, len(queries_ND)))
    block = queries_ND[rows]
    d2_BM = np.einsum('bd,bd->b', block, block)[:, None] - 2.0 * block @ references_MD.T + ref_sq_M[None, :]
    yield rows, np.maximum(d2_BM, 0.0)


def _kth_neighbour_sq_radii(features_ND: np.ndarray, k: int, batch_size: int) -> np.ndarray:
  """Squared distance of each point to its k-th nearest neighbour in the same set (itself excluded)."""
  if not 1 <= k < len(features_ND):
    raise ValueError(f'k={k} needs 1 <= k < number of points ({len(features_ND)})')
  radii_N = np.empty(len(features_ND))
  for rows, d2_BN in _sq_distance_blocks(features_ND, features_ND, batch_size):
    d2_BN[np.arange(d2_BN.shape[0]), np.arange(rows.start, rows.stop)] = 0.0  # Self first, whatever round-off.
    radii_N[rows] = np.partition(d2_BN, k, axis=1)[:, k]
  return radii_N


def precision_recall(real_ND: np.ndarray, fake_ND: np.ndarray, k: int = 3,
                     batch_size: int = DEFAULT_BATCH_SIZE) -> dict[str, float]:
  """Improved precision and recall (Kynkaanniemi et al. 2019) with k-th-neighbour balls.

  precision: fraction of fake points within the k-NN ball of some real point (fidelity);
  recall: fraction of real points within the k-NN ball of some fake point (coverage).
  Memory: about batch_size * max(N_real, N_fake) float64 at a time.
  """
  real_ND = _as_matrix('real_ND', real_ND)
  fake_ND = _as_matrix('fake_ND', fake_ND)
  _check_same_dim(real_ND=real_ND, fake_ND=fake_ND)
  real_radii = _kth_neighbour_sq_radii(real_ND, k, batch_size)
  fake_radii = _kth_neighbour_sq_radii(fake_ND, k, batch_size)
  real_covered = np.zeros(len(real_ND), bool)
  fake_covered = np.zeros(len(fake_ND), bool)
  for rows, d2_BM in _sq_distance_blocks(real_ND, fake_ND, batch_size):
    real_covered[rows] = np.any(d2_BM <= fake_radii[None, :], axis=1)
    fake_covered |= np.any(d2_BM <= real_radii[rows, None], axis=0)
  return {'precision': float(fake_covered.mean()), 'recall': float(real_covered.mean())}


def _nearest_neighbours(queries_ND: np.ndarray, references_MD: np.ndarray, batch_size: int,
                        on_rows: Optional[Callable[[int], None]] = None) -> tuple[np.ndarray, np.ndarray]:
  """(distances (N,), indices (N,)): nearest reference of each query, the distance recomputed exactly.
  on_rows(n) is called after each block of n queries (progress reporting)."""
  index_N = np.empty(len(queries_ND), np.int64)
  for rows, d2_BM in _sq_distance_blocks(queries_ND, references_MD, batch_size):
    index_N[rows] = np.argmin(d2_BM, axis=1)
    if on_rows is not None:
      on_rows(rows.stop - rows.start)
  # The expanded form |q|^2 - 2 q.r + |r|^2 cancels badly for near-copies; recompute the winner directly.
  return np.linalg.norm(queries_ND - references_MD[index_N], axis=1), index_N


def nearest_neighbour_distances(queries_ND: np.ndarray, references_MD: np.ndarray,
                                batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
  """Euclidean distance (N,) from each query to its nearest reference (exactly 0 for a copy)."""
  queries_ND = _as_matrix('queries_ND', queries_ND)
  references_MD = _as_matrix('references_MD', references_MD)
  _check_same_dim(queries_ND=queries_ND, references_MD=references_MD)
  _check_nonempty(references_MD=references_MD)
  return _nearest_neighbours(queries_ND, references_MD, batch_size)[0]


# ---------------------------------------------------------------------------------------------- Memorisation.
def memorization(samples_ND: np.ndarray, train_MD: np.ndarray, heldout_KD: np.ndarray,
                 batch_size: int = DEFAULT_BATCH_SIZE,
                 on_rows: Optional[Callable[[int], None]] = None) -> dict[str, float]:
  """Nearest-train-image distances of generated samples, against those of held-out images.

  Held-out (test) images were never trained on, so their distances to the train set are what an honest
  generalising model's samples should look like. How to read the result:
    ratio_median = median(samples) / median(heldout): ~1 for a generalising model; well below 1 means
      samples sit closer to training images than fresh data does (copying); above 1, samples are off the data.
    fraction_closer_than_heldout_p1: fraction of samples nearer to a train image than the 1st percentile of
      held-out distances; ~0.01 for a generalising model, far above 0.01 (up to 1 for copies) when memorising.
    samples_min == 0 means at least one exact copy of a training image.
  Distances are in whatever space the vectors live in (pixels or network features), so compare runs only in
  the same space.
  """
  samples_ND = _as_matrix('samples_ND', samples_ND)
  train_MD = _as_matrix('train_MD', train_MD)
  heldout_KD = _as_matrix('heldout_KD', heldout_KD)
  _check_same_dim(samples_ND=samples_ND, train_MD=train_MD, heldout_KD=heldout_KD)
  _check_nonempty(samples_ND=samples_ND, train_MD=train_MD, heldout_KD=heldout_KD)
  d_samples = _nearest_neighbours(samples_ND, train_MD, batch_size, on_rows)[0]
  d_heldout = _nearest_neighbours(heldout_KD, train_MD, batch_size, on_rows)[0]
  heldout_median = float(np.median(d_heldout))
  if heldout_median == 0.0:
    raise ValueError('half of the held-out images duplicate training images (median distance 0): the held-out '
                     'set cannot serve as the no-copying baseline')
  heldout_p1 = float(np.percentile(d_heldout, 1))
  return {
      'samples_median': float(np.median(d_samples)),
      'samples_p1': float(np.percentile(d_samples, 1)),
      'samples_min': float(d_samples.min()),
      'heldout_median': heldout_median,
      'heldout_p1': heldout_p1,
      'heldout_min': float(d_heldout.min()),
      'ratio_median': float(np.median(d_samples)) / heldout_median,
      'fraction_closer_than_heldout_p1': float(np.mean(d_samples < heldout_p1)),
  }
