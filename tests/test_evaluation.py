"""Evaluation runs (``smooth-jax eval istd | reconstruct | edit``) on the tiny model.

Every run uses 5 DDIM steps, 2 prompts or 2 digits, 3 frames, and the shapes the generation and
inversion tests already compile. The numbers are checked against independent computations: ISTD
against ``Generator.interpolation`` with the recorded seeds, reconstruction and editing metrics
against the saved images. Where inversion is involved the model is the test UNet of
test_inversion.py (tiny's random UNet with its output conv scaled by 0.01, see there), given to the
runs by replacing ``inputs.load_model``. The metric networks are stand-ins (deterministic
functions of the pixels) that test the plumbing; the real networks are tested in test_metrics.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from smooth_jax import export, lora, metrics
from smooth_jax.evaluation import edit, inputs, istd, reconstruct, register, report
from smooth_jax.generation import Generator, load_lora_file

ROOT = Path(__file__).resolve().parents[1]
STEPS = 5
FRAMES = 3
PROMPTS = ["a handwritten digit two", "a handwritten digit seven"]
EPS_SCALE = 0.01


# --- stand-ins for the metric networks --------------------------------------------------------


class FakeCLIP:
    """CLIPScorer's interface: a deterministic score from the pixels and the prompt's length."""

    def scores(self, images, prompts):
        x = np.asarray(images, np.float64)
        return 100.0 * x.mean(axis=(1, 2, 3)) + np.array([0.1 * len(p) for p in prompts])


class FakeFeatures:
    """FeatureExtractor's interface: per-channel means and stds, [B, 6]."""

    name = "fake features (channel means and stds)"

    def __call__(self, images):
        x = np.asarray(images, np.float64)
        return np.concatenate([x.mean(axis=(2, 3)), x.std(axis=(2, 3))], axis=1).astype(np.float32)


def fake_lpips(x, y):
    return jnp.mean(jnp.abs(jnp.asarray(x) - jnp.asarray(y)), axis=(1, 2, 3))


def use_fake_nets(mp):
    mp.setattr(metrics.CLIPScorer, "from_pretrained", classmethod(lambda cls, path: FakeCLIP()))
    mp.setattr(metrics.InceptionV3Features, "from_path", classmethod(lambda cls, path: FakeFeatures()))
    mp.setattr(metrics.LPIPS, "from_paths", classmethod(lambda cls, b, h, net="alex": fake_lpips))


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_sd):
    """A prompt file; a zero LoRA (up = 0: the base model exactly) as peft and a random one as kohya."""
    d = tmp_path_factory.mktemp("eval_inputs")
    (d / "prompts.txt").write_text("# two digits\n" + "\n".join(PROMPTS) + "\n\n")
    spec = lora.LoraSpec(rank=4, alpha=4)
    zero = lora.init(jax.random.PRNGKey(1), tiny_sd.params["unet"], spec)
    rand = lora.random_like(jax.random.PRNGKey(0), zero, 0.2)
    export.save(d / "zero.safetensors", export.LoraFile(lora=lora.as_numpy(zero), alpha=4.0), "peft")
    export.save(d / "rand.safetensors", export.LoraFile(lora=lora.as_numpy(rand), alpha=4.0), "kohya")
    return d


def istd_config(files, **kw):
    return {**istd.default_config(), "model": "tiny",
            "loras": [f"zero={files / 'zero.safetensors'}", str(files / "rand.safetensors")],
            "prompts_file": str(files / "prompts.txt"), "frames": FRAMES, "steps": STEPS, "seed": 3,
            "metrics": {"clip": "clip-folder", "fid_inception": "pt_inception.pth", "fid_clip": None, "digits": True},
            "fid_data": inputs.data_spec("digits"), "fid_num_images": 6, **kw}


@pytest.fixture(scope="module")
def istd_run(tmp_path_factory, tiny_sd, files):
    out = tmp_path_factory.mktemp("istd")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inputs, "load_model", lambda source: tiny_sd)
        use_fake_nets(mp)
        results = istd.run(istd_config(files), str(out), progress=False)
    return out, results


@pytest.fixture(scope="module")
def scaled_sd(tiny_sd):
    """tiny with conv_out scaled by 0.01 (test_inversion.py): a UNet for which inversion works."""
    unet = dict(tiny_sd.params["unet"])
    unet["conv_out"] = jax.tree.map(lambda a: a * EPS_SCALE, unet["conv_out"])
    return dataclasses.replace(tiny_sd, params={**tiny_sd.params, "unet": unet})


