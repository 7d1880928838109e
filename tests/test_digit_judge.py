"""DigitJudge (smooth_jax/metrics/digits.py): checked against numpy/scipy recomputations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg
from sklearn.datasets import load_digits

from smooth_jax.metrics.digits import DigitJudge, reference_images
from smooth_jax.metrics.frechet import FeatureExtractor


@pytest.fixture(scope="module")
def judge():
    return DigitJudge.fit(seed=0)


@pytest.fixture(scope="module")
def digits8():
    """load_digits as [N, 8, 8] in [0, 1] and labels [N]."""
    d = load_digits()
    return d.images / 16.0, d.target


@pytest.fixture(scope="module")
def real16():
    return reference_images(16)


def _upsample(gray8, size):
    """[N, 8, 8] -> [N, 3, size, size] by pixel repetition (nearest), channels equal."""
    k = size // 8
    big = np.stack([np.kron(g, np.ones((k, k))) for g in gray8])
    return np.repeat(big[:, None], 3, axis=1)


def _noise(n, size, seed=1):
    return np.random.default_rng(seed).random((n, 3, size, size))


def _relu(x):
    return np.maximum(x, 0.0)


def test_fit_accuracy_and_determinism(judge, digits8):
    assert judge.held_out_accuracy > 0.95
    again = DigitJudge.fit(seed=0)
    assert again.held_out_accuracy == judge.held_out_accuracy
    x = _upsample(digits8[0][:200], 16)
    np.testing.assert_array_equal(again.predict(x), judge.predict(x))
    np.testing.assert_array_equal(again.mlp.coefs_[0], judge.mlp.coefs_[0])
    assert isinstance(judge, FeatureExtractor)
    assert "seed 0" in judge.name and "64-unit" in judge.name


def test_features_and_predict_match_numpy_forward_pass(judge, digits8):
    gray8, _ = digits8
    x8 = gray8[:100].reshape(100, 64)
    w1, b1 = judge.mlp.coefs_[0], judge.mlp.intercepts_[0]
    w2, b2 = judge.mlp.coefs_[1], judge.mlp.intercepts_[1]
    hidden = _relu(x8 @ w1 + b1)
    logits = hidden @ w2 + b2

    feats = judge.features(_upsample(gray8[:100], 16))
    assert feats.shape == (100, 64) and feats.dtype == np.float64
    np.testing.assert_allclose(feats, hidden, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(judge(_upsample(gray8[:100], 32)), hidden, rtol=1e-12, atol=1e-12)

    np.testing.assert_array_equal(judge.predict(_upsample(gray8[:100], 16)), logits.argmax(axis=1))
    softmax = np.exp(logits - logits.max(axis=1, keepdims=True))
    softmax /= softmax.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(judge.probabilities(_upsample(gray8[:100], 16)), softmax, rtol=1e-9, atol=1e-12)


def test_area_downsampling_inverts_nearest_upsampling(judge, digits8):
    gray8 = digits8[0][:20]
    for size in (16, 32):
        np.testing.assert_allclose(judge.to_input(_upsample(gray8, size)), gray8.reshape(20, 64), atol=1e-12)
    # Channels are averaged, not read from one of them.
    rgb = np.stack([gray8, np.zeros_like(gray8), 2 * gray8], axis=1)  # mean = gray8
    np.testing.assert_allclose(judge.to_input(rgb), gray8.reshape(20, 64), atol=1e-12)
    # A 2x2 block averages to its mean.
    block = np.zeros((1, 3, 16, 16))
    block[0, :, 0, 0] = 1.0
    assert judge.to_input(block)[0, 0] == pytest.approx(0.25)
    # jax arrays are accepted.
    import jax.numpy as jnp

    np.testing.assert_allclose(
        judge.to_input(jnp.asarray(_upsample(gray8, 16), jnp.float32)), gray8.reshape(20, 64), atol=1e-6
    )


def test_bad_resolution_names_shape(judge):
    with pytest.raises(ValueError, match=r"\(2, 3, 12, 12\)"):
        judge.predict(np.zeros((2, 3, 12, 12)))
    with pytest.raises(ValueError, match=r"\(3, 16, 16\)"):
        judge.to_input(np.zeros((3, 16, 16)))


def test_reference_images_judged_correctly_noise_is_chance(judge, real16, digits8):
    images, labels = real16
    assert images.shape == (1797, 3, 16, 16) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    np.testing.assert_array_equal(labels, digits8[1])
    assert judge.accuracy(images, labels) > 0.9
    noise_labels = np.arange(500) % 10
    assert judge.accuracy(_noise(500, 16), noise_labels) < 0.35
    with pytest.raises(ValueError, match="labels"):
        judge.accuracy(images[:10], labels[:9])


def test_reference_images_other_resolution():
    images, labels = reference_images(32)
    assert images.shape == (1797, 3, 32, 32) and labels.shape == (1797,)


def _closed_form_fd(f1, f2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), pytorch-fid's way."""
    # Units dead (all zero) on both sets add exactly 0 to every term but make S1 S2 singular,
    # which scipy's sqrtm only approximates: leave them out.
    alive = f1.any(axis=0) | f2.any(axis=0)
    f1, f2 = f1[:, alive], f2[:, alive]
    mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
    s1, s2 = np.cov(f1, rowvar=False, ddof=1), np.cov(f2, rowvar=False, ddof=1)
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = covmean[0] if isinstance(covmean, tuple) else covmean
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def test_frechet(judge, real16):
    images, _ = real16
    first, second = images[:898], images[898:]
    rng = np.random.default_rng(2)
    noisy = np.clip(second + 0.2 * rng.standard_normal(second.shape), 0.0, 1.0).astype(np.float32)
    noise = _noise(898, 16)
    assert abs(judge.frechet(first, first)) < 1e-6
    fd_halves, fd_noisy, fd_noise = (judge.frechet(first, other) for other in (second, noisy, noise))
    # Real vs real < real vs degraded real < real vs no digit at all.
    assert fd_halves < fd_noisy < fd_noise
    assert fd_halves < 0.1 * fd_noise
    # Independent closed form, on pairs whose covariances are full rank once jointly dead units
    # are dropped (noise kills further units, and sqrtm of a singular product is inexact).
    f1, f2, fn = judge.features(first), judge.features(second), judge.features(noisy)
    assert fd_halves == pytest.approx(_closed_form_fd(f1, f2), rel=1e-6)
    assert fd_noisy == pytest.approx(_closed_form_fd(f1, fn), rel=1e-6)
