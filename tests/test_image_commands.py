"""The real-image commands ``invert``, ``edit`` and ``interpolate-images`` on the tiny model.

Every run uses 5 DDIM steps and two sklearn digits (0 and 3) upscaled 8 -> 32 px and saved as
greyscale PNGs, so ``load_image``'s RGB conversion is on the path. The commands load ``--model
tiny`` through ``smooth_jax.models.load``; here that returns tiny with its UNet output conv scaled
by 0.01 (the trick of test_inversion.py: the random UNet's eps, scaled down, is smooth enough for
DDIM inversion to work as with a trained model, and for NTI to have something to repair). The
numbers the commands write are checked against independent recomputations from the files.
"""

from __future__ import annotations

import argparse
import copy
import json

import jax
import numpy as np
import pytest
from PIL import Image

from smooth_jax import export, image_commands, images, inversion, lora, metrics, sampling

STEPS = 5
EPS_SCALE = 0.01
SIZE = 32  # tiny's image size
PROMPT = "a handwritten digit zero"
PROMPT3 = "a handwritten digit three"
TARGET = "a handwritten digit eight"


def run(*argv) -> int:
    """Parse and run a command as ``cli.main`` does, exceptions included (the CLI turns them into 2)."""
    parser = argparse.ArgumentParser(prog="smooth-jax")
    image_commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.fn(args)


def columns(path, n: int) -> list[np.ndarray]:
    """A one-row PNG grid of n square cells -> the cells, uint8 [S,S,3] each."""
    grid = np.asarray(Image.open(path).convert("RGB"))
    assert grid.shape == (SIZE, n * SIZE, 3)
    return [grid[:, i * SIZE:(i + 1) * SIZE] for i in range(n)]


def unit(cells) -> np.ndarray:
    """uint8 [H,W,3] cells -> float64 [N,3,H,W] in [0,1]."""
    return np.stack([np.asarray(c, np.float64).transpose(2, 0, 1) / 255.0 for c in cells])


def uint8(x) -> np.ndarray:
    """[N,3,H,W] in [-1,1] -> uint8 [N,H,W,3], as the PNG writer."""
    return images.to_uint8(np.asarray(x))


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scaled_sd(tiny_sd):
    """tiny with conv_out (kernel and bias) scaled by EPS_SCALE (see the module docstring)."""
    sd = copy.copy(tiny_sd)
    unet = dict(tiny_sd.params["unet"])
    unet["conv_out"] = jax.tree.map(lambda a: a * EPS_SCALE, unet["conv_out"])
    sd.params = {**tiny_sd.params, "unet": unet}
    return sd


@pytest.fixture(scope="module", autouse=True)
def tiny_is_scaled(scaled_sd):
    """``--model tiny`` gives ``scaled_sd`` (one object, so compiled functions are reused)."""
    from smooth_jax import models

    original = models.load
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "load", lambda source, **kw: scaled_sd if source == "tiny" else original(source, **kw))
        yield


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Digits 0 and 3 as 32x32 greyscale PNGs, a random kohya LoRA and a file that is no LoRA."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("image_commands")
    digits = load_digits().images
    paths = {}
    for i in (0, 3):
        pixels = np.kron(digits[i] / 16.0 * 255.0, np.ones((4, 4))).round().astype(np.uint8)
        paths[f"d{i}"] = root / f"digit{i}.png"
        Image.fromarray(pixels, mode="L").save(paths[f"d{i}"])
    return root, paths


@pytest.fixture(scope="module")
def lora_file(files, tiny_sd):
    root, _ = files
    spec = lora.LoraSpec(rank=4, alpha=4)
    tree = lora.random_like(jax.random.PRNGKey(0), lora.init(jax.random.PRNGKey(1), tiny_sd.params["unet"], spec), 0.2)
    return export.save(root / "smooth.safetensors", export.LoraFile(lora=lora.as_numpy(tree), alpha=4.0), "kohya")