@pytest.fixture(scope="module")
def reconstruct_run(tmp_path_factory, scaled_sd, files):
    out = tmp_path_factory.mktemp("reconstruct")
    config = {**reconstruct.default_config(), "loras": [str(files / "rand.safetensors")], "num_images": 2,
              "steps": STEPS, "batch_images": 2, "grids": 2,
              "metrics": {"lpips_backbone": "alex.pth", "lpips_heads": "heads.pth", "lpips_net": "alex"}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inputs, "load_model", lambda source: scaled_sd)
        use_fake_nets(mp)
        results = reconstruct.run(config, str(out), progress=False)
    return out, results


# --- istd -------------------------------------------------------------------------------------


def test_istd_equals_recomputation_with_generator(istd_run, tiny_sd, files):
    """Each model's per-prompt distances and ISTD equal a recomputation with ``Generator.interpolation``
    from the recorded seeds (which are SeedSequence([seed, i])'s first two words); CLIP score and
    FID equal the stand-in networks applied to the recomputed end frames and to the digits read
    through the data pipeline."""
    out, results = istd_run
    from smooth_jax.data import default_data_config, make_single_pass_iterator
    c = default_data_config()
    c.resolution, c.center_crop, c.shuffle = 32, True, False
    real = (next(iter(make_single_pass_iterator(c, tiny_sd.tokenizer, batch_size=6)))["images"] + 1) / 2
    from smooth_jax.metrics.digits import DigitJudge

    judge = DigitJudge.fit()
    for name, path in [("base", None), ("rand", files / "rand.safetensors")]:
        gen = Generator(tiny_sd, None if path is None else load_lora_file(str(path), tiny_sd.params["unet"]),
                        num_steps=STEPS, guidance_scale=7.5)
        m = results["models"][name]
        stds, ends = [], []
        for i, (prompt, rec) in enumerate(zip(PROMPTS, m["per_item"])):
            seeds = [int(s) for s in np.random.SeedSequence([3, i]).generate_state(2)]
            assert rec["seeds"] == seeds and rec["prompt"] == prompt
            frames = np.clip((gen.interpolation(prompt, prompt, *seeds, frames=FRAMES) + 1) / 2, 0, 1)
            d = np.sqrt(((frames[1:].astype(np.float64) - frames[:-1]) ** 2).sum(axis=(1, 2, 3)))
            np.testing.assert_allclose(rec["distances"], d, rtol=1e-4)
            stds.append(d.std())
            ends.append(frames[[0, -1]])
            np.testing.assert_allclose(rec["clip_score"], FakeCLIP().scores(frames[[0, -1]], [prompt] * 2).mean(),
                                       rtol=1e-4)
            label = {"two": 2, "seven": 7}[prompt.split()[-1]]
            assert rec["digit_correct"] == [int(v) for v in judge.predict(frames[[0, -1]]) == label]
        np.testing.assert_allclose(m["metrics"]["istd"]["mean"], np.mean(stds), rtol=1e-4)
        np.testing.assert_allclose(m["metrics"]["istd"]["std"], np.std(stds), rtol=1e-3)
        fid = metrics.fid(FakeFeatures()(real), FakeFeatures()(np.concatenate(ends)))
        assert m["metrics"]["FID"]["n_generated"] == 4 and m["metrics"]["FID"]["n_real"] == 6
        np.testing.assert_allclose(m["metrics"]["FID"]["value"], fid, rtol=1e-3)
        np.testing.assert_allclose(m["metrics"]["FD_digits"]["value"], judge.frechet(np.concatenate(ends), real), rtol=1e-3)
        np.testing.assert_allclose(m["metrics"]["digit_accuracy"]["mean"],
                                   np.mean([np.mean(r["digit_correct"]) for r in m["per_item"]]))
    assert results["models"]["rand"]["metrics"]["istd"]["mean"] != results["models"]["base"]["metrics"]["istd"]["mean"]


