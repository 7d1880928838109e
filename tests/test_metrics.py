"""smooth_jax.metrics: closed forms, scikit-image / numpy / PyTorch references, weight loading.

The feature networks (CLIP, LPIPS, FID Inception) are checked on random weights: the same random
weights are built in PyTorch (transformers' CLIPModel, a torchvision-layout AlexNet, an
independently written FID Inception), saved in the official file layouts, loaded back by path,
and the outputs compared.
"""

from __future__ import annotations

import numpy as np
import pytest

from smooth_jax import metrics
from smooth_jax.metrics import MissingWeightsError



# ---------------------------------------------------------------------------------------------
# ISTD


def _slerp(a, b, w):
    a_, b_ = a.ravel(), b.ravel()
    theta = np.arccos(np.dot(a_, b_) / (np.linalg.norm(a_) * np.linalg.norm(b_)))
    return (np.sin((1 - w) * theta) * a + np.sin(w * theta) * b) / np.sin(theta)


def test_istd_zero_for_images_linear_in_the_mix_weight():
    rng = np.random.default_rng(1)
    p, h = 3, 8
    a, b = rng.random((p, 3, h, h)), rng.random((p, 3, h, h))
    w = np.linspace(0, 1, 11)[None, :, None, None, None]
    strips = (a[:, None] + w * (b - a)[:, None]).astype(np.float32)
    out = metrics.istd(strips)
    np.testing.assert_allclose(out["per_prompt_std"], 0.0, atol=1e-5)
    assert out["istd"] < 1e-5
    np.testing.assert_allclose(
        out["per_prompt_mean_distance"], np.linalg.norm((b - a).reshape(p, -1), axis=1) / 10, rtol=1e-5
    )
    assert out["scale"].startswith("images in [0,1], L2 norm over all C*H*W pixels")


def test_istd_zero_for_an_isometric_model_on_slerped_noise():
    """A model linear in its input noise and norm-preserving (a signed permutation), fed the
    paper's 11 slerp mixes of two equal-norm noises: slerp has constant speed, so every adjacent
    distance is the same chord and ISTD is 0."""
    rng = np.random.default_rng(2)
    n = 3 * 8 * 8
    z0 = rng.standard_normal(n)
    z1 = rng.standard_normal(n)
    z1 *= np.linalg.norm(z0) / np.linalg.norm(z1)
    perm, signs = rng.permutation(n), rng.choice([-1.0, 1.0], n)
    model = lambda z: 0.5 + 0.01 * (signs * z)[perm]  # noqa: E731
    frames = np.stack([model(_slerp(z0, z1, w)).reshape(3, 8, 8) for w in np.linspace(0, 1, 11)])
    d = np.asarray(metrics.adjacent_distances(frames.astype(np.float32)))
    assert d.shape == (10,)
    np.testing.assert_allclose(d, d[0], rtol=1e-4)
    assert metrics.istd(frames[None].astype(np.float32))["istd"] < 1e-4 * d[0]


def test_istd_hand_made_example():
    # Constant images: the distance between constants c and c' over 3*2*2 = 12 values is |c - c'| sqrt(12).
    levels = np.array([[0.0, 0.1, 0.3, 0.6], [0.2, 0.2, 0.4, 0.6]])
    strips = np.broadcast_to(levels[:, :, None, None, None], (2, 4, 3, 2, 2)).astype(np.float32)
    out = metrics.istd(strips)
    # Prompt 0: steps 0.1, 0.2, 0.3 -> distances sqrt(12) * [.1, .2, .3], population std sqrt(12) * sqrt(.02/3).
    # Prompt 1: steps 0, 0.2, 0.2   -> population std sqrt(12) * sqrt(((0-.4/3)^2 + 2 (.2-.4/3)^2) / 3).
    s0 = np.sqrt(12) * np.sqrt(0.02 / 3)
    m1 = 0.4 / 3
    s1 = np.sqrt(12) * np.sqrt((m1**2 + 2 * (0.2 - m1) ** 2) / 3)
    np.testing.assert_allclose(out["per_prompt_std"], [s0, s1], rtol=1e-5)
    np.testing.assert_allclose(out["istd"], (s0 + s1) / 2, rtol=1e-5)
    np.testing.assert_allclose(out["per_prompt_mean_distance"], np.sqrt(12) * np.array([0.2, 0.4 / 3]), rtol=1e-5)
    np.testing.assert_allclose(out["distances"][0], np.sqrt(12) * np.array([0.1, 0.2, 0.3]), rtol=1e-5)


