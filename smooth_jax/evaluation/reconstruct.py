"""``smooth-jax eval reconstruct``: the paper's Table 2 (inversion fidelity) for several models.

    smooth-jax eval reconstruct --model /path/to/stable-diffusion-v1-5 --lora smooth=smooth_lora.safetensors \\
        --data tfds --tfds-name coco_captions --caption-key captions/text --split validation \\
        --num-images 500 --method ddim nti --out runs/reconstruct
    python eval/reconstruct.py --model tiny --data digits --num-images 8 --steps 10 --out runs/rec_tiny

Each image is center-cropped at the model's resolution and encoded (VAE posterior mean); its
caption is the prompt. Per model:

- ``ddim``: DDIM inversion (conditional, no guidance), then DDIM sampling with CFG ``--guidance``
  and the "" embedding (the paper's Table 2 setting: 7.5). The guidance-1 reconstruction (the
  exact reverse path) is recorded as its own row.
- ``nti``: null-text inversion along the same DDIM trajectory, then CFG sampling with the
  optimised nulls.

Every reconstruction is decoded and compared in [0, 1] (``report.unit_images``) with MSE, PSNR,
SSIM (and LPIPS with its weights) against the input image (the paper's numbers) and against the
VAE-only reconstruction (decode(encode(x)): what any inversion can reach; its own row gives the
VAE's error against the input).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import numpy as np

from smooth_jax.evaluation import inputs, report

RUN = "reconstruct"
HELP = "DDIM-inversion / NTI reconstruction fidelity, several models"
METRICS = ("lpips",)
VAE = "vae-only"
PAIR_METRICS = ("mse", "psnr", "ssim", "lpips")
ARROWS = {"mse": "MSE ↓", "psnr": "PSNR ↑", "ssim": "SSIM ↑", "lpips": "LPIPS ↓"}


def default_config() -> dict:
    return {
        "model": "tiny",
        "loras": [],
        "base": True,
        "data": {"source": "digits", "path": ""},  # inputs.data_spec(...)
        "num_images": 500,
        "methods": ["ddim", "nti"],
        "steps": 50,
        "guidance": 7.5,
        "inner_steps": 10,  # NTI's Adam steps per timestep, at most
        "batch_images": 1,  # images per inversion call; part of the config (fixes compiled shapes)
        "metrics": {"lpips_backbone": None, "lpips_heads": None, "lpips_net": "alex"},
        "grids": 4,
    }


def method_rows(methods: Sequence[str], guidance: float) -> dict[str, str]:
    """Row key -> label, in table order."""
    rows = {}
    if "ddim" in methods:
        rows["ddim_cfg"] = f"DDIM inversion, CFG {guidance:g}"
        if guidance > 1:
            rows["ddim_g1"] = "DDIM inversion, guidance 1"
    if "nti" in methods:
        rows["nti"] = f"NTI, CFG {guidance:g}"
    return rows


def resolve(config: dict) -> dict:
    c = {**default_config(), **config}
    methods = [m for m in ("ddim", "nti") if m in c["methods"]]
    if not methods or len(methods) != len(set(c["methods"])):
        raise ValueError(f"--method must be ddim and/or nti, got {c['methods']}.")
    if "nti" in methods and c["guidance"] <= 1:
        raise ValueError("NTI optimises the nulls of guided sampling: it needs --guidance > 1.")
    if int(c["batch_images"]) < 1 or int(c["num_images"]) < 1:
        raise ValueError("--num-images and --batch-images must be >= 1.")
    return {
        "run": RUN,
        **inputs.resolve_common(c),
        "data": dict(c["data"]),
        "num_images": int(c["num_images"]),
        "methods": methods,
        "inner_steps": int(c["inner_steps"]),
        "batch_images": int(c["batch_images"]),
        "metrics": inputs.resolve_metric_options(c["metrics"]),
    }


def pair_metrics(x01: np.ndarray, y01: np.ndarray, lpips=None) -> list[dict]:
    """Per image pair (``[B, 3, H, W]`` in [0, 1]): ``{"mse", "psnr", "ssim"[, "lpips"]}`` as floats."""
    from smooth_jax import metrics

    vals = {"mse": metrics.mse(x01, y01), "psnr": metrics.psnr(x01, y01), "ssim": metrics.ssim(x01, y01)}
    if lpips is not None:
        vals["lpips"] = lpips(x01, y01)
    vals = {k: np.asarray(v, np.float64) for k, v in vals.items()}
    return [{k: float(v[j]) for k, v in vals.items()} for j in range(len(x01))]


def summarize_pairs(values: Sequence[dict]) -> dict:
    """``{metric: summary}`` over items of ``pair_metrics`` dicts."""
    return {k: report.summarize(v[k] for v in values) for k in PAIR_METRICS if k in values[0]}


def run(config: dict, out: str, *, progress: bool = True, stop_after: int | None = None) -> dict | None:
    """Run (or resume) a reconstruction evaluation into ``out``; the results dict, or None when
    stopped after ``stop_after`` new (model, image) results."""
    import jax

    from smooth_jax import inversion, sampling

    t0 = time.time()
    cfg = resolve(config)
    rd = report.RunDir(out, cfg)
    rd.check()
    nets = inputs.load_metric_nets(cfg, METRICS)
    for line in report.skipped_lines(nets.skipped):
        print(line)
    sd = inputs.load_model(cfg["model"])
    resolution = sd.default_image_size()
    from smooth_jax.generation import merged_unet  # jax: imported when a run starts, not for --help

    models = [(name, merged_unet(sd.params["unet"], lf)) for name, lf in inputs.load_loras(sd, cfg["models"])]
    resumed = rd.start()
    names = [n for n, _ in models]
    rows = method_rows(cfg["methods"], cfg["guidance"])
    bsz = cfg["batch_images"]
    vae, te = sd.params["vae"], sd.params["text_encoder"]
    decode = jax.jit(sd.decode_latents)
    done = set(rd.records())
    every = [VAE] + names
    if resumed:
        print(f"resuming {out}: {len(done)} of {cfg['num_images'] * len(every)} results done")

    new = 0
    records = inputs.iter_images(cfg["data"], resolution, cfg["num_images"])
    bar = report.progress(cfg["num_images"], 0, "reconstruct images", "image", progress)
    with bar:
        for block in inputs.blocks(records, bsz):
            items = [r["item"] for r in block]
            if all((m, i) in done for m in every for i in items):
                bar.update(len(block))
                continue
            recs = inputs.padded(block, bsz)
            x = np.stack([r["image"] for r in recs])  # [B, 3, S, S] in [-1, 1]
            x01 = report.unit_images(x)
            latents0 = inversion.encode_latents(sd, vae, x)
            vae_rec = report.unit_images(decode(vae, latents0))
            ctx, unc = sampling.encode_prompts(sd, te, [r["caption"] for r in recs])
            results = {VAE: {"vae": {"vs_input": pair_metrics(vae_rec, x01, nets.lpips)}}}
            images, extra = {}, {}
            for name, unet in models:
                if all((name, i) in done for i in items):
                    continue
                lat, inner = reconstructions(sd, unet, latents0, ctx, unc, rows, cfg)
                if inner is not None:
                    extra[name] = inner
                images[name] = {k: report.unit_images(decode(vae, v)) for k, v in lat.items()}
                results[name] = {k: {"vs_input": pair_metrics(im, x01, nets.lpips),
                                     "vs_vae": pair_metrics(im, vae_rec, nets.lpips)} for k, im in images[name].items()}
            for name in every:
                if name not in results:
                    continue
                for j, r in enumerate(block):
                    i = r["item"]
                    if (name, i) in done:
                        continue
                    rec = {"model": name, "item": i, "path": r["path"], "caption": r["caption"],
                           "methods": {k: {ref: v[j] for ref, v in per.items()} for k, per in results[name].items()}}
                    if name in extra:
                        rec["nti_mean_inner_steps"] = float(extra[name][j])
                    if i < cfg["grids"] and name != VAE:
                        rd.save_arrays(i, name, input=x01[j], vae=vae_rec[j],
                                       **{k: im[j] for k, im in images[name].items()})
                    rd.append(rec)
                    done.add((name, i))
                    new += 1
                    if stop_after is not None and new >= stop_after:
                        print(f"stopped after {new} new results; rerun the same command to continue.")
                        return None
            bar.update(len(block))

    res = aggregate(rd, cfg, names, nets, inputs.items_done(done, VAE, cfg["num_images"]))
    res["resolution"] = resolution
    res["timing"] = {"this_invocation_s": round(time.time() - t0, 2), "resumed": resumed}
    md = markdown(res)
    rd.write_results(res, md)
    _grids(rd, cfg, names, rows, res["num_items"])
    print(md)
    print(f"wrote {rd.path / 'results.json'}, {rd.path / 'results.md'} and grids in {rd.path / 'grids'}")
    return res


def reconstructions(sd, unet, latents0, ctx, unc, rows: dict, cfg: dict) -> tuple[dict, np.ndarray | None]:
    """One model's reconstructions of a block of B images: ``({row key: latents [B,4,h,w]},
    NTI's mean inner steps per image [B] or None)``. One DDIM inversion serves every row."""
    from smooth_jax import inversion

    steps, g = cfg["steps"], cfg["guidance"]
    x_T, trajectory = inversion.ddim_invert(sd, unet, latents0, ctx, num_steps=steps)
    lat, inner = {}, None
    if "ddim_cfg" in rows:
        lat["ddim_cfg"] = inversion.reconstruct(sd, unet, x_T, ctx, num_steps=steps, guidance_scale=g, null_series=unc)
    if "ddim_g1" in rows:
        lat["ddim_g1"] = inversion.reconstruct(sd, unet, x_T, ctx, num_steps=steps, guidance_scale=1.0)
    if "nti" in rows:
        inv = inversion.null_text_optimize(sd, unet, trajectory, ctx, unc, guidance_scale=g,
                                           inner_steps=cfg["inner_steps"])
        lat["nti"] = inversion.sample_with_nulls(sd, unet, inv.x_T, ctx, inv.nulls, guidance_scale=g, num_steps=steps)
        inner = np.asarray(inv.inner_steps, np.float64).mean(axis=0)
    return lat, inner