@pytest.fixture(scope="module")
def encoded(scaled_sd, files):
    """Independent encodings: the two images [2,3,32,32], latents [2,4,16,16], prompt states."""
    _, paths = files
    pair = np.stack([images.load_image(paths["d0"], SIZE), images.load_image(paths["d3"], SIZE)])
    latents = inversion.encode_latents(scaled_sd, scaled_sd.params["vae"], pair)
    text = scaled_sd.params["text_encoder"]
    ctx, unc = sampling.encode_prompts(scaled_sd, text, [PROMPT])
    tgt, _ = sampling.encode_prompts(scaled_sd, text, [TARGET])
    decode = jax.jit(scaled_sd.decode_latents)
    return {"pair": pair, "latents": latents, "context": ctx, "uncond": unc, "target": tgt,
            "decode": lambda lat: np.asarray(decode(scaled_sd.params["vae"], lat))}


@pytest.fixture(scope="module")
def ddim_dir(files):
    root, paths = files
    assert run("invert", "--image", paths["d0"], "--prompt", PROMPT, "--steps", STEPS, "--out", root / "ddim") == 0
    return root / "ddim"


@pytest.fixture(scope="module")
def nti_dir(files):
    root, paths = files
    assert run("invert", "--image", paths["d0"], "--prompt", PROMPT, "--method", "nti", "--steps", STEPS,
               "--out", root / "nti") == 0
    return root / "nti"


# --- load_image -------------------------------------------------------------------------------


def test_load_image_resizes_shorter_side_and_centre_crops(tmp_path):
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (30, 50, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "wide.png")
    got = images.load_image(tmp_path / "wide.png", 12)
    # Independently: drop alpha, PIL bilinear to 12 x int(12 * 50 / 30) = 20, centre 12 columns from 4.
    small = np.asarray(Image.fromarray(rgba[..., :3]).resize((20, 12), Image.BILINEAR))[:, 4:16]
    assert got.shape == (3, 12, 12) and got.dtype == np.float32
    np.testing.assert_allclose(got, small.transpose(2, 0, 1) / 127.5 - 1.0, atol=1e-6)

    Image.fromarray(rgba[..., 0], mode="L").save(tmp_path / "grey.png")
    grey = images.load_image(tmp_path / "grey.png", 30)
    np.testing.assert_array_equal(grey[0], grey[2])  # greyscale -> 3 equal channels
    assert grey.min() >= -1.0 and grey.max() <= 1.0

    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="junk.png"):
        images.load_image(tmp_path / "junk.png", 32)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        images.load_image(tmp_path / "missing.png", 32)


# --- invert -----------------------------------------------------------------------------------


def _mse_bound(mse: float) -> float:
    """How far an MSE on [0,1] images can move when both images are rounded to uint8: each pixel
    error changes by d, |d| <= 1/255, so |mse' - mse| <= 2 sqrt(mse) / 255 + 1 / 255^2."""
    return 2.0 * np.sqrt(mse) / 255.0 + 1.0 / 255.0**2


