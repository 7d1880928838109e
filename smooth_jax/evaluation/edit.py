"""``smooth-jax eval edit``: prompt-switch editing of real images (NTI + prompt switch), several models.

    smooth-jax eval edit --model tiny --data digits --num-images 4 \\
        --target-template "a handwritten digit {}" --target-words eight one --out runs/edit
    smooth-jax eval edit --model /path/to/sd15 --lora smooth=smooth_lora.safetensors \\
        --edits edits.jsonl --ratio 0.6 0.7 0.8 0.9 --clip /path/to/clip-vit-large-patch14 --out runs/edit

Each image is inverted with null-text inversion under its source prompt (its caption, or the
``source`` of an ``--edits`` line), reconstructed with the optimised nulls, and edited: sampling
from the same x_T with the same nulls uses the source prompt for the first ``round((1 - r) S)``
steps and the target prompt for the rest (``inversion.edit``), for every ``--ratio`` r (r = 0 is
the reconstruction itself, r = 1 pure target sampling).

Targets: ``--edits FILE`` (JSONL of ``{"image" | "file_name", "source", "target"}``, paths
relative to the file), or ``--target-template``: ``{}`` takes the ``--target-words`` in turn (image i
gets word i mod n) and ``{source}`` the source prompt.

Metrics, in [0, 1]: how much of the reconstruction an edit keeps (MSE, PSNR, SSIM, and LPIPS with its
weights, edit vs reconstruction: background preservation when the edit is local), the
reconstruction against the input, and with ``--clip`` the CLIP score of each edit against its target
prompt (the reconstruction's against both prompts for reference).
"""

from __future__ import annotations

import argparse
import string
import sys
import time
from typing import Sequence

import numpy as np

from smooth_jax.fileio import file_sha256, source_id
from smooth_jax.evaluation import inputs, report
from smooth_jax.evaluation.reconstruct import ARROWS, PAIR_METRICS, pair_metrics, summarize_pairs

RUN = "edit"
HELP = "NTI + prompt-switch editing of real images, several models"
METRICS = ("clip", "lpips")


def default_config() -> dict:
    return {
        "model": "tiny",
        "loras": [],
        "base": True,
        "data": {"source": "digits", "path": ""},  # inputs.data_spec(...), used without an edits file
        "edits_file": None,  # JSONL of {"image"|"file_name", "source", "target"}
        "target_template": None,  # e.g. "a handwritten digit {}" or "{source}, watercolor"
        "target_words": [],
        "num_images": 8,
        "ratios": [0.6, 0.7, 0.8, 0.9],  # the paper's
        "steps": 50,
        "guidance": 7.5,
        "inner_steps": 10,
        "batch_images": 1,
        "metrics": {"clip": None, "lpips_backbone": None, "lpips_heads": None, "lpips_net": "alex"},
        "grids": 4,
    }


def ratio_key(r: float) -> str:
    return f"{float(r):g}"


def make_target(template: str, words: Sequence[str], item: int, source: str) -> str:
    """Target prompt of image ``item``: ``{}`` -> ``words[item % len(words)]``, ``{source}`` -> source."""
    return template.format(words[item % len(words)] if words else "", source=source)


def _check_template(template: str, words: Sequence[str]) -> None:
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    unknown = [f for f in fields if f not in ("", "source")]
    if unknown:
        raise ValueError(f"--target-template {template!r}: only {{}} and {{source}} are filled, not {unknown}.")
    if "" in fields and not words:
        raise ValueError(f"--target-template {template!r} has {{}}: pass the words for it with --target-words.")


