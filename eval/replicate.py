#!/usr/bin/env python3
"""Small-scale replication of Smooth Diffusion's Tables 1-3 on the embedded default (bundled digits).

For each seed, LoRAs with lambda in ``--lambdas`` are trained on the cached base model (the demo's
recipe, ``configs/demo.py``; the seed sets the LoRA init, the batches and the evaluation noises),
then evaluated with ``smooth-jax eval istd`` (ISTD, digit accuracy, FD_digits) and ``eval
reconstruct`` (DDIM inversion MSE/PSNR/SSIM, with CFG and with guidance 1). Tables give mean ± std
over seeds (ddof=1); plots show the same with error bars.

    python eval/replicate.py --out replicate_out                       # 3 seeds x lambda 0/0.1/1/10
    python eval/replicate.py --out replicate_out --update-readme README.md  # also the README's Results

Everything is resumable: rerunning reuses finished LoRA runs and evaluation results.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
README_START = "<!-- results:start (written by eval/replicate.py --update-readme) -->"
README_END = "<!-- results:end -->"


def model_name(reg_weight: float) -> str:
    return f"lambda{reg_weight:g}"


def run_seed(config, folder: Path, out: Path, seed: int, lambdas, progress: bool) -> dict:
    """Train one LoRA per lambda with ``seed`` and evaluate them with the base: {"istd", "reconstruct"}."""
    from smooth_jax import demo
    from smooth_jax.evaluation import istd as istd_run
    from smooth_jax.evaluation import reconstruct as rec_run

    loras = {}
    for lam in lambdas:
        c = demo.lora_config(config, folder, lam)
        c.seed = int(seed)
        print(f"seed {seed}: LoRA lambda = {lam:g}")
        loras[model_name(lam)], _ = demo.train_lora(c, out / "runs" / f"seed{seed}" / model_name(lam), progress)
    istd_cfg, rec_cfg = demo.eval_configs(config, folder, loras)
    istd_cfg["seed"] = int(seed)
    return {"istd": istd_run.run(istd_cfg, str(out / "eval" / f"seed{seed}" / "istd"), progress=progress),
            "reconstruct": rec_run.run(rec_cfg, str(out / "eval" / f"seed{seed}" / "reconstruct"), progress=progress)}


def per_seed_values(runs: dict[int, dict], names: list[str]) -> dict[str, dict[str, list[float]]]:
    """{model: {metric: [value per seed]}}; inversion metrics vs the input image."""
    out: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    for seed, r in sorted(runs.items()):
        for n in names:
            m = r["istd"]["models"][n]["metrics"]
            vals = {"istd": m["istd"]["mean"], "digit_accuracy": m["digit_accuracy"]["mean"],
                    "fd_digits": m["FD_digits"]["value"]}
            for row, rm in r["reconstruct"]["models"][n]["metrics"].items():
                for k in ("mse", "psnr", "ssim"):
                    vals[f"{row}_{k}"] = rm["vs_input"][k]["mean"]
            for k, v in vals.items():
                out[n].setdefault(k, []).append(float(v))
    return out


def summary(values: list[float]) -> dict:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}


def fmt(s: dict, digits: int = 4) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def paired(values: dict, model: str, ref: str, key: str) -> dict:
    """Per-seed difference model - ref (same seed: same LoRA batches and evaluation noises), summarized.
    The noises move every model's ISTD together, so this spread is the one that tests the effect."""
    return summary([a - b for a, b in zip(values[model][key], values[ref][key])])


def tables(stats: dict, values: dict, lambdas, labels: dict, n_seeds: int, row_names: dict) -> str:
    """Tables 1-3 (markdown) from ``stats`` = {model: {metric: summary}} and the per-seed ``values``."""
    t1_models = ["base"] + [model_name(x) for x in (0.0, 1.0) if x in lambdas]
    g_rows = list(row_names)
    ref = model_name(0.0)
    lines = [f"**Table 1** (mean ± std over {n_seeds} seeds; Δ: paired per-seed difference from the plain LoRA)", "",
             "| Model | ISTD ↓ | ISTD Δ vs plain | FD_digits ↓ | digit accuracy ↑ |", "|---|---|---|---|---|"]
    for n in t1_models:
        s = stats[n]
        lines.append(f"| {labels[n]} | {fmt(s['istd'])} | {fmt(paired(values, n, ref, 'istd'))} | "
                     f"{fmt(s['fd_digits'], 2)} | {fmt(s['digit_accuracy'], 3)} |")
    lines += ["", "**Table 2** (DDIM inversion then reconstruction of real digits; error vs the input, [0,1] pixels)", "",
              "| Model | " + " | ".join(f"{row_names[r]}: MSE ↓ | PSNR ↑ | SSIM ↑" for r in g_rows) + " |",
              "|---" * (1 + 3 * len(g_rows)) + "|"]
    for n in t1_models:
        s = stats[n]
        cells = [f"{fmt(s[f'{r}_mse'])} | {fmt(s[f'{r}_psnr'], 2)} | {fmt(s[f'{r}_ssim'], 3)}" for r in g_rows]
        lines.append(f"| {labels[n]} | " + " | ".join(cells) + " |")
    lines += ["", "**Table 3** (lambda ablation)", "",
              f"| lambda | ISTD ↓ | ISTD Δ vs plain | FD_digits ↓ | digit accuracy ↑ | {row_names[g_rows[0]]}: MSE ↓ |",
              "|---|---|---|---|---|---|"]
    for lam in lambdas:
        n = model_name(lam)
        s = stats[n]
        lines.append(f"| {lam:g} | {fmt(s['istd'])} | {fmt(paired(values, n, ref, 'istd'))} | {fmt(s['fd_digits'], 2)} | "
                     f"{fmt(s['digit_accuracy'], 3)} | {fmt(s[f'{g_rows[0]}_mse'])} |")
    return "\n".join(lines)