def test_invert_ddim_metrics_match_the_written_files(ddim_dir, scaled_sd, encoded):
    report = json.loads((ddim_dir / "metrics.json").read_text())
    assert report["columns"] == ["input", "vae", "ddim_g1", "ddim_cfg"]
    assert report["steps"] == STEPS and report["guidance"] == 7.5 and report["model"] == "tiny"
    cells = dict(zip(report["columns"], unit(columns(ddim_dir / "reconstruction.png", 4))))
    # The input column is the preprocessed image.
    np.testing.assert_array_equal(uint8(encoded["pair"][:1])[0], (cells["input"] * 255).round().transpose(1, 2, 0))
    for ref in ("input", "vae"):
        for name, got in report[f"vs_{ref}"].items():
            x, y = cells[name][None], cells[ref][None]
            mse = float(np.mean((x - y) ** 2))
            assert abs(got["mse"] - mse) <= _mse_bound(mse), (ref, name, got, mse)
            assert got["psnr"] == pytest.approx(10 * np.log10(1 / got["mse"]), rel=1e-5)
            assert got["ssim"] == pytest.approx(float(metrics.ssim(x, y)[0]), abs=0.01)

    # From the npz: x_T is the DDIM inversion of the image, and guidance-1 sampling from it is the
    # g=1 column (to one uint8 level: a decode of another batch size).
    saved = np.load(ddim_dir / "inversion.npz")
    assert str(saved["method"]) == "ddim" and str(saved["prompt"]) == PROMPT and "nulls" not in saved.files
    x_T, _ = inversion.ddim_invert(scaled_sd, scaled_sd.params["unet"], encoded["latents"][:1], encoded["context"],
                                   num_steps=STEPS)
    np.testing.assert_allclose(saved["x_T"], x_T, rtol=0, atol=1e-6)
    rec = inversion.reconstruct(scaled_sd, scaled_sd.params["unet"], saved["x_T"], encoded["context"], num_steps=STEPS)
    diff = np.abs(uint8(encoded["decode"](rec))[0].astype(int) - (cells["ddim_g1"] * 255).round().transpose(1, 2, 0))
    assert diff.max() <= 1

    # Guidance 1 retraces the inversion: close to the VAE-only image, far closer than with CFG.
    g1, cfg = report["vs_vae"]["ddim_g1"]["mse"], report["vs_vae"]["ddim_cfg"]["mse"]
    spread = float(np.var(cells["vae"]))
    print(f"DDIM vs VAE-only MSE: g=1 {g1:.3g}, CFG {cfg:.3g} (VAE-only image variance {spread:.3g}); "
          f"latent MSE {report['latent_mse']}")
    assert g1 < 0.05 * spread and g1 < 0.3 * cfg  # measured: 3.4% and 0.14


def test_invert_nti_beats_ddim_with_cfg(nti_dir, ddim_dir, scaled_sd, encoded):
    report = json.loads((nti_dir / "metrics.json").read_text())
    assert report["columns"] == ["input", "vae", "ddim_g1", "ddim_cfg", "nti_cfg"]
    ddim_report = json.loads((ddim_dir / "metrics.json").read_text())
    assert report["vs_vae"]["ddim_cfg"] == ddim_report["vs_vae"]["ddim_cfg"]  # same baseline in both runs
    cfg, nti = report["vs_vae"]["ddim_cfg"]["mse"], report["vs_vae"]["nti_cfg"]["mse"]
    taken = report["nti"]["inner_steps_taken"]
    print(f"vs VAE-only MSE: DDIM+CFG {cfg:.3g}, NTI {nti:.3g}; latent MSE {report['latent_mse']}; "
          f"NTI inner steps {taken}")
    assert nti < 0.5 * cfg
    assert len(taken) == STEPS and all(1 <= n <= 10 for n in taken)

    saved = np.load(nti_dir / "inversion.npz")
    assert saved["nulls"].shape == (STEPS, 1) + encoded["context"].shape[1:]
    rec = inversion.sample_with_nulls(scaled_sd, scaled_sd.params["unet"], saved["x_T"], encoded["context"],
                                      saved["nulls"], num_steps=STEPS)
    cell = columns(nti_dir / "reconstruction.png", 5)[4]
    assert np.abs(uint8(encoded["decode"](rec))[0].astype(int) - cell).max() <= 1


# --- edit -------------------------------------------------------------------------------------


