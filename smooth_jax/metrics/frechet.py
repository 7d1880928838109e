"""Fréchet distance between Gaussian fits of feature sets: the formula behind FID.

``FD = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})`` (Heusel et al. 2017). Which FID a number
is depends only on the feature network: InceptionV3 pool3 (2048-d, pytorch-fid's weights) gives
the standard FID (the usual reading of the paper's 12.70 -> 12.10); CLIP image embeddings give FID_CLIP
(Kynkäänniemi et al. 2023). The two are not comparable. Host-side numpy/scipy in float64.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class FeatureExtractor(Protocol):
    """What ``fid`` needs from a feature network.

    ``__call__(images)``: ``[B, 3, H, W]`` float images in [0, 1] (any H, W; the extractor resizes)
    -> ``[B, D]`` features. ``name`` says which FID variant the features give (e.g.
    ``"FID (InceptionV3 pool3, pytorch-fid weights)"``).
    """

    name: str

    def __call__(self, images) -> np.ndarray: ...


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian fit of ``features [N, D]`` -> ``(mu [D], sigma [D, D])`` in float64; sigma is the
    sample covariance (ddof=1), as pytorch-fid. N >= 2."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got shape {f.shape}.")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False, ddof=1))


class RunningStatistics:
    """``feature_statistics`` accumulated batch by batch (float64 sums), for feature sets too big to
    hold: ``update(features [B, D])`` any number of times, then ``result() -> (mu, sigma)``.
    Equal to ``feature_statistics`` of the concatenation up to float64 rounding."""

    def __init__(self):
        self.n = 0
        self._sum = None
        self._outer = None
        self._shift = None  # first batch's mean: sums of (f - shift) keep the variance accurate

    def update(self, features) -> "RunningStatistics":
        f = np.asarray(features, np.float64)
        if f.ndim != 2:
            raise ValueError(f"features must be [B, D], got shape {f.shape}.")
        if self._shift is None:
            d = f.shape[1]
            self._shift = f.mean(axis=0)
            self._sum, self._outer = np.zeros(d), np.zeros((d, d))
        c = f - self._shift
        self._sum += c.sum(axis=0)
        self._outer += c.T @ c
        self.n += f.shape[0]
        return self

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors, got {self.n}.")
        m = self._sum / self.n
        sigma = (self._outer - self.n * np.outer(m, m)) / (self.n - 1)
        return self._shift + m, sigma


def _trace_sqrt_product_eigh(s1: np.ndarray, s2: np.ndarray) -> float:
    """``Tr (S1 S2)^{1/2}`` for symmetric PSD S1, S2 as ``Tr (S1^{1/2} S2 S1^{1/2})^{1/2}``: the same
    eigenvalues, but of a symmetric matrix, so ``eigh`` applies and nothing goes complex."""
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r @ s2 @ r
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())


def _trace_sqrt_product_sqrtm(s1: np.ndarray, s2: np.ndarray, eps: float) -> float:
    """pytorch-fid's ``calculate_frechet_distance`` path: scipy ``sqrtm(S1 S2)``; eps on the diagonal
    if that is not finite; fail if the diagonal's imaginary part exceeds 1e-3."""
    from scipy import linalg

    def sqrtm(a):
        out = linalg.sqrtm(a)
        return out[0] if isinstance(out, tuple) else out

    covmean = sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(S1 S2) has an imaginary component {np.max(np.abs(covmean.imag))}.")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(mu1, sigma1, mu2, sigma2, *, method: str = "eigh", eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2): mu ``[D]``, sigma ``[D, D]``.

    Returns ``||mu1-mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr (sigma1 sigma2)^{1/2}`` in squared
    feature units. method: ``"eigh"`` (default; symmetric eigen form, stable for singular
    covariances) or ``"sqrtm"`` (pytorch-fid's exact recipe, eps regularisation included). The two
    agree to float64 rounding on well-conditioned covariances.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} {mu2.shape}, sigma {s1.shape} {s2.shape}.")
    if method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(s1, s2)
    elif method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(s1, s2, eps)
    else:
        raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}.")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def fid(real_features, fake_features, *, method: str = "eigh") -> float:
    """Fréchet distance between the Gaussian fits of two feature sets ``[N1, D]`` and ``[N2, D]``.

    The variant is the features' network: InceptionV3 pool3 features (``InceptionV3Features``) give
    standard FID, CLIP image embeddings (``CLIPImageFeatures``) give FID_CLIP; report which. FID
    is biased upward for small N, so compare numbers only at equal N.
    """
    return frechet_distance(*feature_statistics(real_features), *feature_statistics(fake_features), method=method)


def extract(extractor, images: np.ndarray, batch_size: int = 50) -> np.ndarray:
    """Features of ``images [N, 3, H, W]`` ([0, 1]) in batches of ``batch_size`` -> ``[N, D]``.
    The last batch is padded to ``batch_size`` (one compiled shape) and the padding dropped."""
    images = np.asarray(images)
    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
        out.append(np.asarray(extractor(chunk))[:n])
    return np.concatenate(out)
