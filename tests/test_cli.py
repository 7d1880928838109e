"""The ``smooth-jax`` commands as a user runs them (in-process, same argv)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from smooth_jax import cli, export, lora


def test_help_describes_real_options():
    for command, words in {
        "export": ["--format", "peft", "legacy", "kohya", "--out"],
        "import": ["--model", "--out"],
        "convert": ["--to"],
    }.items():
        text = subprocess.run([sys.executable, "-m", "smooth_jax.cli", command, "--help"],
                              capture_output=True, text=True, check=True).stdout
        assert all(w in text for w in words), (command, text)


def test_init_export_import_convert_info(tmp_path, capsys):
    native = tmp_path / "lora.msgpack"
    assert cli.main(["init-lora", "--model", "tiny", "--rank", "4", "--alpha", "2", "--out", str(native)]) == 0
    assert "19,968" not in capsys.readouterr().out  # rank 4, not 8
    lf = export.read_any(native)
    assert lf.rank == 4 and lf.alpha == 2 and len(lora.modules(lf.lora)) == 32
    for fmt in export.FORMATS:
        out = tmp_path / f"{fmt}.safetensors"
        assert cli.main(["export", str(native), "--out", str(out), "--format", fmt]) == 0
        assert cli.main(["import", str(out), "--model", "tiny", "--out", str(tmp_path / f"{fmt}.msgpack")]) == 0
        text = capsys.readouterr().out
        assert f"{fmt} format" in text and "compatible with tiny" in text
        back = export.read_any(tmp_path / f"{fmt}.msgpack")
        fa, fb = lora.flatten(lf.lora), lora.flatten(back.lora)
        if fmt == "legacy":  # alpha != rank: the scale is folded into up, the product is kept
            for m, (d, u) in lora.modules(lf.lora).items():
                d2, u2 = lora.modules(back.lora)[m]
                np.testing.assert_allclose(d @ u * lf.scale, d2 @ u2 * back.scale, rtol=1e-6, atol=1e-7)
        else:
            assert all(np.array_equal(fa[k], fb[k]) for k in fa) and back.alpha == 2
    assert cli.main(["convert", str(tmp_path / "kohya.safetensors"), str(tmp_path / "k2p.safetensors"), "--to", "peft"]) == 0
    assert export.read_any(tmp_path / "k2p.safetensors").format == "peft"
    assert cli.main(["info", str(tmp_path / "k2p.safetensors")]) == 0
    assert "rank 4, alpha 2" in capsys.readouterr().out


def test_import_against_wrong_model_is_a_clear_error(tmp_path, capsys):
    native = tmp_path / "lora.msgpack"
    cli.main(["init-lora", "--model", "tiny", "--out", str(native)])
    cli.main(["export", str(native), "--out", str(tmp_path / "l.safetensors")])
    capsys.readouterr()
    assert cli.main(["import", str(tmp_path / "l.safetensors"), "--model", "sd15"]) == 2
    err = capsys.readouterr().err
    assert "different architecture" in err and "down_blocks_0/attentions_0" in err
    assert cli.main(["export", str(tmp_path / "missing.msgpack"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "missing.msgpack" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.slow
def test_train_command_on_the_tiny_config(tmp_path):
    """`smooth-jax train --config configs/tiny.py` as a user runs it (shortened): checkpoints,
    TensorBoard events, per-step metrics, sample grids and the final LoRA in every format."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    work = tmp_path / "run"
    assert cli.main(["train", "--config", str(root / "configs" / "tiny.py"), "--workdir", str(work),
                     "--config.train.steps=4", "--config.checkpoint.every=2", "--config.log.sample_every=2",
                     "--config.mesh.num_devices=1", "--no-progress"]) == 0
    assert sorted(p.name for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert list((work / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (work / "samples").glob("*.png")) == ["step_0000002.png", "step_0000004.png"]
    metrics = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert {"loss/base", "loss/reg", "reg/norm_mean", "reg/norm_std", "reg/ema_a", "lr", "grad_norm"} <= set(metrics[0])
    for fmt in export.FORMATS:
        lf = export.read_any(work / f"lora_final_{fmt}.safetensors")
        assert lf.format == fmt and lf.base_model == "tiny"