def test_edit_columns_and_reuse(files, nti_dir, ddim_dir, scaled_sd, encoded):
    root, paths = files
    common = ["--image", paths["d0"], "--source-prompt", PROMPT, "--target-prompt", TARGET, "--steps", STEPS]
    ratios = ["--ratio", "0", "--ratio", "1", "--ratio", "0.6"]
    assert run("edit", *common, *ratios, "--out", root / "edit.png") == 0
    inp, rec, r0, r1, r06 = columns(root / "edit.png", 5)
    np.testing.assert_array_equal(inp, uint8(encoded["pair"][:1])[0])
    np.testing.assert_array_equal(r0, rec)  # ratio 0 never switches: the NTI reconstruction, bit for bit

    # ratio 1 = sampling from x_T with the target prompt and the nulls (those of `invert --method nti`:
    # the same NTI on the same inputs).
    saved = np.load(nti_dir / "inversion.npz")
    full = inversion.sample_with_nulls(scaled_sd, scaled_sd.params["unet"], saved["x_T"], encoded["target"],
                                       saved["nulls"], num_steps=STEPS)
    assert np.abs(uint8(encoded["decode"](full))[0].astype(int) - r1).max() <= 1
    mse = lambda a, b: float(np.mean((a.astype(float) - b.astype(float)) ** 2))  # noqa: E731
    print(f"edit MSE (uint8^2): r=0.6 vs reconstruction {mse(r06, rec):.3g}, vs r=1 {mse(r06, r1):.3g}; "
          f"reconstruction vs r=1 {mse(rec, r1):.3g}")
    assert mse(rec, r1) > 0 and mse(r06, rec) > 0 and mse(r06, r1) > 0

    # Reusing the saved inversion gives the same PNG.
    assert run("edit", *common, *ratios, "--inversion", nti_dir / "inversion.npz", "--out", root / "reuse.png") == 0
    np.testing.assert_array_equal(np.asarray(Image.open(root / "reuse.png")), np.asarray(Image.open(root / "edit.png")))

    # A saved inversion made with other settings is refused, naming what differs.
    npz = nti_dir / "inversion.npz"
    with pytest.raises(ValueError, match="prompt: saved 'a handwritten digit zero', this run 'a digit'"):
        run("edit", *common, "--source-prompt", "a digit", "--inversion", npz, "--out", root / "x.png")
    with pytest.raises(ValueError, match=r"steps: saved 5, this run 4.*guidance: saved 7.5, this run 3"):
        run("edit", *common, "--steps", 4, "--guidance", 3, "--inversion", npz, "--out", root / "x.png")
    with pytest.raises(ValueError, match="image_sha256"):
        run("edit", *common, "--image", paths["d3"], "--inversion", npz, "--out", root / "x.png")
    with pytest.raises(ValueError, match="--method ddim"):
        run("edit", *common, "--inversion", ddim_dir / "inversion.npz", "--out", root / "x.png")
    with pytest.raises(ValueError, match=r"--ratio 1.5 is outside \[0, 1\]"):
        run("edit", *common, "--ratio", 1.5, "--out", root / "x.png")
    assert not (root / "x.png").exists()


# --- interpolate-images -----------------------------------------------------------------------