def aggregate(rd: report.RunDir, cfg: dict, names: Sequence[str], nets, num_items: int) -> dict:
    """Per (model, method, reference) summaries from partial.jsonl over items 0..num_items-1, in order."""
    rows = method_rows(cfg["methods"], cfg["guidance"])
    by = rd.by_model([VAE, *names], num_items)
    models = {}
    for name in [VAE, *names]:
        recs = by[name]
        keys = ["vae"] if name == VAE else list(rows)
        refs = ["vs_input"] if name == VAE else ["vs_input", "vs_vae"]
        m = {k: {ref: summarize_pairs([r["methods"][k][ref] for r in recs]) for ref in refs} for k in keys}
        if name != VAE and "nti" in rows:
            m["nti"]["mean_inner_steps"] = report.summarize(r["nti_mean_inner_steps"] for r in recs)
        models[name] = {"metrics": m, "per_item": recs}
    return {
        "run": RUN,
        "config": cfg,
        "versions": report.versions(),
        "scale": "images in [0,1] (decoder output as clip((x+1)/2, 0, 1), not quantised; input exact); MSE "
                 "is the mean over C*H*W ([0,1] units squared), PSNR = 10 log10(1/MSE) dB per image, SSIM "
                 "Gaussian 11x11 sigma 1.5; " + report.STD_NOTE,
        "methods": {"vae": "VAE only: decode(encode(x)), the posterior mean", **rows},
        "references": {"vs_input": "against the input image (the paper's Table 2)",
                       "vs_vae": "against the VAE-only reconstruction decode(encode(x))"},
        "num_items": num_items,
        "skipped": nets.skipped,
        "models": models,
    }