def test_istd_matches_numpy_and_accepts_minus_one_to_one():
    rng = np.random.default_rng(3)
    strips = rng.random((2, 11, 3, 8, 8)).astype(np.float32)
    d = np.linalg.norm(np.diff(strips.astype(np.float64), axis=1).reshape(2, 10, -1), axis=-1)
    out = metrics.istd(strips)
    np.testing.assert_allclose(out["per_prompt_std"], d.std(axis=1, ddof=0), rtol=1e-4)
    np.testing.assert_allclose(out["istd"], d.std(axis=1).mean(), rtol=1e-4)
    signed = metrics.istd(strips * 2 - 1, value_range=(-1, 1))
    np.testing.assert_allclose(signed["per_prompt_std"], out["per_prompt_std"], rtol=1e-4)
    as_png = np.round(strips * 255).astype(np.uint8)  # saved frames read back: value_range (0, 255)
    np.testing.assert_allclose(
        metrics.istd(as_png, value_range=(0, 255))["istd"], metrics.istd(as_png / np.float32(255))["istd"], rtol=1e-5
    )
    # Chunked: distances computed per prompt, combined afterwards.
    chunked = metrics.istd_from_distances(np.concatenate([metrics.adjacent_distances(s[None]) for s in strips]))
    np.testing.assert_allclose(chunked["istd"], out["istd"], rtol=1e-6)
    with pytest.raises(ValueError):
        metrics.istd(strips[:, :1])


# ---------------------------------------------------------------------------------------------
# MSE, PSNR, SSIM


def test_mse_psnr_closed_form():
    # Constants that are exact in binary, so float32 sums are exact.
    x = np.zeros((2, 3, 16, 16), np.float32)
    y = np.stack([np.full((3, 16, 16), 0.125), np.full((3, 16, 16), 0.5)]).astype(np.float32)
    np.testing.assert_allclose(metrics.mse(x, y), [0.015625, 0.25], rtol=1e-7)
    want_psnr = [10 * np.log10(64), 10 * np.log10(4)]
    np.testing.assert_allclose(metrics.psnr(x, y), want_psnr, rtol=1e-6)
    # The same images on the [-1, 1] scale give the same numbers ([0,1] units).
    np.testing.assert_allclose(metrics.psnr(2 * x - 1, 2 * y - 1, value_range=[-1, 1]), want_psnr, rtol=1e-6)
    assert np.isinf(np.asarray(metrics.psnr(y, y))).all()
    out = metrics.reconstruction_metrics(x, y)
    np.testing.assert_allclose(out["mse"], (0.015625 + 0.25) / 2, rtol=1e-7)
    np.testing.assert_allclose(out["psnr"], np.mean(want_psnr), rtol=1e-6)
    # Constant images: no variance, so SSIM is the luminance term C1 / (m^2 + C1), C1 = 0.01^2.
    c1 = 1e-4
    np.testing.assert_allclose(metrics.ssim(x, y), [c1 / (0.015625 + c1), c1 / (0.25 + c1)], rtol=1e-4)
    np.testing.assert_allclose(out["ssim"], np.mean([c1 / (0.015625 + c1), c1 / (0.25 + c1)]), rtol=1e-4)


def test_ssim_matches_scikit_image():
    rng = np.random.default_rng(4)
    skm = pytest.importorskip("skimage.metrics")
    x = rng.random((3, 3, 24, 20))
    y = np.clip(x + 0.2 * rng.standard_normal(x.shape), 0, 1)
    y[1] = 0.7 * x[1] + 0.1  # a luminance/contrast change
    y[2] = rng.random((3, 24, 20))  # unrelated
    ours = np.asarray(metrics.ssim(x.astype(np.float32), y.astype(np.float32)))
    ref = [
        skm.structural_similarity(
            a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=0
        )
        for a, b in zip(x, y)
    ]
    np.testing.assert_allclose(ours, ref, atol=2e-6)
    np.testing.assert_allclose(metrics.ssim(x.astype(np.float32), x.astype(np.float32)), 1.0, atol=1e-6)
    signed = metrics.ssim((2 * x - 1).astype(np.float32), (2 * y - 1).astype(np.float32), value_range=(-1, 1))
    np.testing.assert_allclose(signed, ref, atol=2e-6)


