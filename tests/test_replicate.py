"""eval/replicate.py's tables and README update, on synthetic evaluation results (the training and
evaluation it drives are tested in test_demo.py and test_evaluation.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("replicate", ROOT / "eval" / "replicate.py")
replicate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(replicate)


def _results(istd: dict, mse: dict) -> dict:
    models_i = {n: {"metrics": {"istd": {"mean": v}, "digit_accuracy": {"mean": 0.9}, "FD_digits": {"value": 1.5}}}
                for n, v in istd.items()}
    models_r = {n: {"metrics": {"ddim_cfg": {"vs_input": {"mse": {"mean": v}, "psnr": {"mean": 20.0},
                                                           "ssim": {"mean": 0.9}}}}} for n, v in mse.items()}
    return {"istd": {"models": models_i}, "reconstruct": {"models": models_r, "methods": {"ddim_cfg": "DDIM, CFG 3"}}}


def test_tables_report_seed_spread_and_paired_differences():
    names = ["base", "lambda0", "lambda1"]
    runs = {0: _results({"base": 0.30, "lambda0": 0.28, "lambda1": 0.20}, {"base": 0.01, "lambda0": 0.01, "lambda1": 0.008}),
            1: _results({"base": 0.50, "lambda0": 0.52, "lambda1": 0.40}, {"base": 0.02, "lambda0": 0.02, "lambda1": 0.01})}
    values = replicate.per_seed_values(runs, names)
    assert values["lambda1"]["istd"] == [0.20, 0.40] and values["lambda1"]["ddim_cfg_mse"] == [0.008, 0.01]
    stats = {n: {k: replicate.summary(v) for k, v in m.items()} for n, m in values.items()}
    assert stats["lambda1"]["istd"]["mean"] == pytest.approx(0.30)
    assert stats["lambda1"]["istd"]["std"] == pytest.approx(np.std([0.2, 0.4], ddof=1))
    d = replicate.paired(values, "lambda1", "lambda0", "istd")  # -0.08 and -0.12
    assert d["mean"] == pytest.approx(-0.10) and d["std"] == pytest.approx(np.std([-0.08, -0.12], ddof=1))
    labels = {"base": "base", "lambda0": "plain", "lambda1": "smooth"}
    md = replicate.tables(stats, values, [0.0, 1.0], labels, 2, {"ddim_cfg": "DDIM, CFG 3"})
    assert "| smooth | 0.3000 ± 0.1414 | -0.1000 ± 0.0283 |" in md
    assert "| 1 | 0.3000 ± 0.1414 | -0.1000 ± 0.0283 |" in md and "DDIM, CFG 3: MSE ↓" in md


def test_update_readme_replaces_only_the_marked_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{replicate.README_START}\nold\n{replicate.README_END}\nrest\n")
    replicate.update_readme(readme, "new table")
    assert readme.read_text() == f"intro\n{replicate.README_START}\nnew table\n{replicate.README_END}\nrest\n"
    (tmp_path / "bare.md").write_text("no markers\n")
    with pytest.raises(ValueError, match="bare.md"):
        replicate.update_readme(tmp_path / "bare.md", "x")
