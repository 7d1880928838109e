"""``smooth-jax demo``, the README's first command, end to end on a shrunk config."""

from __future__ import annotations

import json

import pytest

from smooth_jax import cli, export

SHRINK = [
    "--config.base.autoencoder.steps=2", "--config.base.autoencoder.batch_size=8",
    "--config.base.unet.steps=2", "--config.base.unet.batch_size=8", "--config.base.unet.warmup_steps=1",
    "--config.lora.train.steps=2", "--config.lora.train.batch_size=8", "--config.lora.log.every=1",
    "--config.eval.repeats=1", "--config.eval.frames=3", "--config.eval.steps=2", "--config.eval.fid_num_images=40",
    "--config.eval.num_images=4", "--config.eval.batch_images=4", "--config.eval.grids=1",
]


@pytest.mark.slow
def test_demo_end_to_end_then_reuses_everything(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOOTH_JAX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), *SHRINK]) == 0
    report = json.loads((out / "report.json").read_text())
    assert all(ok for _, _, ok in report["checks"])
    assert set(report["summary"]) == {"base", "plain", "smooth"}
    for name, row in report["summary"].items():
        assert row["istd"]["n"] == 10 and 0 <= row["digit_accuracy"]["mean"] <= 1 and row["fd_digits"] >= 0
        assert {"inversion_ddim_cfg", "inversion_ddim_g1"} <= set(row)
    for name in ("plain", "smooth"):
        for fmt in export.FORMATS:
            assert export.read_any(out / "runs" / name / f"lora_final_{fmt}.safetensors").format == fmt
    md = (out / "report.md").read_text()
    assert "| smooth |" in md and "istd/grids/istd_000.png" in md and (out / "istd" / "grids" / "istd_000.png").exists()
    assert (out / "reconstruct" / "grids" / "reconstruct_000.png").exists()

    # Identical settings and seeds: the first step (fresh LoRA, up = 0) sees the same batch, t and
    # noise in both runs, so the diffusion loss is equal; only the regularizer differs.
    first = {n: json.loads((out / "runs" / n / "metrics.jsonl").read_text().splitlines()[0]) for n in ("plain", "smooth")}
    assert first["plain"]["loss/base"] == pytest.approx(first["smooth"]["loss/base"], rel=1e-6)
    assert first["plain"]["loss/reg"] == 0 and first["smooth"]["loss/reg"] > 0
    assert report["training"]["smooth"]["final"]["reg/ema_a"] > 0

    # A rerun reuses the cached base model, the finished LoRA runs and the evaluation results.
    from smooth_jax import base_model, train

    monkeypatch.setattr(base_model, "train", lambda *a, **k: pytest.fail("base model trained again"))
    monkeypatch.setattr(train, "train_and_evaluate", lambda *a, **k: pytest.fail("LoRA trained again"))
    assert cli.main(["demo", "--out", str(out), *SHRINK]) == 0
    again = json.loads((out / "report.json").read_text())
    # Equal up to the last bits of FD_digits (recomputed from the saved features by threaded BLAS).
    assert _flat(again["summary"]) == pytest.approx(_flat(report["summary"]), rel=1e-7)


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}/{key}").items()}
    return {prefix: tree}