def resolve(config: dict) -> dict:
    c = {**default_config(), **config}
    if (c["edits_file"] is None) == (c["target_template"] is None):
        raise ValueError("give the edits as --edits FILE or --target-template TEMPLATE (exactly one).")
    ratios = [float(r) for r in c["ratios"]]
    if not ratios or any(not 0.0 <= r <= 1.0 for r in ratios) or len(set(ratios)) != len(ratios):
        raise ValueError(f"--ratio: distinct values in [0, 1], got {c['ratios']}.")
    if c["guidance"] <= 1:
        raise ValueError("editing uses NTI, which needs --guidance > 1.")
    out = {"run": RUN, **inputs.resolve_common(c)}
    if c["edits_file"]:
        path = source_id(c["edits_file"])
        edits = inputs.read_edits(path)
        out["edits"] = {"file": path, "sha256": file_sha256(path)}
        n = min(int(c["num_images"]), len(edits))
    else:
        _check_template(c["target_template"], c["target_words"])
        out["edits"] = {"data": dict(c["data"]), "target_template": c["target_template"],
                        "target_words": list(c["target_words"])}
        n = int(c["num_images"])
    if n < 1 or int(c["batch_images"]) < 1:
        raise ValueError("--num-images and --batch-images must be >= 1.")
    out.update(num_images=n, ratios=ratios, inner_steps=int(c["inner_steps"]), batch_images=int(c["batch_images"]),
               metrics=inputs.resolve_metric_options(c["metrics"]))
    return out


def _records(cfg: dict, resolution: int):
    e = cfg["edits"]
    if "file" in e:
        return inputs.iter_edit_images(inputs.read_edits(e["file"]), resolution, cfg["num_images"])

    def with_targets():
        for r in inputs.iter_images(e["data"], resolution, cfg["num_images"]):
            yield {**r, "target": make_target(e["target_template"], e["target_words"], r["item"], r["caption"])}

    return with_targets()


def run(config: dict, out: str, *, progress: bool = True, stop_after: int | None = None) -> dict | None:
    """Run (or resume) an editing evaluation into ``out``; the results dict, or None when stopped
    after ``stop_after`` new (model, image) results."""
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
    bsz, ratios = cfg["batch_images"], cfg["ratios"]
    vae, te = sd.params["vae"], sd.params["text_encoder"]
    decode = jax.jit(sd.decode_latents)
    done = set(rd.records())
    if resumed:
        print(f"resuming {out}: {len(done)} of {cfg['num_images'] * len(names)} results done")

    new = 0
    bar = report.progress(cfg["num_images"], 0, "edit images", "image", progress)
    with bar:
        for block in inputs.blocks(_records(cfg, resolution), bsz):
            items = [r["item"] for r in block]
            if all((m, i) in done for m in names for i in items):
                bar.update(len(block))
                continue
            recs = inputs.padded(block, bsz)
            x = np.stack([r["image"] for r in recs])
            x01 = report.unit_images(x)
            latents0 = inversion.encode_latents(sd, vae, x)
            sources, targets = [r["caption"] for r in recs], [r["target"] for r in recs]
            ctx, unc = sampling.encode_prompts(sd, te, sources)
            tgt, _ = sampling.encode_prompts(sd, te, targets)
            for name, unet in models:
                if all((name, i) in done for i in items):
                    continue
                rec01, edits01 = reconstruct_and_edit(sd, unet, decode, latents0, ctx, unc, tgt, cfg)
                rec_vs_input = pair_metrics(rec01, x01, nets.lpips)
                edit_vs_rec = [pair_metrics(e, rec01, nets.lpips) for e in edits01]
                clip = None
                if nets.clip is not None:
                    clip = {"source": nets.clip.scores(rec01, sources), "target": nets.clip.scores(rec01, targets),
                            "edits": [nets.clip.scores(e, targets) for e in edits01]}
                for j, r in enumerate(block):
                    i = r["item"]
                    if (name, i) in done:
                        continue
                    rec = {"model": name, "item": i, "path": r["path"], "source": r["caption"], "target": r["target"],
                           "reconstruction": {"vs_input": rec_vs_input[j]},
                           "edits": {ratio_key(ratio): {"vs_reconstruction": edit_vs_rec[k][j]}
                                     for k, ratio in enumerate(ratios)}}
                    if clip is not None:
                        rec["reconstruction"].update(clip_source=float(clip["source"][j]),
                                                     clip_target=float(clip["target"][j]))
                        for k, ratio in enumerate(ratios):
                            rec["edits"][ratio_key(ratio)]["clip_target"] = float(clip["edits"][k][j])
                    if i < cfg["grids"]:
                        rd.save_arrays(i, name, input=x01[j], reconstruction=rec01[j], edits=edits01[:, j],
                                       ratios=np.asarray(ratios))
                    rd.append(rec)
                    done.add((name, i))
                    new += 1
                    if stop_after is not None and new >= stop_after:
                        print(f"stopped after {new} new results; rerun the same command to continue.")
                        return None
            bar.update(len(block))

    res = aggregate(rd, cfg, names, nets, inputs.items_done(done, names[0], cfg["num_images"]))
    res["resolution"] = resolution
    res["timing"] = {"this_invocation_s": round(time.time() - t0, 2), "resumed": resumed}
    md = markdown(res)
    rd.write_results(res, md)
    _grids(rd, cfg, names, res["num_items"])
    print(md)
    print(f"wrote {rd.path / 'results.json'}, {rd.path / 'results.md'} and grids in {rd.path / 'grids'}")
    return res