def test_istd_models_share_noises_zero_lora_is_the_base(istd_run):
    """A LoRA with up = 0 renders the base model's frames bit for bit: same noises, same prompts.
    The grid has one row per model (base, zero, rand) and one column per frame."""
    out, results = istd_run
    base, zero = results["models"]["base"], results["models"]["zero"]
    assert [r["distances"] for r in zero["per_item"]] == [r["distances"] for r in base["per_item"]]
    zm, bm = dict(zero["metrics"]), dict(base["metrics"])
    fd = [m.pop("FD_digits")["value"] for m in (zm, bm)]
    assert zm == bm
    assert fd[0] == pytest.approx(fd[1], rel=1e-7)  # sklearn's threaded matmuls round differently per call
    for i in range(2):
        grid = np.asarray(Image.open(out / "grids" / f"istd_{i:03d}.png"))
        assert grid.shape == (3 * 32, FRAMES * 32, 3)
        assert np.array_equal(grid[:32], grid[32:64]) and not np.array_equal(grid[:32], grid[64:])


def test_istd_results_files(istd_run):
    """results.json: config with the LoRAs' hashes, the pixel scale, per-model summaries; results.md:
    Table 1's shape (rows: models; columns: ISTD, FID, CLIP score)."""
    out, results = istd_run
    saved = json.loads((out / "results.json").read_text())
    cfg = saved["config"]
    assert [m["name"] for m in cfg["models"]] == ["base", "zero", "rand"]
    assert cfg["models"][1]["sha256"] == hashlib.sha256(Path(cfg["models"][1]["lora"]).read_bytes()).hexdigest()
    assert (cfg["steps"], cfg["guidance"], cfg["frames"], cfg["num_prompts"], cfg["seed"]) == (STEPS, 7.5, FRAMES, 2, 3)
    assert "[0,1]" in saved["scale"] and "L2 norm over all C*H*W" in saved["scale"]
    assert saved["versions"]["jax"] == jax.__version__ and saved["skipped"] == {}
    assert saved["models"]["rand"]["metrics"]["istd"]["n"] == 2
    md = (out / "results.md").read_text()
    assert "| Model | ISTD ↓ | FID ↓ | FD_digits ↓ | CLIP score ↑ | digit accuracy ↑ |" in md
    for name in ("base", "zero", "rand"):
        istd_v = saved["models"][name]["metrics"]["istd"]
        assert f"| {name} | {istd_v['mean']:.4f} ± {istd_v['std']:.4f} |" in md
    assert len((out / "partial.jsonl").read_text().splitlines()) == 6


