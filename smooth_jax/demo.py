"""``smooth-jax demo``: the main job on the embedded default, end to end, with no download.

1. The base model (``base_model.py``): an SD-architecture latent-diffusion model trained here on
   the bundled digits; cached, so only the first run pays for it.
2. A plain LoRA (lambda = 0) and a Smooth LoRA (lambda = 1) on it: the same config, seed and
   batches, only the regularizer weight differs. Each is exported to PyTorch safetensors (peft,
   legacy, kohya); with torch installed, diffusers' ``load_lora_weights`` reads the Smooth LoRA
   and its PyTorch UNet output is checked against smooth-jax's.
3. The evaluation runs of ``smooth-jax eval`` on base / plain / smooth: ISTD with digit accuracy
   and FD_digits (``eval istd``), and DDIM-inversion reconstruction (``eval reconstruct``).
4. ``OUT/report.md`` with one table, the interpolation strips and the reconstructions as PNGs.

Settings come from ``configs/demo.py`` (``--config.a.b=v`` overrides). Rerunning into the same
folder reuses finished LoRA runs and evaluation results.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import ml_collections
import numpy as np

from smooth_jax.fileio import atomic_write

REPO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.py"


def lora_config(config: ml_collections.ConfigDict, base_folder: Path, reg_weight: float) -> ml_collections.ConfigDict:
    """The train config of one of the demo's LoRAs: ``config.lora`` on ``base_folder`` with lambda."""
    c = copy.deepcopy(config.lora)
    c.model = str(base_folder)
    c.objective.reg_weight = float(reg_weight)
    return c