def reconstruct_and_edit(sd, unet, decode, latents0, ctx, unc, tgt, cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """One model on a block of B images: NTI under the source prompts ``ctx``, then the NTI
    reconstruction [B,3,H,W] and the edits towards ``tgt`` at every ratio [R,B,3,H,W], decoded to
    [0, 1]. Ratio 0 runs the reconstruction's compiled sampler on the same inputs: the same image."""
    from smooth_jax import inversion

    steps, g, vae = cfg["steps"], cfg["guidance"], sd.params["vae"]
    inv = inversion.null_text_invert(sd, unet, latents0, ctx, unc, num_steps=steps, guidance_scale=g,
                                     inner_steps=cfg["inner_steps"])
    rec = inversion.sample_with_nulls(sd, unet, inv.x_T, ctx, inv.nulls, guidance_scale=g, num_steps=steps)
    edits = [inversion.edit(sd, unet, inv.x_T, inv.nulls, ctx, tgt, ratio=r, num_steps=steps, guidance_scale=g)
             for r in cfg["ratios"]]
    return report.unit_images(decode(vae, rec)), np.stack([report.unit_images(decode(vae, e)) for e in edits])


def aggregate(rd: report.RunDir, cfg: dict, names: Sequence[str], nets, num_items: int) -> dict:
    """Per (model, ratio) summaries from partial.jsonl over items 0..num_items-1, in order."""
    by = rd.by_model(names, num_items)
    models = {}
    for name in names:
        recs = by[name]
        m = {"reconstruction": {"vs_input": summarize_pairs([r["reconstruction"]["vs_input"] for r in recs])},
             "edits": {}}
        if nets.clip is not None:
            for k in ("clip_source", "clip_target"):
                m["reconstruction"][k] = report.summarize(r["reconstruction"][k] for r in recs)
        for ratio in cfg["ratios"]:
            key = ratio_key(ratio)
            e = {"vs_reconstruction": summarize_pairs([r["edits"][key]["vs_reconstruction"] for r in recs])}
            if nets.clip is not None:
                e["clip_target"] = report.summarize(r["edits"][key]["clip_target"] for r in recs)
            m["edits"][key] = e
        models[name] = {"metrics": m, "per_item": recs}
    return {
        "run": RUN,
        "config": cfg,
        "versions": report.versions(),
        "scale": "images in [0,1] (decoder output as clip((x+1)/2, 0, 1), not quantised); MSE over C*H*W, "
                 "PSNR dB with data range 1, SSIM Gaussian 11x11 sigma 1.5; CLIP score 100*max(cos, 0); "
                 + report.STD_NOTE,
        "definitions": {
            "edits.vs_reconstruction": "edit vs the NTI reconstruction of the same model (what the edit keeps)",
            "edits.clip_target": "CLIP score of the edit vs the target prompt",
            "reconstruction.vs_input": "NTI reconstruction vs the input image",
        },
        "num_items": num_items,
        "skipped": nets.skipped,
        "models": models,
    }


def markdown(results: dict) -> str:
    cfg = results["config"]
    any_m = next(iter(results["models"].values()))["metrics"]
    pm = [k for k in PAIR_METRICS if k in any_m["reconstruction"]["vs_input"]]
    clip_on = "clip_target" in any_m["reconstruction"]
    digits = {k: (2 if k == "psnr" else 4) for k in PAIR_METRICS}
    erows, rrows = [], []
    for name, m in results["models"].items():
        mm = m["metrics"]
        for key, e in mm["edits"].items():
            erows.append([name, key] + [report.fmt(e["vs_reconstruction"][k], digits[k]) for k in pm]
                         + ([report.fmt(e["clip_target"], 2)] if clip_on else []))
        r = mm["reconstruction"]
        rrows.append([name] + [report.fmt(r["vs_input"][k], digits[k]) for k in pm]
                     + ([report.fmt(r["clip_source"], 2), report.fmt(r["clip_target"], 2)] if clip_on else []))
    e = cfg["edits"]
    what = f"`{e['file']}`" if "file" in e else (f"{e['data']['source']} images, targets "
                                                 f"`{e['target_template']}` with {e['target_words']}")
    lines = [
        "# Editing evaluation (NTI + prompt switch)",
        "",
        f"Model `{cfg['model']}`; {results['num_items']} images at {results['resolution']} px ({what}); "
        f"{cfg['steps']} DDIM steps, CFG "
        f"{cfg['guidance']:g}; the target prompt is used for the last r of the steps.",
        "",
        "## Edits against the reconstruction",
        "",
        report.markdown_table(["Model", "Ratio r"] + [ARROWS[k] for k in pm]
                              + (["CLIP score (target) ↑"] if clip_on else []), erows),
        "",
        "## NTI reconstruction against the input",
        "",
        report.markdown_table(["Model"] + [ARROWS[k] for k in pm]
                              + (["CLIP score (source)", "CLIP score (target)"] if clip_on else []), rrows),
        "",
        f"Scale: {results['scale']}.",
    ]
    if results["skipped"]:
        lines += ["", "Skipped (weights not given): "
                  + "; ".join(f"{k}: {v}" for k, v in results["skipped"].items()) + "."]
    return "\n".join(lines)


def _grids(rd: report.RunDir, cfg: dict, names: Sequence[str], num_items: int) -> None:
    """Per image: one row per model, input | reconstruction | edit at each ratio."""
    from smooth_jax import images

    for i in range(min(cfg["grids"], num_items)):
        cells = []
        for name in names:
            a = rd.load_arrays(i, name)
            cells += [a["input"], a["reconstruction"], *a["edits"]]
        images.save_grid(report.unit_to_uint8(np.stack(cells)), rd.grid_file(f"edit_{i:03d}.png"),
                         nrow=2 + len(cfg["ratios"]))


# --- command line -----------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    inputs.add_common_args(p)
    inputs.add_data_args(p)
    p.add_argument("--num-images", type=int, default=8, help="first N images (or edits) (default 8)")
    p.add_argument("--edits", default=None, help="JSONL of {image|file_name, source, target}")
    p.add_argument("--target-template", default=None,
                   help="target prompt: {} takes --target-words in turn, {source} the source prompt")
    p.add_argument("--target-words", nargs="*", default=[], help="words for {} in --target-template")
    p.add_argument("--ratio", type=float, nargs="+", default=[0.6, 0.7, 0.8, 0.9],
                   help="fraction of the steps that use the target prompt (default: the paper's 0.6 0.7 0.8 0.9)")
    p.add_argument("--inner-steps", type=int, default=10, help="NTI: at most this many Adam steps per timestep")
    p.add_argument("--batch-images", type=int, default=1, help="images per inversion call (default 1)")
    m = p.add_argument_group("metrics (each needs local weights; skipped when not given)")
    inputs.add_clip_arg(m)
    inputs.add_lpips_args(m)


def config_from_args(args) -> dict:
    return {
        **inputs.common_config(args),
        "data": inputs.data_spec_from_args(args),
        "edits_file": args.edits,
        "target_template": args.target_template,
        "target_words": list(args.target_words),
        "num_images": args.num_images,
        "ratios": list(args.ratio),
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
