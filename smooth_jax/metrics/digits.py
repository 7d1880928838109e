"""A quality measure fitted to the digits replication (sklearn ``load_digits``, 8x8 handwritten digits).

Inception FID and CLIP scores judge natural photos; on upsampled 8x8 digits they say little. For
the small-scale replication of Smooth Diffusion on ``DigitsSource`` we judge samples with a digit
classifier trained here, on the same data (no downloaded weights):

- **accuracy**: the fraction of samples the classifier reads as the digit their prompt asked for
  ("a handwritten digit seven" -> 7): the text-alignment score, in place of the CLIP score;
- **FD_digits**: the Fréchet distance (FID's formula, ``frechet.py``) between the classifier's
  hidden-layer activations of generated and real digits: the fidelity score, in place of FID.

Images are ``[N, 3, H, W]`` floats in [0, 1] with H, W multiples of 8. The channels are averaged
and each 8x8 block of pixels averaged to one, which takes the model's resolution back to the
classifier's 8x8 (and is exact for nearest-upsampled digits). Numbers depend on the classifier
(``seed``, ``hidden``), so compare them only between runs judged by the same one: ``name`` says
which.
"""

from __future__ import annotations

import numpy as np

from smooth_jax.metrics.frechet import feature_statistics, frechet_distance

DIGIT_SIZE = 8  # load_digits' images are 8x8
NUM_CLASSES = 10


def _downsample_to_digits(images01) -> np.ndarray:
    """``[N, C, H, W]`` in [0, 1] -> ``[N, 64]`` float64: channel mean, then 8x8 area average."""
    x = np.asarray(images01, dtype=np.float64)
    if x.ndim != 4 or x.shape[2] % DIGIT_SIZE or x.shape[3] % DIGIT_SIZE or x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(
            f"DigitJudge needs images [N, C, H, W] with H and W positive multiples of {DIGIT_SIZE} "
            f"(area-averaged to {DIGIT_SIZE}x{DIGIT_SIZE}), got shape {x.shape}."
        )
    n, _, h, w = x.shape
    # Averaging channels rather than taking one: a generated image's channels need not be equal.
    gray = x.mean(axis=1)
    kh, kw = h // DIGIT_SIZE, w // DIGIT_SIZE
    small = gray.reshape(n, DIGIT_SIZE, kh, DIGIT_SIZE, kw).mean(axis=(2, 4))
    return small.reshape(n, DIGIT_SIZE * DIGIT_SIZE)


class DigitJudge:
    """A one-hidden-layer ReLU MLP digit classifier (sklearn) that judges generated digits.

    Build with :meth:`fit`. Also a ``FeatureExtractor`` (``frechet.py``): ``judge(images)`` gives
    the hidden-layer features, so ``extract`` / ``fid`` work with it too.
    """

    def __init__(self, mlp, *, seed: int, hidden: int, held_out_accuracy: float):
        self.mlp = mlp
        self.seed = int(seed)
        self.hidden = int(hidden)
        self.held_out_accuracy = float(held_out_accuracy)
        self.name = (
            f"FD_digits (hidden layer of a {self.hidden}-unit MLP digit classifier trained on sklearn "
            f"digits, seed {self.seed})"
        )

    @classmethod
    def fit(cls, seed: int = 0, hidden: int = 64) -> "DigitJudge":
        """Train on a stratified 80% of ``load_digits`` (inputs v/16 in [0, 1], flattened to 64);
        ``held_out_accuracy`` is measured on the other 20%. Deterministic for a given seed."""
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        from sklearn.neural_network import MLPClassifier

        digits = load_digits()
        x = digits.images.reshape(len(digits.images), -1).astype(np.float64) / 16.0
        y = digits.target.astype(np.int64)
        x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
        # max_iter above the default 200: adam needs ~400 epochs here to meet its tolerance.
        mlp = MLPClassifier(hidden_layer_sizes=(hidden,), activation="relu", max_iter=1000, random_state=seed)
        mlp.fit(x_train, y_train)
        held_out = float(np.mean(mlp.predict(x_test) == y_test))
        return cls(mlp, seed=seed, hidden=hidden, held_out_accuracy=held_out)

    def to_input(self, images01) -> np.ndarray:
        """``[N, C, H, W]`` in [0, 1] (numpy or jax; H, W multiples of 8) -> classifier input
        ``[N, 64]`` float64. ValueError naming the shape otherwise."""
        return _downsample_to_digits(images01)

    def probabilities(self, images01) -> np.ndarray:
        """``[N, 3, H, W]`` in [0, 1] -> class probabilities ``[N, 10]`` (column i = digit i)."""
        return self.mlp.predict_proba(self.to_input(images01))

    def predict(self, images01) -> np.ndarray:
        """``[N, 3, H, W]`` in [0, 1] -> predicted digit ``[N]`` int64."""
        return np.asarray(self.mlp.predict(self.to_input(images01)), dtype=np.int64)

    def accuracy(self, images01, labels) -> float:
        """Fraction of ``images01 [N, 3, H, W]`` read as their ``labels [N]`` (the digit each
        sample's prompt asked for)."""
        labels = np.asarray(labels).reshape(-1)
        predicted = self.predict(images01)
        if labels.shape != predicted.shape:
            raise ValueError(f"labels must be [N] with N = {predicted.shape[0]} images, got shape {labels.shape}.")
        return float(np.mean(predicted == labels))

    def features(self, images01) -> np.ndarray:
        """``[N, 3, H, W]`` in [0, 1] -> hidden-layer ReLU activations ``[N, hidden]`` float64:
        the feature space of FD_digits, as pool3 is FID's."""
        x = self.to_input(images01)
        w, b = self.mlp.coefs_[0], self.mlp.intercepts_[0]
        return np.maximum(x @ w + b, 0.0)

    __call__ = features

    def frechet(self, images01, reference_images01, *, method: str = "eigh") -> float:
        """FD_digits: Fréchet distance between the Gaussian fits of the features of ``images01``
        ``[N1, 3, H, W]`` and ``reference_images01 [N2, 3, H', W']`` (each N >= 2). Biased upward
        for small N, like FID: compare only at equal N. ``method`` as in ``frechet_distance``."""
        mu1, sigma1 = feature_statistics(self.features(images01))
        mu2, sigma2 = feature_statistics(self.features(reference_images01))
        return frechet_distance(mu1, sigma1, mu2, sigma2, method=method)

    def __repr__(self) -> str:
        return f"DigitJudge(seed={self.seed}, hidden={self.hidden}, held_out_accuracy={self.held_out_accuracy:.4f})"


def reference_images(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """The 1797 real digits as training shows them to the model at ``resolution`` R: ``DigitsSource``
    uint8 8x8 RGB, PIL-bilinear resized to R -> ``(images01 [N, 3, R, R] float32 in [0, 1],
    labels [N] int64)``. The real side of FD_digits."""
    # Imported here: smooth_jax.data pulls in grain and jax, which the judge itself does not need.
    from smooth_jax.data.sources import DigitsSource
    from smooth_jax.data.transforms import resize_shorter_side

    source = DigitsSource()
    resized = np.stack([resize_shorter_side(img, int(resolution)) for img in source.images])  # [N, R, R, 3]
    images01 = (np.transpose(resized, (0, 3, 1, 2)).astype(np.float32) / 255.0).astype(np.float32)
    return images01, source.labels.copy()