def plot(stats: dict, names: list[str], labels: dict, row_names: dict, path: Path) -> Path:
    """ISTD, FD_digits and inversion MSE per model with ±std error bars, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    row = next(iter(row_names))
    panels = [("istd", "ISTD ↓ (smoother)"), ("fd_digits", "FD_digits ↓"), (f"{row}_mse", f"{row_names[row]} MSE ↓")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    x = np.arange(len(names))
    for ax, (key, title) in zip(axes, panels):
        means = [stats[n][key]["mean"] for n in names]
        stds = [stats[n][key]["std"] for n in names]
        ax.bar(x, means, yerr=stds, capsize=4, color=["#999999"] + ["#4C72B0"] * (len(names) - 1))
        ax.set_xticks(x, [labels[n] for n in names], rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def upscaled_strip(src: Path, dst: Path, factor: int = 4) -> Path:
    """The ISTD run's first strip (rows = models), nearest-upscaled so 16 px digits are visible."""
    from PIL import Image

    im = Image.open(src)
    im = im.resize((im.width * factor, im.height * factor), Image.NEAREST)
    tmp = dst.with_name(f".{dst.name}.tmp.png")
    im.save(tmp)
    tmp.replace(dst)
    return dst


def update_readme(readme: Path, block: str) -> None:
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme}: no results markers ({README_START} ... {README_END}) to replace.")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    from smooth_jax.fileio import atomic_write

    atomic_write(readme, (head + README_START + "\n" + block + "\n" + README_END + tail).encode())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="replicate_out")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.py"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.1, 1.0, 10.0])
    p.add_argument("--update-readme", default=None, metavar="README.md",
                   help="replace the README's Results block with the tables and figures (copied to docs/results/)")
    p.add_argument("--no-progress", action="store_true")
    args, overrides = p.parse_known_args(argv)
    if len(args.seeds) < 2:
        p.error("--seeds: give at least 2 seeds (the tables report a spread)")
    if 0.0 not in args.lambdas or 1.0 not in args.lambdas:
        p.error("--lambdas must include 0 (plain LoRA) and 1 (Smooth LoRA) for Tables 1 and 2")

    from smooth_jax import runtime

    runtime.split_host_devices()
    runtime.setup()
    from smooth_jax import base_model, config_loader

    t0 = time.time()
    config = config_loader.apply_overrides(config_loader.load_config(args.config), overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = base_model.build(config.base, progress=not args.no_progress)
    runs = {s: run_seed(config, folder, out, s, args.lambdas, not args.no_progress) for s in args.seeds}

    names = ["base"] + [model_name(x) for x in args.lambdas]
    labels = {"base": "base", **{model_name(x): ("plain LoRA (λ=0)" if x == 0 else
                                                 "Smooth LoRA (λ=1)" if x == 1 else f"λ={x:g}") for x in args.lambdas}}
    values = per_seed_values(runs, names)
    stats = {n: {k: summary(v) for k, v in m.items()} for n, m in values.items()}
    row_names = {k: v for k, v in runs[args.seeds[0]]["reconstruct"]["methods"].items() if k != "vae"}
    table_md = tables(stats, values, args.lambdas, labels, len(args.seeds), row_names)
    fig = plot(stats, names, labels, row_names, out / "replicate.png")
    strip = upscaled_strip(out / "eval" / f"seed{args.seeds[0]}" / "istd" / "grids" / "istd_000.png", out / "interpolation.png")
    e = config.eval
    setting = (f"Base model: `{folder.name}` (trained here, {config.base.unet.steps} UNet steps). LoRA: rank "
               f"{config.lora.lora.rank}, {config.lora.train.steps} steps, batch {config.lora.train.batch_size}, "
               f"lr {config.lora.train.lr:g}; seeds {args.seeds}. ISTD: {10 * e.repeats} interpolations per seed "
               f"(10 digit prompts x {e.repeats} noise pairs), {e.frames} frames, {e.steps} DDIM steps, CFG "
               f"{e.guidance:g}, [0,1] pixels, L2 over all values. Inversion: {e.num_images} real digits.")
    md = "\n".join(["# Smooth Diffusion, small-scale replication (bundled digits)", "", setting, "", table_md, "",
                    "![metrics](replicate.png)", "", "Interpolation (rows: " + ", ".join(labels[n] for n in names)
                    + "; same noises):", "", "![interpolation](interpolation.png)", "",
                    f"Took {(time.time() - t0) / 60:.1f} min.", ""])
    (out / "report.md").write_text(md)
    (out / "results.json").write_text(json.dumps({"per_seed": values, "stats": stats, "seeds": args.seeds,
                                                  "lambdas": args.lambdas, "base_model": str(folder)}, indent=2))
    print(md)
    if args.update_readme:
        docs = ROOT / "docs" / "results"
        docs.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(fig, docs / "replicate.png")
        shutil.copyfile(strip, docs / "interpolation.png")
        cmd = "python eval/replicate.py --out replicate_out --update-readme README.md"
        block = "\n".join([setting, "", table_md, "", "![metrics](docs/results/replicate.png)", "",
                           "Rows: " + ", ".join(labels[n] for n in names) + " (same noise pair, slerp 0 → 1):", "",
                           "![interpolation](docs/results/interpolation.png)", "", f"Reproduce: `{cmd}`."])
        update_readme(Path(args.update_readme), block)
        print(f"updated {args.update_readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