def train_lora(c: ml_collections.ConfigDict, workdir: Path, progress: bool = True) -> tuple[Path, dict]:
    """Train in ``workdir`` (continuing an interrupted run of the same config, reusing a finished
    one) and return its peft file and a summary of the last 10% of steps."""
    from smooth_jax import train

    final = workdir / "lora_final_peft.safetensors"
    summary_file, config_file = workdir / "demo_summary.json", workdir / "demo_config.json"
    stored = json.dumps(c.to_dict(), sort_keys=True, default=list)
    if final.exists() and summary_file.exists() and config_file.exists() and config_file.read_text() == stored:
        return final, json.loads(summary_file.read_text())
    if config_file.exists() and config_file.read_text() != stored:
        shutil.rmtree(workdir)  # a run of another config: start clean
    atomic_write(config_file, stored.encode())
    t0 = time.time()
    train.train_and_evaluate(c, workdir, progress=progress)
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    hist = [json.loads(line) for line in lines if line.strip()]
    tail = hist[-max(1, len(hist) // 10):]
    keys = ("loss/base", "loss/reg", "reg/norm_mean", "reg/norm_std", "reg/ema_a")
    summary = {"steps": int(hist[-1]["step"]), "seconds": round(time.time() - t0, 1),
               "final": {k: float(np.mean([h[k] for h in tail])) for k in keys if k in tail[0]}}
    atomic_write(summary_file, json.dumps(summary, indent=2).encode())
    return final, summary


def torch_check(sd, lora_path: Path) -> tuple[str, bool]:
    """diffusers' PyTorch pipeline of the same base reads the exported peft file; its UNet output
    is compared with smooth-jax's merged UNet on random inputs. Returns (detail, ok)."""
    try:
        import torch

        from smooth_jax.models import torch_bridge
    except ImportError:
        return "skipped: torch is not installed (pip install -e .[torch])", True
    import jax

    from smooth_jax.generation import load_lora_file, merged_unet

    rng = np.random.default_rng(0)
    s = sd.configs["unet"]["sample_size"]
    latents = rng.standard_normal((2, sd.latent_channels, s, s)).astype(np.float32)
    t = np.array([100, 700], np.int32)
    ctx = rng.standard_normal((2, sd.max_length, sd.context_dim)).astype(np.float32)
    ours = np.asarray(jax.jit(sd.unet_apply)(merged_unet(sd.params["unet"], load_lora_file(str(lora_path), sd.params["unet"])),
                                             latents, t, ctx))
    base = np.asarray(jax.jit(sd.unet_apply)(sd.params["unet"], latents, t, ctx))
    pipe = torch_bridge.torch_pipeline(sd)
    pipe.load_lora_weights(str(lora_path.parent), weight_name=lora_path.name)
    with torch.no_grad():
        theirs = pipe.unet(torch.from_numpy(latents), torch.from_numpy(t).long(), torch.from_numpy(ctx)).sample.numpy()
    scale = float(np.abs(ours).max())
    rel = float(np.abs(theirs - ours).max()) / scale
    effect = float(np.abs(ours - base).max()) / scale
    # diffusers' Flax GEGLU uses tanh-approximate GELU, PyTorch the exact one (DESIGN.md §4): ~1e-4.
    ok = rel < 2e-3 and rel < effect / 10
    return (f"`{lora_path.name}` via diffusers `load_lora_weights`: UNet output differs from smooth-jax's by "
            f"{rel:.1e} of its scale (the LoRA itself changes it by {effect:.1e})"), ok


def eval_configs(config: ml_collections.ConfigDict, base_folder: Path, loras: dict[str, Path]) -> tuple[dict, dict]:
    """The ``eval istd`` and ``eval reconstruct`` run configs of the demo's three models."""
    from smooth_jax.evaluation import inputs

    e = config.eval
    common = {"model": str(base_folder), "loras": [f"{n}={p}" for n, p in loras.items()], "base": True,
              "steps": int(e.steps), "guidance": float(e.guidance)}
    models = inputs.parse_loras(common["loras"], base=True)
    prompts = Path(e.prompts_file).expanduser()
    if not prompts.is_absolute() and not prompts.exists():  # relative to the repository, wherever we run
        prompts = REPO_CONFIG.parents[1] / prompts
    istd = {**common, "models": models, "prompts_file": str(prompts.resolve()), "repeats": int(e.repeats),
            "frames": int(e.frames), "seed": int(e.seed), "batch_prompts": int(e.batch_prompts),
            "metrics": {"digits": True}, "fid_data": inputs.data_spec("digits"), "fid_num_images": int(e.fid_num_images),
            "grids": int(e.grids)}
    rec = {**common, "models": models, "guidance": float(e.inversion_guidance), "data": inputs.data_spec("digits"),
           "num_images": int(e.num_images), "methods": ["ddim"], "batch_images": int(e.batch_images),
           "grids": int(e.grids)}
    return istd, rec


def run(config: ml_collections.ConfigDict, out: str | Path, *, torch: bool = True, progress: bool = True) -> int:
    """The whole main job into ``out``; returns a process exit code (1 if a check failed)."""
    from smooth_jax import base_model
    from smooth_jax.evaluation import istd as istd_run
    from smooth_jax.evaluation import reconstruct as rec_run
    from smooth_jax.models import load

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    times: dict[str, float] = {}

    t0 = time.time()
    cached = base_model.is_complete(base_model.cached_folder(config.base))
    folder = base_model.build(config.base, progress=progress)
    times["base model" + (" (cached)" if cached else " (trained)")] = time.time() - t0
    print(f"base model: {folder} ({'cached' if cached else 'trained now'})")
    prov = base_model.read_provenance(folder)

    loras, summaries = {}, {}
    for name, reg_weight in config.models.items():
        t0 = time.time()
        print(f"LoRA '{name}' (lambda = {reg_weight:g})")
        loras[name], summaries[name] = train_lora(lora_config(config, folder, reg_weight), out / "runs" / name, progress)
        times[f"LoRA {name}"] = time.time() - t0

    sd = load(str(folder))
    checks = []
    if torch:
        t0 = time.time()
        checks.append(("PyTorch", *torch_check(sd, loras[next(reversed(loras))])))
        times["PyTorch check"] = time.time() - t0
    else:
        checks.append(("PyTorch", "skipped (--no-torch)", True))

    istd_cfg, rec_cfg = eval_configs(config, folder, loras)
    t0 = time.time()
    istd_res = istd_run.run(istd_cfg, str(out / "istd"), progress=progress)
    times["ISTD evaluation"] = time.time() - t0
    t0 = time.time()
    rec_res = rec_run.run(rec_cfg, str(out / "reconstruct"), progress=progress)
    times["inversion evaluation"] = time.time() - t0
    times["total"] = time.time() - t_start

    figures = _figures(out, istd_res, rec_res)
    md = report_markdown(config, folder, prov, summaries, loras, istd_res, rec_res, checks, times, figures, out)
    atomic_write(out / "report.md", md.encode())
    results = {"base_model": str(folder), "base_model_provenance": prov, "loras": {k: str(v) for k, v in loras.items()},
               "training": summaries, "summary": summary_table(istd_res, rec_res), "checks": checks,
               "seconds": {k: round(v, 1) for k, v in times.items()}}
    atomic_write(out / "report.json", json.dumps(results, indent=2, default=str).encode())
    print(md)
    ok = all(c[2] for c in checks)
    print(f"\n{'done' if ok else 'A CHECK FAILED'}: {out / 'report.md'} ({times['total'] / 60:.1f} min)")
    return 0 if ok else 1


def summary_table(istd_res: dict, rec_res: dict) -> dict:
    """{model: {metric: summary}} for the report's table (ISTD run + the DDIM-inversion rows)."""
    out = {}
    for name, m in istd_res["models"].items():
        mm = m["metrics"]
        row = {"istd": mm["istd"], "digit_accuracy": mm.get("digit_accuracy"),
               "fd_digits": mm.get("FD_digits", {}).get("value")}
        rec = rec_res["models"].get(name, {}).get("metrics", {})
        for key, val in rec.items():
            row[f"inversion_{key}"] = val.get("vs_input", val)
        out[name] = row
    return out


def _figures(out: Path, istd_res: dict, rec_res: dict) -> dict[str, list[str]]:
    """Paths (relative to ``out``) of the PNG grids the two runs wrote."""
    return {"strips": sorted(str(p.relative_to(out)) for p in (out / "istd" / "grids").glob("*.png")),
            "reconstructions": sorted(str(p.relative_to(out)) for p in (out / "reconstruct" / "grids").glob("*.png"))}


def report_markdown(config, folder, prov, summaries, loras, istd_res, rec_res, checks, times, figures, out) -> str:
    from smooth_jax.evaluation import report

    trained = prov["trained"]
    rows_def = rec_res["methods"]
    rec_rows = [k for k in rows_def if k != "vae"]
    headers = ["Model", "ISTD ↓", "digit accuracy ↑", "FD_digits ↓"]
    for k in rec_rows:
        headers += [f"{rows_def[k]}: MSE ↓", "PSNR ↑", "SSIM ↑"]
    rows = []
    for name, m in istd_res["models"].items():
        mm = m["metrics"]
        row = [name, report.fmt(mm["istd"]), report.fmt(mm["digit_accuracy"], 3), report.fmt(mm["FD_digits"]["value"], 2)]
        rec = rec_res["models"][name]["metrics"]
        for k in rec_rows:
            v = rec[k]["vs_input"]
            row += [report.fmt(v["mse"]), report.fmt(v["psnr"], 2), report.fmt(v["ssim"], 3)]
        rows.append(row)
    e = config.eval
    lines = [
        "# smooth-jax demo: Smooth Diffusion on the embedded default",
        "",
        f"Base model `{folder}` (trained here on the {trained['num_images']} bundled digits at "
        f"{config.base.resolution} px: autoencoder reconstruction MSE {trained['autoencoder']['reconstruction_mse']:.2e}, "
        f"UNet final loss {trained['unet']['loss']:.4f}). LoRAs: rank {config.lora.lora.rank}, {config.lora.train.steps} "
        f"steps, batch {config.lora.train.batch_size}, lr {config.lora.train.lr:g}, the same seed and batches; "
        + ", ".join(f"{n}: lambda = {w:g}" for n, w in config.models.items()) + ".",
        "",
        report.markdown_table(headers, rows),
        "",
        f"ISTD (lower = smoother): {istd_res['config']['num_prompts']} interpolations (10 digit prompts x {e.repeats} noise "
        f"pairs), {e.frames} frames each, {e.steps} DDIM steps, CFG {e.guidance:g}; mean ± std over interpolations, "
        f"on [0,1] pixels with the L2 norm over all {3 * config.base.resolution ** 2} values. Digit accuracy and "
        f"FD_digits judge the strips' end frames with a digit classifier trained here (metrics/digits.py). "
        f"Inversion: {rec_res['num_items']} real digits, DDIM inversion + reconstruction with {e.steps} steps; "
        "errors against the input image in [0,1].",
        "",
        "## Training",
        "",
        "| LoRA | lambda | steps | seconds | final MSE loss | final reg. loss | mean norm | EMA a |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        f = s["final"]
        lines.append(f"| {name} | {config.models[name]:g} | {s['steps']} | {s['seconds']:.0f} | {f.get('loss/base', 0):.4f} | "
                     f"{f.get('loss/reg', 0):.3g} | {f.get('reg/norm_mean', 0):.4g} | {f.get('reg/ema_a', 0):.4g} |")
    lines += ["", "Exported for PyTorch tools (diffusers, ComfyUI, A1111): "
              + ", ".join(f"`{Path(p).parent.relative_to(out)}/lora_final_{{peft,legacy,kohya}}.safetensors`"
                          for p in loras.values()) + "."]
    lines += ["", "## Checks", ""] + [f"- {name}: {detail} — {'ok' if ok else 'FAILED'}" for name, detail, ok in checks]
    lines += ["", "## Interpolation strips", "",
              "Rows: " + ", ".join(istd_res["models"]) + " (same noises, same prompt); columns: slerp weight 0 → 1.", ""]
    lines += [f"![strip]({p})" for p in figures["strips"]]
    lines += ["", "## DDIM inversion reconstructions", ""]
    lines += [f"![reconstruction]({p})" for p in figures["reconstructions"]]
    lines += ["", "Details: `istd/results.md`, `reconstruct/results.md` (and their results.json).", "",
              "## Time", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in times.items()]
    return "\n".join(lines) + "\n"