# ---------------------------------------------------------------------------------------------
# Fréchet distance


def _random_spd(d, rng):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_distance_closed_forms(method):
    rng = np.random.default_rng(5)
    d = 6
    s = _random_spd(d, rng)
    mu = rng.standard_normal(d)
    shift = rng.standard_normal(d)
    assert abs(metrics.frechet_distance(mu, s, mu, s, method=method)) < 1e-9
    np.testing.assert_allclose(metrics.frechet_distance(mu, s, mu + shift, s, method=method), shift @ shift, rtol=1e-9)
    # Diagonal: sum (sqrt(a) - sqrt(b))^2.
    a, b = rng.random(d) + 0.1, rng.random(d) + 0.1
    np.testing.assert_allclose(
        metrics.frechet_distance(mu, np.diag(a), mu, np.diag(b), method=method),
        np.sum((np.sqrt(a) - np.sqrt(b)) ** 2),
        rtol=1e-9,
    )
    # Commuting (same eigenbasis): the same formula on the eigenvalues.
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    np.testing.assert_allclose(
        metrics.frechet_distance(mu, q @ np.diag(a) @ q.T, mu + shift, q @ np.diag(b) @ q.T, method=method),
        shift @ shift + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2),
        rtol=1e-8,
    )


def test_frechet_methods_agree_and_eigh_handles_singular_covariances():
    rng = np.random.default_rng(6)
    s1, s2 = _random_spd(8, rng), _random_spd(8, rng)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    np.testing.assert_allclose(
        metrics.frechet_distance(mu1, s1, mu2, s2, method="eigh"),
        metrics.frechet_distance(mu1, s1, mu2, s2, method="sqrtm"),
        rtol=1e-8,
    )
    # Fewer samples than dimensions: rank-deficient covariances, still finite and >= 0.
    f1, f2 = rng.standard_normal((5, 16)), rng.standard_normal((5, 16)) + 1.0
    value = metrics.fid(f1, f2)
    assert np.isfinite(value) and value > 0


def test_feature_statistics_and_running_statistics():
    rng = np.random.default_rng(7)
    f = rng.standard_normal((50, 4)) * [1, 2, 3, 4] + 100.0
    mu, sigma = metrics.feature_statistics(f)
    np.testing.assert_allclose(mu, f.mean(0))
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False, ddof=1))
    running = metrics.RunningStatistics()
    for chunk in np.array_split(f, 4):
        running.update(chunk)
    rmu, rsigma = running.result()
    np.testing.assert_allclose(rmu, mu, rtol=1e-12)
    np.testing.assert_allclose(rsigma, sigma, rtol=1e-9)
    # Two samples of the same distribution: FID small next to a shifted one.
    g = rng.standard_normal((400, 4))
    h = rng.standard_normal((400, 4))
    assert metrics.fid(g, h) < 0.1 < metrics.fid(g, h + 1.0)
    np.testing.assert_allclose(metrics.fid(g, h + 1.0) - metrics.fid(g, h), 4.0, rtol=0.2)


def test_extract_batches_and_drops_padding():
    rng = np.random.default_rng(8)
    class Mean:
        name = "test"

        def __call__(self, images):
            assert images.shape[0] == 4
            return images.reshape(images.shape[0], -1).mean(1, keepdims=True)

    assert isinstance(Mean(), metrics.FeatureExtractor)
    images = rng.random((10, 3, 2, 2))
    np.testing.assert_allclose(metrics.extract(Mean(), images, batch_size=4)[:, 0], images.reshape(10, -1).mean(1))