def test_istd_resume_reproduces_the_uninterrupted_run(istd_run, tiny_sd, files, tmp_path, monkeypatch, capsys):
    """Stopped after 2 results, then killed while writing the 4th (a cut line), then rerun: the
    results equal the uninterrupted run's exactly. Another config in the same folder is refused,
    naming the field."""
    monkeypatch.setattr(inputs, "load_model", lambda source: tiny_sd)
    use_fake_nets(monkeypatch)
    out = tmp_path / "istd"
    assert istd.run(istd_config(files), str(out), progress=False, stop_after=2) is None
    assert len(report.RunDir(out, {}).records()) == 2

    append = report.RunDir.append
    calls = []

    def crash_on_second(self, record):
        calls.append(record)
        if len(calls) == 2:
            with open(self.partial, "a") as f:
                f.write(json.dumps(record)[:25])  # a line cut by the crash
            raise KeyboardInterrupt
        append(self, record)

    monkeypatch.setattr(report.RunDir, "append", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        istd.run(istd_config(files), str(out), progress=False)
    monkeypatch.setattr(report.RunDir, "append", append)
    assert len(report.RunDir(out, {}).records()) == 3

    resumed = istd.run(istd_config(files), str(out), progress=False)
    assert "resuming" in capsys.readouterr().out and resumed["timing"]["resumed"]
    assert resumed["models"] == istd_run[1]["models"]  # every number, every item
    lines = (out / "partial.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(line) for line in lines)
    saved = json.loads((out / "results.json").read_text())
    assert saved["models"] == json.loads((istd_run[0] / "results.json").read_text())["models"]

    with pytest.raises(report.ConfigMismatchError, match="'steps' is 5 there and 4 now"):
        istd.run(istd_config(files, steps=4), str(out), progress=False)
    with pytest.raises(report.ConfigMismatchError, match=r"'models\[2\].name'"):
        istd.run(istd_config(files, loras=[f"zero={files / 'zero.safetensors'}", f"r2={files / 'rand.safetensors'}"]),
                 str(out), progress=False)
    # The same through the script's entry point: exit status 2 and the field in the message.
    argv = ["--lora", f"zero={files / 'zero.safetensors'}", "--lora", str(files / "rand.safetensors"),
            "--prompts", str(files / "prompts.txt"), "--steps", "5", "--seed", "3", "--clip", "clip-folder",
            "--fid-inception", "pt_inception.pth", "--fid-data", "digits", "--fid-num-images", "6",
            "--out", str(out), "--frames", "4"]
    assert istd.main(argv) == 2
    assert "'frames'" in capsys.readouterr().err


def test_istd_without_weights_reports_skipped_metrics(tmp_path, capsys):
    """No --clip / --fid-*: nothing is loaded, and the run says which metrics it leaves out and why,
    on stdout and in results.md / results.json. A weight path that was given but is missing is an
    error before any work."""
    cfg = {"metrics": {"clip": None, "fid_inception": None, "fid_clip": None}}
    nets = inputs.load_metric_nets(cfg, istd.METRICS)
    assert set(nets.skipped) == {"CLIP score", "FID"} and nets.clip is None and not nets.fid
    results = {"config": {"model": "tiny", "num_prompts": 2, "prompts": {"file": "p.txt"}, "frames": 3, "steps": 5,
                          "guidance": 7.5, "seed": 0},
               "scale": metrics.ISTD_SCALE, "skipped": nets.skipped,
               "models": {"base": {"metrics": {"istd": {"mean": 1.0, "std": 0.5, "n": 2}}}}}
    md = istd.markdown(results)
    assert "| Model | ISTD ↓ |\n" in md and "| base | 1.0000 ± 0.5000 |" in md
    assert "Skipped (weights not given): CLIP score: no --clip given" in md and "FID: no --fid-inception" in md

    prompts = tmp_path / "p.txt"
    prompts.write_text("a digit\n")
    assert istd.main(["--prompts", str(prompts), "--out", str(tmp_path / "o"), "--clip", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "CLIP model folder" in err and "nope" in err and "not found" in err
    assert not (tmp_path / "o" / "run_config.json").exists()  # the corrected command is not blocked


def test_istd_repeats_and_digit_prompts(files):
    """--repeats N evaluates every prompt N times with its own noises; --digits needs prompts that
    name a digit, checked before any work."""
    cfg, prompts = istd.resolve(istd_config(files, repeats=3))
    assert cfg["num_prompts"] == 6 and prompts == PROMPTS * 3 and cfg["repeats"] == 3
    assert len({istd.prompt_seeds(cfg["seed"], i) for i in range(6)}) == 6
    assert [istd.digit_label(p) for p in ("a handwritten digit zero", "digit 7, small", "A Handwritten Digit NINE")] == [0, 7, 9]
    for bad in ("a digit", "digits one and two"):
        with pytest.raises(ValueError, match="exactly one digit"):
            istd.digit_label(bad)
    (files / "words.txt").write_text("a photo of a cat\n")
    with pytest.raises(ValueError, match="a photo of a cat"):
        istd.resolve(istd_config(files, prompts_file=str(files / "words.txt")))
    with pytest.raises(ValueError, match="repeats"):
        istd.resolve(istd_config(files, repeats=0))


# --- reconstruct ------------------------------------------------------------------------------


def test_reconstruct_rows_nti_beats_ddim_and_values_match_saved_images(reconstruct_run, scaled_sd):
    """Rows: VAE only, then base and rand x (DDIM + CFG, DDIM guidance 1, NTI). With the scaled UNet
    NTI reconstructs better than DDIM inversion + CFG. Every per-image value equals the metric
    recomputed from the saved images, and the saved input / VAE-only images equal the digits
    through the data pipeline and decode(encode(x))."""
    out, results = reconstruct_run
    md = (out / "results.md").read_text()
    assert "| Model | Method | MSE ↓ | PSNR ↑ | SSIM ↑ | LPIPS ↓ |" in md
    for row in ("| — | VAE only |", "| base | DDIM inversion, CFG 7.5 |", "| base | DDIM inversion, guidance 1 |",
                "| base | NTI, CFG 7.5 |", "| rand | NTI, CFG 7.5 |"):
        assert row in md
    assert "## Against the VAE-only reconstruction" in md and "Skipped" not in md

    from smooth_jax import inversion
    from smooth_jax.data import default_data_config, make_single_pass_iterator

    c = default_data_config()
    c.resolution, c.center_crop, c.shuffle = 32, True, False
    x = next(iter(make_single_pass_iterator(c, scaled_sd.tokenizer, batch_size=2)))["images"]
    vae = np.clip((np.asarray(jax.jit(scaled_sd.decode_latents)(
        scaled_sd.params["vae"], inversion.encode_latents(scaled_sd, scaled_sd.params["vae"], x))) + 1) / 2, 0, 1)
    for name in ("base", "rand"):
        m = results["models"][name]
        for ref in ("vs_input", "vs_vae"):
            nti, ddim = m["metrics"]["nti"][ref]["mse"]["mean"], m["metrics"]["ddim_cfg"][ref]["mse"]["mean"]
            print(f"{name} {ref}: MSE NTI {nti:.5f}, DDIM+CFG {ddim:.5f}, "
                  f"DDIM g=1 {m['metrics']['ddim_g1'][ref]['mse']['mean']:.5f}")
            assert nti <= (ddim if ref == "vs_input" else 0.6 * ddim)  # vs_input includes the VAE's own error
        for i, rec in enumerate(m["per_item"]):
            a = report.RunDir(out, {}).load_arrays(i, name)
            np.testing.assert_array_equal(a["input"], (x[i] + 1) / 2)
            np.testing.assert_allclose(a["vae"], vae[i], atol=1e-5)
            for method in ("ddim_cfg", "ddim_g1", "nti"):
                for ref, y in (("vs_input", a["input"]), ("vs_vae", a["vae"])):
                    got, im = rec["methods"][method][ref], a[method].astype(np.float64)
                    mse = np.mean((im - y) ** 2)
                    np.testing.assert_allclose(got["mse"], mse, rtol=1e-5)
                    np.testing.assert_allclose(got["psnr"], 10 * np.log10(1 / mse), rtol=1e-5)
                    np.testing.assert_allclose(got["ssim"], float(metrics.ssim(im[None], y[None])[0]), rtol=1e-5)
                    np.testing.assert_allclose(got["lpips"], np.mean(np.abs(im - y)), rtol=1e-5)
        assert m["metrics"]["nti"]["mean_inner_steps"]["mean"] >= 1
    grid = np.asarray(Image.open(out / "grids" / "reconstruct_000.png"))
    assert grid.shape == (2 * 32, 5 * 32, 3)  # rows base, rand; input | VAE | 3 methods
    assert np.array_equal(grid[:32, :64], grid[32:, :64])  # same input and VAE-only image in every row


# --- edit -------------------------------------------------------------------------------------


def test_edit_grid_ratio_zero_is_the_reconstruction(reconstruct_run, scaled_sd, tmp_path, monkeypatch):
    """Ratio 0 is the NTI reconstruction bit for bit (grid column, saved arrays, MSE 0, PSNR inf),
    and that reconstruction is the reconstruct run's NTI image; ratio 0.6 changes the image. CLIP
    scores (stand-in) are those of the saved images; no LPIPS weights: reported as skipped."""
    monkeypatch.setattr(inputs, "load_model", lambda source: scaled_sd)
    use_fake_nets(monkeypatch)
    config = {**edit.default_config(), "target_template": "a handwritten digit {}", "target_words": ["eight", "four"],
              "num_images": 2, "ratios": [0.0, 0.6], "steps": STEPS, "batch_images": 2, "grids": 2,
              "metrics": {**edit.default_config()["metrics"], "clip": "clip-folder"}}
    out = tmp_path / "edit"
    results = edit.run(config, str(out), progress=False)
    recs = results["models"]["base"]["per_item"]
    assert [r["target"] for r in recs] == ["a handwritten digit eight", "a handwritten digit four"]
    assert [r["source"] for r in recs] == ["a handwritten digit zero", "a handwritten digit one"]
    rec_run = reconstruct_run[1]["models"]["base"]["per_item"]
    for i, r in enumerate(recs):
        a = report.RunDir(out, {}).load_arrays(i, "base")
        np.testing.assert_array_equal(a["edits"][0], a["reconstruction"])
        assert np.abs(a["edits"][1] - a["reconstruction"]).max() > 1e-3
        nti = report.RunDir(reconstruct_run[0], {}).load_arrays(i, "base")["nti"]
        np.testing.assert_array_equal(a["reconstruction"], nti)
        assert r["reconstruction"]["vs_input"] == {k: v for k, v in rec_run[i]["methods"]["nti"]["vs_input"].items()
                                                   if k != "lpips"}
        assert r["edits"]["0"]["vs_reconstruction"]["mse"] == 0.0
        np.testing.assert_allclose(r["edits"]["0.6"]["vs_reconstruction"]["mse"],
                                   np.mean((a["edits"][1].astype(np.float64) - a["reconstruction"]) ** 2), rtol=1e-5)
        np.testing.assert_allclose(r["edits"]["0.6"]["clip_target"],
                                   FakeCLIP().scores(a["edits"][1:], [r["target"]])[0], rtol=1e-6)
        np.testing.assert_allclose(r["reconstruction"]["clip_source"],
                                   FakeCLIP().scores(a["reconstruction"][None], [r["source"]])[0], rtol=1e-6)
        grid = np.asarray(Image.open(out / "grids" / f"edit_{i:03d}.png"))
        assert grid.shape == (32, 4 * 32, 3)  # input | reconstruction | r=0 | r=0.6
        assert np.array_equal(grid[:, 32:64], grid[:, 64:96]) and not np.array_equal(grid[:, 32:64], grid[:, 96:])
    saved = json.loads((out / "results.json").read_text())
    assert saved["models"]["base"]["metrics"]["edits"]["0"]["vs_reconstruction"]["psnr"]["mean"] == "inf"
    md = (out / "results.md").read_text()
    assert "| Model | Ratio r | MSE ↓ | PSNR ↑ | SSIM ↑ | CLIP score (target) ↑ |" in md and "| base | 0.6 |" in md
    assert "| Model | MSE ↓ | PSNR ↑ | SSIM ↑ | CLIP score (source) | CLIP score (target) |" in md
    assert "Skipped (weights not given): LPIPS: no --lpips-backbone" in md and "CLIP score: no" not in md


# --- options ----------------------------------------------------------------------------------


def test_lora_names_and_model_list(files):
    models = inputs.parse_loras([f"a={files / 'zero.safetensors'}", str(files / "rand.safetensors")])
    assert [m["name"] for m in models] == ["base", "a", "rand"] and models[0]["lora"] is None
    assert [m["name"] for m in inputs.parse_loras([str(files / "rand.safetensors")], base=False)] == ["rand"]
    with pytest.raises(ValueError, match="unique"):
        inputs.parse_loras([f"rand={files / 'zero.safetensors'}", str(files / "rand.safetensors")])
    with pytest.raises(ValueError, match="nothing to evaluate"):
        inputs.parse_loras([], base=False)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        inputs.parse_loras([str(files / "missing.safetensors")])


def test_first_difference_and_cut_partial_line(tmp_path):
    assert report.first_difference({"a": 1, "b": [1, {"c": 2}]}, {"a": 1, "b": [1, {"c": 3}]}) == ("b[1].c", 2, 3)
    assert report.first_difference({"a": 1}, {"a": 1, "z": 0}) == ("z", "<absent>", 0)
    assert report.first_difference({"a": [1]}, {"a": [1]}) is None
    rd = report.RunDir(tmp_path, {"x": 1})
    assert rd.start() is False
    rd.append({"model": "m", "item": 0, "v": 0.1})
    with open(rd.partial, "a") as f:
        f.write('{"model": "m", "item": 1, "v"')
    assert report.RunDir(tmp_path, {"x": 1}).start() is True  # repairs the cut line
    rd.append({"model": "m", "item": 1, "v": float("inf")})
    assert {k: r["v"] for k, r in rd.records().items()} == {("m", 0): 0.1, ("m", 1): float("inf")}
    assert report.summarize([float("inf")] * 2) == {"mean": float("inf"), "std": 0.0, "n": 2}


def test_register_adds_eval_commands_and_scripts_run():
    import argparse

    parser = argparse.ArgumentParser(prog="smooth-jax")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", "reconstruct", "--lora", "s=x.safetensors", "--method", "nti", "--out", "o"])
    assert args.fn is reconstruct.command and args.method == ["nti"] and args.lora == ["s=x.safetensors"]
    args = parser.parse_args(["eval", "edit", "--edits", "e.jsonl", "--ratio", "0.7", "--out", "o"])
    assert args.fn is edit.command and args.ratio == [0.7]
    options = {"istd": ["--prompts", "--frames", "--fid-inception"], "reconstruct": ["--method", "--lpips-heads"],
               "edit": ["--target-template", "--ratio"]}
    for script, words in options.items():
        text = subprocess.run([sys.executable, str(ROOT / "eval" / f"{script}.py"), "--help"], capture_output=True,
                              text=True, check=True, cwd=ROOT).stdout
        assert all(w in text for w in words), (script, text)