def _table(results: dict, ref: str, with_vae: bool) -> str:
    rows_def = {"vae": "VAE only", **results["methods"]}
    metrics = [k for k in PAIR_METRICS if k in results["models"][VAE]["metrics"]["vae"]["vs_input"]]
    rows = []
    for name, m in results["models"].items():
        if name == VAE and not with_vae:
            continue
        for key, per in m["metrics"].items():
            if ref in per:
                label = rows_def[key] if key != "vae" else "VAE only"
                rows.append([("—" if name == VAE else name), label]
                            + [report.fmt(per[ref][k], 2 if k == "psnr" else 4) for k in metrics])
    return report.markdown_table(["Model", "Method"] + [ARROWS[k] for k in metrics], rows)


def markdown(results: dict) -> str:
    cfg = results["config"]
    lines = [
        "# Reconstruction evaluation (Smooth Diffusion, Table 2)",
        "",
        f"Model `{cfg['model']}`; {results['num_items']} images from {cfg['data']['source']} "
        f"({cfg['data'].get('tfds_name') or cfg['data'].get('path') or 'bundled'}), center-cropped to "
        f"{results['resolution']} px, captions as prompts; {cfg['steps']} DDIM steps, CFG {cfg['guidance']:g}, "
        f"NTI at most {cfg['inner_steps']} inner steps.",
        "",
        "## Against the input image (the paper's Table 2)",
        "",
        _table(results, "vs_input", with_vae=True),
        "",
        "## Against the VAE-only reconstruction",
        "",
        _table(results, "vs_vae", with_vae=False),
        "",
        f"Scale: {results['scale']}.",
    ]
    if results["skipped"]:
        lines += ["", "Skipped (weights not given): "
                  + "; ".join(f"{k}: {v}" for k, v in results["skipped"].items()) + "."]
    return "\n".join(lines)