# ---------------------------------------------------------------------------------------------
# CLIP score


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A small random CLIP (real 49,408-token vocabulary, 77-token context) saved by transformers'
    PyTorch CLIPModel (model.safetensors + config.json), and the torch model itself."""
    torch = pytest.importorskip("torch")
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():
        # This random model puts every image at cos ~ -0.3 from every text; flipping the image
        # projection makes the scores positive, so the test sees more than the clamp at 0.
        model.visual_projection.weight.neg_()
    out = tmp_path_factory.mktemp("clip")
    model.save_pretrained(out)
    return out, model


PROMPTS = ["a photo of a cat", "a red car on a road", "an astronaut riding a horse", "x"]


def test_clip_score_matches_torch_clip_and_formula(clip_dir):
    rng = np.random.default_rng(9)
    import torch

    from smooth_jax.metrics.clip import CLIPScorer, clip_preprocess

    folder, tmodel = clip_dir
    scorer = CLIPScorer.from_pretrained(folder)
    images = rng.random((4, 3, 40, 48)).astype(np.float32)
    scores = scorer.scores(images, PROMPTS)
    assert scores.shape == (4,) and np.all((scores > 0) & (scores <= 100))
    np.testing.assert_allclose(scorer(images, PROMPTS), scores.mean(), rtol=1e-6)

    # The formula, recomputed in numpy from the model's own embeddings.
    img = np.asarray(scorer.bundle.image_features(images), np.float64)
    txt = np.asarray(scorer.bundle.text_features(PROMPTS), np.float64)
    cos = np.sum(img * txt, 1) / (np.linalg.norm(img, axis=1) * np.linalg.norm(txt, axis=1))
    np.testing.assert_allclose(scores, 100 * np.maximum(cos, 0), atol=1e-4)

    # The embeddings equal PyTorch CLIP's on the same pixels and tokens (checks the weight conversion).
    ids, mask = scorer.bundle.tokenize(PROMPTS)
    assert ids.shape == (4, 77) and (ids == 49407).any(axis=1).all()
    pixels = np.array(clip_preprocess(images, resize_to=32, crop_to=32))
    with torch.no_grad():
        t_img = tmodel.get_image_features(pixel_values=torch.from_numpy(pixels)).numpy()
        t_txt = tmodel.get_text_features(input_ids=torch.from_numpy(ids).long(),
                                         attention_mask=torch.from_numpy(mask).long()).numpy()
    np.testing.assert_allclose(img, t_img, atol=1e-4)
    np.testing.assert_allclose(txt, t_txt, atol=1e-4)


def test_clip_score_formula_clamps_at_zero():
    from smooth_jax.metrics.clip import clip_score_from_embeddings

    i = np.array([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0]], np.float32)
    t = np.array([[2.0, 0.0], [-1.0, 0.0], [4.0, 3.0]], np.float32)
    np.testing.assert_allclose(clip_score_from_embeddings(i, t), [100.0, 0.0, 96.0], rtol=1e-6)


def test_clip_preprocess_matches_clip_image_processor():
    rng = np.random.default_rng(10)
    from transformers import CLIPImageProcessor

    from smooth_jax.metrics.clip import clip_preprocess

    image = rng.random((3, 50, 70)).astype(np.float32)
    # Quantise first: the processor works on uint8 images.
    image = np.round(image * 255) / 255
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ref = proc(images=(image.transpose(1, 2, 0) * 255).round().astype(np.uint8), return_tensors="np")["pixel_values"]
    ours = np.asarray(clip_preprocess(image[None], resize_to=32, crop_to=32))
    assert ours.shape == ref.shape == (1, 3, 32, 32)
    # uint8 rounding of the resized image and resampler details: a few 1/255 steps / CLIP std.
    assert np.abs(ours - ref).mean() < 0.02
    assert np.abs(ours - ref).max() < 0.15


def test_clip_image_features_fid_clip_and_flax_weights(clip_dir, tmp_path):
    rng = np.random.default_rng(11)
    from smooth_jax.metrics.clip import CLIPImageFeatures, CLIPScorer

    folder, _ = clip_dir
    extractor = CLIPImageFeatures.from_pretrained(folder)
    assert isinstance(extractor, metrics.FeatureExtractor) and "FID_CLIP" in extractor.name
    images = rng.random((4, 3, 32, 32)).astype(np.float32)
    feats = extractor(images)
    assert feats.shape == (4, 16)
    assert metrics.fid(feats, feats) == pytest.approx(0.0, abs=1e-6)
    # Re-saved as Flax msgpack and loaded back: the same features.
    bundle = extractor.bundle
    bundle.model.save_pretrained(tmp_path, params=bundle.params)
    assert (tmp_path / "flax_model.msgpack").exists()
    np.testing.assert_allclose(CLIPImageFeatures.from_pretrained(tmp_path)(images), feats, atol=1e-6)
    assert CLIPScorer.from_pretrained(tmp_path).bundle.max_length == 77


# ---------------------------------------------------------------------------------------------
# LPIPS

_ALEX_CONVS = {0: (3, 64, 11, 4, 2), 3: (64, 192, 5, 1, 2), 6: (192, 384, 3, 1, 1), 8: (384, 256, 3, 1, 1),
               10: (256, 256, 3, 1, 1)}


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """Random weights in the official layouts: torchvision AlexNet (``features.{i}.*``, plus a
    classifier that must be ignored) and lpips heads (``lin{l}.model.1.weight``, non-negative)."""
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(1)
    features = nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
    ).eval()
    with torch.no_grad():
        for m in features:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                m.bias.uniform_(-0.1, 0.1)
    backbone = {f"features.{k}": v for k, v in features.state_dict().items()}
    backbone["classifier.1.weight"] = torch.randn(10, 9216)
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate([64, 192, 384, 256, 256])}
    d = tmp_path_factory.mktemp("lpips")
    torch.save(backbone, d / "alexnet.pth")
    torch.save(heads, d / "alex.pth")
    return d, features, heads


def _torch_lpips(features, heads, x, y):
    """LPIPS v0.1 as the lpips package computes it, images in [-1, 1]."""
    import torch

    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    taps = [1, 4, 7, 9, 11]

    def feats(img):
        h, out = (img - shift) / scale, []
        for i, layer in enumerate(features):
            h = layer(h)
            if i in taps:
                out.append(h)
        return out

    total = 0
    with torch.no_grad():
        for i, (a, b) in enumerate(zip(feats(x), feats(y))):
            a = a / (torch.sqrt(torch.sum(a**2, dim=1, keepdim=True)) + 1e-10)
            b = b / (torch.sqrt(torch.sum(b**2, dim=1, keepdim=True)) + 1e-10)
            lin = torch.nn.functional.conv2d((a - b) ** 2, heads[f"lin{i}.model.1.weight"])
            total = total + lin.mean(dim=(1, 2, 3))
    return total.numpy()


def test_lpips_matches_torch_reference(lpips_files):
    rng = np.random.default_rng(12)
    import torch

    from smooth_jax.metrics.lpips import LPIPS

    d, features, heads = lpips_files
    model = LPIPS.from_paths(d / "alexnet.pth", d / "alex.pth")
    x = rng.random((3, 3, 64, 64)).astype(np.float32)
    y = np.clip(x + 0.3 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)
    ours = np.asarray(model(x, y))
    ref = _torch_lpips(features, heads, torch.from_numpy(2 * x - 1), torch.from_numpy(2 * y - 1))
    assert ours.shape == (3,) and np.all(ours > 0)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(model(y, x), ours, rtol=1e-5)  # symmetric
    np.testing.assert_allclose(model(x, x), 0.0, atol=1e-10)  # identical -> 0
    np.testing.assert_allclose(model(2 * x - 1, 2 * y - 1, value_range=(-1, 1)), ours, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# FID InceptionV3


def _torch_fid_inception():
    """pytorch-fid's FID InceptionV3, written out independently in plain PyTorch (torchvision's
    module names; FID blocks: avg pools ignore padding, Mixed_7c max-pools)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Basic(nn.Module):
        def __init__(self, i, o, k, s=1, p=0):
            super().__init__()
            self.conv = nn.Conv2d(i, o, k, s, p, bias=False)
            self.bn = nn.BatchNorm2d(o, eps=0.001)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))

    def avg(x):
        return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)

    class A(nn.Module):
        def __init__(self, i, pf):
            super().__init__()
            self.branch1x1 = Basic(i, 64, 1)
            self.branch5x5_1, self.branch5x5_2 = Basic(i, 48, 1), Basic(48, 64, 5, p=2)
            self.branch3x3dbl_1, self.branch3x3dbl_2 = Basic(i, 64, 1), Basic(64, 96, 3, p=1)
            self.branch3x3dbl_3 = Basic(96, 96, 3, p=1)
            self.branch_pool = Basic(i, pf, 1)

        def forward(self, x):
            return torch.cat([
                self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))), self.branch_pool(avg(x)),
            ], 1)

    class B(nn.Module):
        def __init__(self, i):
            super().__init__()
            self.branch3x3 = Basic(i, 384, 3, s=2)
            self.branch3x3dbl_1, self.branch3x3dbl_2 = Basic(i, 64, 1), Basic(64, 96, 3, p=1)
            self.branch3x3dbl_3 = Basic(96, 96, 3, s=2)

        def forward(self, x):
            return torch.cat([
                self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, 3, 2),
            ], 1)

    class C(nn.Module):
        def __init__(self, i, c):
            super().__init__()
            self.branch1x1 = Basic(i, 192, 1)
            self.branch7x7_1, self.branch7x7_2 = Basic(i, c, 1), Basic(c, c, (1, 7), p=(0, 3))
            self.branch7x7_3 = Basic(c, 192, (7, 1), p=(3, 0))
            self.branch7x7dbl_1, self.branch7x7dbl_2 = Basic(i, c, 1), Basic(c, c, (7, 1), p=(3, 0))
            self.branch7x7dbl_3, self.branch7x7dbl_4 = Basic(c, c, (1, 7), p=(0, 3)), Basic(c, c, (7, 1), p=(3, 0))
            self.branch7x7dbl_5 = Basic(c, 192, (1, 7), p=(0, 3))
            self.branch_pool = Basic(i, 192, 1)

        def forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            bd = self.branch7x7dbl_1(x)
            for m in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
                bd = m(bd)
            return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(avg(x))], 1)

    class D(nn.Module):
        def __init__(self, i):
            super().__init__()
            self.branch3x3_1, self.branch3x3_2 = Basic(i, 192, 1), Basic(192, 320, 3, s=2)
            self.branch7x7x3_1, self.branch7x7x3_2 = Basic(i, 192, 1), Basic(192, 192, (1, 7), p=(0, 3))
            self.branch7x7x3_3, self.branch7x7x3_4 = Basic(192, 192, (7, 1), p=(3, 0)), Basic(192, 192, 3, s=2)

        def forward(self, x):
            b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
            return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, 2)], 1)

    class E(nn.Module):
        def __init__(self, i, pool):
            super().__init__()
            self.pool = pool
            self.branch1x1 = Basic(i, 320, 1)
            self.branch3x3_1 = Basic(i, 384, 1)
            self.branch3x3_2a, self.branch3x3_2b = Basic(384, 384, (1, 3), p=(0, 1)), Basic(384, 384, (3, 1), p=(1, 0))
            self.branch3x3dbl_1, self.branch3x3dbl_2 = Basic(i, 448, 1), Basic(448, 384, 3, p=1)
            self.branch3x3dbl_3a = Basic(384, 384, (1, 3), p=(0, 1))
            self.branch3x3dbl_3b = Basic(384, 384, (3, 1), p=(1, 0))
            self.branch_pool = Basic(i, 192, 1)

        def forward(self, x):
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
            p = avg(x) if self.pool == "avg" else F.max_pool2d(x, 3, 1, 1)
            return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(p)], 1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = Basic(3, 32, 3, s=2), Basic(32, 32, 3)
            self.Conv2d_2b_3x3, self.Conv2d_3b_1x1 = Basic(32, 64, 3, p=1), Basic(64, 80, 1)
            self.Conv2d_4a_3x3 = Basic(80, 192, 3)
            self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
            self.Mixed_6a = B(288)
            self.Mixed_6b, self.Mixed_6c = C(768, 128), C(768, 160)
            self.Mixed_6d, self.Mixed_6e = C(768, 160), C(768, 192)
            self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = D(768), E(1280, "avg"), E(2048, "max")
            self.fc = nn.Linear(2048, 1008)

        def forward(self, x):  # x in [0, 1], already resized to 299x299
            x = 2 * x - 1
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
            x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))
            x = F.max_pool2d(x, 3, 2)
            for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
                x = getattr(self, f"Mixed_{name}")(x)
            return x.mean(dim=(2, 3))

    return Net()