def test_interpolate_images_ends_reconstruct_both_images(files, lora_file, scaled_sd, encoded):
    root, paths = files
    frames = 4
    assert run("interpolate-images", "--image", paths["d0"], "--image", paths["d3"], "--prompt", PROMPT,
               "--prompt2", PROMPT3, "--frames", frames, "--lora", lora_file, "--steps", STEPS,
               "--out", root / "strip.png", "--gif", root / "strip.gif") == 0
    grid = np.asarray(Image.open(root / "strip.png"))
    assert grid.shape == (2 * SIZE, (frames + 2) * SIZE, 3)  # rows base, LoRA; input A | 4 frames | input B
    rows = [[grid[r * SIZE:(r + 1) * SIZE, c * SIZE:(c + 1) * SIZE] for c in range(frames + 2)] for r in range(2)]
    inputs = uint8(encoded["pair"])
    for row in rows:
        np.testing.assert_array_equal(row[0], inputs[0])
        np.testing.assert_array_equal(row[-1], inputs[1])
    for name in ("base", "smooth"):
        gif = Image.open(root / f"strip_{name}.gif")
        assert gif.n_frames == 2 * frames - 2  # there and back, the end frames not repeated

    # Independently: the shared-null NTI of the pair, and its two reconstructions in one batch.
    text = scaled_sd.params["text_encoder"]
    ctx, unc = sampling.encode_prompts(scaled_sd, text, [PROMPT, PROMPT3])
    unet = scaled_sd.params["unet"]
    pair = inversion.null_text_invert_pair(scaled_sd, unet, encoded["latents"], ctx, unc[:1], num_steps=STEPS)
    assert pair.nulls.shape == (STEPS, 1) + ctx.shape[1:]
    rec = uint8(encoded["decode"](inversion.sample_with_nulls(scaled_sd, unet, pair.x_T, ctx, pair.nulls,
                                                              num_steps=STEPS)))
    base = rows[0][1:-1]
    ends = np.stack([base[0], base[-1]])
    assert np.abs(ends.astype(int) - rec).max() <= 1  # frames 0 and F-1 are the two reconstructions

    vae_only = uint8(encoded["decode"](encoded["latents"]))
    err = lambda a, b: float(np.mean((unit(a) - unit(b)) ** 2))  # noqa: E731
    apart = err(vae_only[:1], vae_only[1:])
    end_err = [err(ends[i:i + 1], vae_only[i:i + 1]) for i in (0, 1)]
    mid = [err(base[1:2], ends[:1]), err(base[1:2], ends[1:])]
    print(f"end frames vs VAE-only MSE {end_err}, the two VAE-only images apart {apart:.3g}; "
          f"frame 1 vs the ends {mid}")
    assert max(end_err) < 0.1 * apart
    assert min(mid) > 0  # the middle frames are new images
    lora_row = np.stack(rows[1][1:-1])
    assert np.abs(lora_row.astype(int) - np.stack(base)).max() > 0  # the LoRA's own inversion and frames


# --- errors -----------------------------------------------------------------------------------


def test_user_errors_are_value_or_file_errors(files, tmp_path):
    _, paths = files
    with pytest.raises(FileNotFoundError, match="nope.png"):
        run("invert", "--image", tmp_path / "nope.png", "--prompt", "x", "--out", tmp_path / "o")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="bad.safetensors"):
        run("invert", "--image", paths["d0"], "--prompt", "x", "--lora", tmp_path / "bad.safetensors",
            "--steps", STEPS, "--out", tmp_path / "o")
    with pytest.raises(ValueError, match="exactly two --image"):
        run("interpolate-images", "--image", paths["d0"], "--prompt", "x", "--out", tmp_path / "s.png")
    with pytest.raises(ValueError, match="guidance > 1"):
        run("invert", "--image", paths["d0"], "--prompt", "x", "--method", "nti", "--guidance", 1,
            "--out", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_cli_exit_status_2():
    """Once cli.build_parser registers the commands, user errors exit with status 2."""
    from smooth_jax import cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "edit" not in sub.choices:
        pytest.skip("cli.build_parser does not call image_commands.register yet")
    assert cli.main(["edit", "--image", "i.png", "--source-prompt", "a", "--target-prompt", "b", "--ratio", "-0.1",
                     "--out", "e.png"]) == 2


@pytest.mark.torch
def test_invert_from_a_diffusers_folder(torch_pipeline_dir, tmp_path, files):
    """``--model FOLDER`` (a diffusers-format PyTorch folder of tiny's architecture) works as a
    user types it; the run records the folder's absolute path."""
    _, paths = files
    assert run("invert", "--image", paths["d0"], "--prompt", PROMPT, "--model", torch_pipeline_dir,
               "--steps", STEPS, "--out", tmp_path / "folder") == 0
    report = json.loads((tmp_path / "folder" / "metrics.json").read_text())
    assert report["model"] == str(torch_pipeline_dir.resolve())
    assert np.isfinite(report["vs_input"]["ddim_g1"]["mse"])