def _grids(rd: report.RunDir, cfg: dict, names: Sequence[str], rows: dict, num_items: int) -> None:
    """Per image: one row per model, input | VAE only | each method."""
    from smooth_jax import images

    cols = ["input", "vae", *rows]
    for i in range(min(cfg["grids"], num_items)):
        arrs = [rd.load_arrays(i, name) for name in names]
        cells = np.stack([a[c] for a in arrs for c in cols])
        images.save_grid(report.unit_to_uint8(cells), rd.grid_file(f"reconstruct_{i:03d}.png"), nrow=len(cols))


# --- command line -----------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    inputs.add_common_args(p)
    inputs.add_data_args(p)
    p.add_argument("--num-images", type=int, default=500, help="first N good images (default 500, the paper's)")
    p.add_argument("--method", nargs="+", choices=("ddim", "nti"), default=["ddim", "nti"],
                   help="DDIM inversion and/or null-text inversion (default both)")
    p.add_argument("--inner-steps", type=int, default=10, help="NTI: at most this many Adam steps per timestep")
    p.add_argument("--batch-images", type=int, default=1, help="images per inversion call (default 1)")
    inputs.add_lpips_args(p.add_argument_group("metrics (LPIPS needs local weights; skipped when not given)"))


def config_from_args(args) -> dict:
    return {
        **inputs.common_config(args),
        "data": inputs.data_spec_from_args(args),
        "num_images": args.num_images,
        "methods": list(args.method),
        "inner_steps": args.inner_steps,
        "batch_images": args.batch_images,
        "metrics": inputs.metric_options(args, METRICS),
    }


def command(args) -> int:
    run(config_from_args(args), args.out, progress=not args.no_progress, stop_after=args.stop_after)
    return 0


def main(argv: list[str] | None = None) -> int:
    from smooth_jax.evaluation import run_main

    return run_main(RUN, add_arguments, command, argv)


if __name__ == "__main__":
    sys.exit(main())