def test_fid_inception_matches_torch_reference(tmp_path):
    rng = np.random.default_rng(13)
    torch = pytest.importorskip("torch")
    from smooth_jax.metrics.inception import InceptionV3Features

    torch.manual_seed(2)
    net = _torch_fid_inception().eval()
    with torch.no_grad():
        # He-normal convs and near-identity BatchNorm keep the input's signal through ~95 layers
        # (PyTorch's default init shrinks it until every image gets the same features).
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.8, 1.2)
                m.weight.uniform_(0.8, 1.2)
                m.bias.uniform_(-0.1, 0.1)
    torch.save(net.state_dict(), tmp_path / "pt_inception.pth")
    extractor = InceptionV3Features.from_path(tmp_path / "pt_inception.pth")
    assert isinstance(extractor, metrics.FeatureExtractor) and extractor.name.startswith("FID (InceptionV3")
    # pytorch-fid's path: bilinear resize to 299 (last blocks at 8x8, so every pooling mode matters).
    x = rng.random((2, 3, 64, 48)).astype(np.float32)
    x[1] = 0.2 + 0.3 * x[1]  # a darker, flatter image: clearly different features
    ours = extractor(x)
    with torch.no_grad():
        resized = torch.nn.functional.interpolate(torch.from_numpy(x), size=(299, 299), mode="bilinear",
                                                  align_corners=False)
        ref = net(resized).numpy()
    assert ours.shape == (2, 2048)
    assert np.abs(ref[0] - ref[1]).max() > 0.05 * np.abs(ref).max()  # the features do depend on the image
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_inception_resize_matches_torch_interpolate():
    rng = np.random.default_rng(14)
    torch = pytest.importorskip("torch")
    from smooth_jax.metrics.inception import resize_bilinear

    for size in (20, 45):  # up and down
        x = rng.random((1, 3, 32, 32)).astype(np.float32)
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(x), size=(size, size), mode="bilinear", align_corners=False
        )
        np.testing.assert_allclose(resize_bilinear(x, size), ref.numpy(), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Missing weights


def test_missing_weights_messages(tmp_path):
    from smooth_jax.metrics.clip import CLIPImageFeatures, CLIPScorer
    from smooth_jax.metrics.inception import InceptionV3Features
    from smooth_jax.metrics.lpips import LPIPS

    with pytest.raises(MissingWeightsError) as e:
        CLIPScorer.from_pretrained(tmp_path / "nope")
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    assert "nope" in msg and "CLIP model folder" in msg and "openai/clip-vit-large-patch14" in msg
    assert "CLIPScorer.from_pretrained(path)" in msg

    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingWeightsError, match="config.json"):
        CLIPImageFeatures.from_pretrained(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(MissingWeightsError, match="model.safetensors"):
        CLIPImageFeatures.from_pretrained(tmp_path / "empty")

    (tmp_path / "alexnet.pth").write_bytes(b"")
    with pytest.raises(MissingWeightsError) as e:
        LPIPS.from_paths(tmp_path / "alexnet.pth", tmp_path / "heads" / "alex.pth")
    msg = str(e.value)
    assert "LPIPS alex heads alex.pth from the lpips package" in msg and "lpips_weights" in msg
    with pytest.raises(MissingWeightsError, match="alexnet-owt-7be5be79.pth"):
        LPIPS.from_paths(tmp_path / "missing.pth", tmp_path / "alex.pth")

    with pytest.raises(MissingWeightsError) as e:
        InceptionV3Features.from_path(tmp_path / "pt_inception.pth")
    msg = str(e.value)
    assert "pt_inception-2015-12-05-6726825d.pth" in msg and "pytorch-fid" in msg
    assert "InceptionV3Features.from_path(path)" in msg
