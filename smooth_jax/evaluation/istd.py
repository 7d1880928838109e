"""``smooth-jax eval istd``: the paper's Table 1 (ISTD ↓, FID ↓, CLIP score ↑) for several models.

    smooth-jax eval istd --model /path/to/stable-diffusion-v1-5 --lora smooth=smooth_lora.safetensors \\
        --prompts prompts.txt --num-prompts 500 --out runs/istd
    python eval/istd.py --model tiny --prompts eval/prompts/digits.txt --steps 10 --frames 5 --out runs/istd_tiny

For prompt i two initial noises come from seeds derived from (``--seed``, i) (``prompt_seeds``),
the same for every model. The F frames are the slerp mixes at ``interpolation_weights(F)`` (0, 0.1,
..., 1 for F = 11), sampled with DDIM + CFG from the same prompt and decoded. Images are compared in
[0, 1] (``report.unit_images``: ``(x + 1) / 2`` clipped, not quantised) with the L2 norm over all
C*H*W pixels (``metrics.adjacent_distances``). A prompt's score is the std of its F-1 adjacent
distances; ISTD is the mean over prompts (``metrics.istd_from_distances``).

CLIP score and FID use the two end frames of each prompt (weights 0 and 1: ordinary samples from
Gaussian noise), so 2 images per prompt; FID compares them with ``--fid-num-images`` real images
from ``--fid-data`` (center-cropped at the model's resolution).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import numpy as np

from smooth_jax.fileio import source_id
from smooth_jax.evaluation import inputs, report

RUN = "istd"
HELP = "ISTD (+ FID, CLIP score) of interpolation strips, several models"
METRICS = ("clip", "fid")


def default_config() -> dict:
    """Every field of an ISTD run, with its default (the paper's setting where it has one)."""
    return {
        "model": "tiny",
        "loras": [],  # "[NAME=]PATH", any LoRA format
        "base": True,
        "prompts_file": None,  # one prompt per line
        "tfds_captions": None,  # or: captions of a TFDS dataset (e.g. coco_captions)
        "data_dir": "",
        "split": "train",
        "caption_key": "caption",
        "image_key": "image",
        "num_prompts": None,  # None: every line of the file; 500 (the paper's) for TFDS captions
        "repeats": 1,  # each prompt this many times, with its own noises (item i = prompt i mod P)
        "frames": 11,
        "steps": 50,
        "guidance": 7.5,
        "seed": 0,
        "negative_prompt": "",
        "batch_prompts": 1,  # prompts per render call (frames x this, padded to the devices)
        "metrics": {"clip": None, "fid_inception": None, "fid_clip": None, "digits": False},
        "fid_data": None,  # inputs.data_spec(...) of the real images for FID
        "fid_num_images": 1000,
        "grids": 4,
    }


def prompt_seeds(seed: int, item: int) -> tuple[int, int]:
    """The two noise seeds of prompt ``item``: ``numpy.random.SeedSequence([seed, item])``'s first
    two 32-bit words. Independent across prompts and base seeds; the same for every model."""
    a, b = np.random.SeedSequence([int(seed), int(item)]).generate_state(2)
    return int(a), int(b)


def resolve(config: dict) -> tuple[dict, list[str]]:
    """The stored run config (paths absolute, LoRAs and prompts hashed) and the prompts."""
    c = {**default_config(), **config}
    if c["frames"] < 3:
        raise ValueError(f"--frames {c['frames']}: ISTD needs at least 3 frames (2 distances).")
    if (c["prompts_file"] is None) == (c["tfds_captions"] is None):
        raise ValueError("give the prompts as --prompts FILE or --tfds-captions NAME (exactly one).")
    if c["prompts_file"]:
        path = source_id(c["prompts_file"])
        prompts = inputs.read_prompt_file(path)
        source = {"file": path}
        n = c["num_prompts"] or len(prompts)
    else:
        data_dir = source_id(c["data_dir"]) if c["data_dir"] else ""
        source = {"tfds": c["tfds_captions"], "data_dir": data_dir,
                  "split": c["split"], "caption_key": c["caption_key"], "image_key": c["image_key"]}
        n = c["num_prompts"] or 500
        prompts = inputs.dataset_captions(
            inputs.data_spec("tfds", source["data_dir"], c["tfds_captions"], c["split"], c["image_key"],
                             c["caption_key"]), n)
    if len(prompts) < n:
        raise ValueError(f"--num-prompts {n}, but only {len(prompts)} prompts in {source}.")
    prompts = prompts[:n]
    if int(c["repeats"]) < 1:
        raise ValueError(f"--repeats {c['repeats']}: must be >= 1.")
    prompts = prompts * int(c["repeats"])
    metrics = inputs.resolve_metric_options(c["metrics"])
    fid_on = bool(metrics.get("fid_inception") or metrics.get("fid_clip") or metrics.get("digits"))
    if metrics.get("digits"):
        for p in prompts:
            digit_label(p)  # every prompt must name its digit before any work
    if fid_on and not c["fid_data"]:
        raise ValueError("FID needs real images: pass --fid-data digits|folder|tfds (and its options).")
    if int(c["batch_prompts"]) < 1 or int(c["seed"]) < 0:
        raise ValueError("--batch-prompts must be >= 1 and --seed >= 0.")
    stored = {
        "run": RUN,
        **inputs.resolve_common(c),
        "prompts": source,
        "num_prompts": len(prompts),
        "repeats": int(c["repeats"]),
        "prompts_sha256": report.text_sha256(prompts),
        "frames": int(c["frames"]),
        "seed": int(c["seed"]),
        "negative_prompt": c["negative_prompt"],
        "batch_prompts": int(c["batch_prompts"]),
        "metrics": metrics,
        "fid_data": c["fid_data"] if fid_on else None,
        "fid_num_images": int(c["fid_num_images"]) if fid_on else None,
    }
    return stored, prompts


def run(config: dict, out: str, *, progress: bool = True, stop_after: int | None = None) -> dict | None:
    """Run (or resume) an ISTD evaluation into ``out``; returns the results dict, or None when
    ``stop_after`` new (model, prompt) results were written before the end."""
    from smooth_jax.generation import Generator

    t0 = time.time()
    cfg, prompts = resolve(config)
    rd = report.RunDir(out, cfg)
    rd.check()
    nets = inputs.load_metric_nets(cfg, METRICS)
    for line in report.skipped_lines(nets.skipped):
        print(line)
    sd = inputs.load_model(cfg["model"])
    gens = [(name, Generator(sd, lf, num_steps=cfg["steps"], guidance_scale=cfg["guidance"]))
            for name, lf in inputs.load_loras(sd, cfg["models"])]
    resumed = rd.start()
    names = [n for n, _ in gens]
    n_prompts, frames, bsz = cfg["num_prompts"], cfg["frames"], cfg["batch_prompts"]
    done = set(rd.records())
    if resumed:
        print(f"resuming {out}: {len(done)} of {n_prompts * len(names)} results done")

    new = 0
    bar = report.progress(n_prompts, sum(all((m, i) in done for m in names) for i in range(n_prompts)),
                          "ISTD prompts", "prompt", progress)
    with bar:
        for block in inputs.blocks(iter(range(n_prompts)), bsz):
            todo = [(name, gen) for name, gen in gens if any((name, i) not in done for i in block)]
            if not todo:
                continue
            items = inputs.padded(block, bsz)
            seeds, noises, ctx, unc = block_inputs(gens[0][1], cfg, [prompts[i] for i in items], items)
            for name, gen in todo:
                r = render_block(gen, nets, noises, ctx, unc, [prompts[i] for i in items], frames)
                strips, dists, clip, feats = r["strips"], r["distances"], r.get("clip"), r["features"]
                for j, i in enumerate(block):
                    if (name, i) in done:
                        continue
                    d = dists[j].astype(np.float64)
                    rec = {"model": name, "item": i, "prompt": prompts[i], "seeds": list(seeds[j]),
                           "distances": [float(v) for v in dists[j]], "std": float(d.std(ddof=0)),
                           "mean_distance": float(d.mean())}
                    if "digits" in r:
                        rec["digit_correct"] = [int(v) for v in r["digits"][j]]
                    if clip is not None:
                        rec["clip_scores"] = [float(v) for v in clip[j]]
                        rec["clip_score"] = float(np.mean(clip[j].astype(np.float64)))
                    for label, f in feats.items():
                        rd.save_features(f"{label}_{name}_{i:05d}", f[j])
                    if i < cfg["grids"]:
                        rd.save_arrays(i, name, frames=report.unit_to_uint8(strips[j]))
                    rd.append(rec)
                    done.add((name, i))
                    new += 1
                    if stop_after is not None and new >= stop_after:
                        print(f"stopped after {new} new results; rerun the same command to continue.")
                        return None
            bar.update(len(block))

    results = aggregate(rd, cfg, names, nets, sd)
    results["timing"] = {"this_invocation_s": round(time.time() - t0, 2), "resumed": resumed}
    md = markdown(results)
    rd.write_results(results, md)
    _grids(rd, cfg, names)
    print(md)
    print(f"wrote {rd.path / 'results.json'}, {rd.path / 'results.md'} and grids in {rd.path / 'grids'}")
    return results


def block_inputs(gen, cfg: dict, prompts: Sequence[str], items: Sequence[int]):
    """What every model renders for a block of B prompts: ``(seeds [B] pairs, noises [B*F,4,h,w],
    ctx [B*F,L,D], unc [B*F,L,D])``, frames of one prompt consecutive. Model-independent (the
    noises and the text encoder are the base model's)."""
    from smooth_jax import sampling

    frames, b = cfg["frames"], len(items)
    seeds = [prompt_seeds(cfg["seed"], i) for i in items]
    pairs = gen.noise([s for ab in seeds for s in ab]).reshape((b, 2) + gen.latent_shape)
    noises = np.asarray(sampling.slerp(pairs[:, 0], pairs[:, 1], sampling.interpolation_weights(frames)))  # [F,B,..]
    noises = np.swapaxes(noises, 0, 1).reshape((b * frames,) + pairs.shape[2:])
    ctx, unc = gen.text(list(prompts), cfg["negative_prompt"])
    return seeds, noises, np.repeat(ctx, frames, axis=0), np.repeat(unc, frames, axis=0)


def render_block(gen, nets, noises, ctx, unc, prompts: Sequence[str], frames: int) -> dict:
    """One model's frames for a block of B prompts and what is measured on them: ``strips``
    [B,F,3,H,W] in [0,1], ``distances`` [B,F-1] (float32), ``clip`` [B,2] (end frames; with a
    CLIP scorer) and ``features`` {label: [B,2,D]} (end frames, per FID extractor)."""
    from smooth_jax import metrics

    b = len(prompts)
    imgs = report.unit_images(gen.render(noises, ctx, unc, chunk=b * frames))
    strips = imgs.reshape((b, frames) + imgs.shape[1:])
    ends = strips[:, [0, -1]].reshape((2 * b,) + imgs.shape[1:])
    out = {"strips": strips, "distances": np.asarray(metrics.adjacent_distances(strips), np.float32),
           "features": {label: np.asarray(ext(ends)).reshape(b, 2, -1) for label, ext in nets.fid.items()}}
    if nets.clip is not None:
        out["clip"] = np.asarray(nets.clip.scores(ends, [p for p in prompts for _ in range(2)])).reshape(b, 2)
    if nets.digits is not None:
        labels = np.repeat([digit_label(p) for p in prompts], 2)
        out["digits"] = (nets.digits.predict(ends) == labels).reshape(b, 2)
    return out


def digit_label(prompt: str) -> int:
    """The digit a prompt asks for ("a handwritten digit seven" -> 7), for the digit accuracy."""
    from smooth_jax.data.sources import DIGIT_NAMES

    words = prompt.lower().replace(",", " ").split()
    found = [i for i, name in enumerate(DIGIT_NAMES) if name in words or str(i) in words]
    if len(found) != 1:
        raise ValueError(f"--digits: prompt {prompt!r} must name exactly one digit (zero..nine or 0..9).")
    return found[0]


def aggregate(rd: report.RunDir, cfg: dict, names: Sequence[str], nets, sd) -> dict:
    """Per-model metrics from partial.jsonl (item order), FID from the saved features."""
    from smooth_jax import metrics

    by = rd.by_model(names, cfg["num_prompts"])
    models = {}
    for name in names:
        recs = by[name]
        res = metrics.istd_from_distances([r["distances"] for r in recs])
        m = {
            "istd": {"mean": res["istd"], "std": float(res["per_prompt_std"].std(ddof=0)), "n": len(recs)},
            "mean_distance": report.summarize(res["per_prompt_mean_distance"]),
        }
        if nets.clip is not None:
            m["clip_score"] = report.summarize(r["clip_score"] for r in recs)
        if nets.digits is not None:
            m["digit_accuracy"] = report.summarize(float(np.mean(r["digit_correct"])) for r in recs)
        for label, ext in nets.fid.items():
            fake = np.concatenate([rd.load_features(f"{label}_{name}_{i:05d}") for i in range(len(recs))])
            real = _real_features(rd, cfg, label, ext, sd)
            m[label] = {"value": metrics.fid(real, fake), "n_generated": len(fake), "n_real": len(real),
                        "features": ext.name}
        models[name] = {"metrics": m, "per_item": recs}
    return {
        "run": RUN,
        "config": cfg,
        "versions": report.versions(),
        "scale": metrics.ISTD_SCALE + "; decoder output mapped to [0,1] as clip((x+1)/2, 0, 1), not quantised",
        "definitions": {
            "istd": "mean over prompts of the std of a prompt's F-1 adjacent-frame L2 distances; std: over prompts",
            "mean_distance": "mean adjacent-frame L2 distance per prompt, " + report.STD_NOTE,
            "clip_score": "100 * max(cos, 0) of the two end frames vs the prompt, mean per prompt; " + report.STD_NOTE,
            "FID": "Frechet distance of InceptionV3 pool3 features: 2 end frames per prompt vs the real images",
            "FID_CLIP": "Frechet distance of CLIP image embeddings: 2 end frames per prompt vs the real images",
            "FD_digits": "Frechet distance of a digit classifier's hidden features (metrics.digits): 2 end frames "
                         "per prompt vs the real images",
            "digit_accuracy": "fraction of the 2 end frames per prompt that the digit classifier reads as the "
                              "prompt's digit; " + report.STD_NOTE,
        },
        "skipped": nets.skipped,
        "models": models,
        **({"digit_judge_held_out_accuracy": nets.digits.held_out_accuracy} if nets.digits is not None else {}),
    }


def _real_features(rd: report.RunDir, cfg: dict, label: str, extractor, sd) -> np.ndarray:
    """Features of the FID reference images, computed once per run folder (cached in features/)."""
    if rd.feature_file(f"real_{label}").exists():
        return rd.load_features(f"real_{label}")
    res = sd.default_image_size()
    chunks = []
    for block in inputs.blocks(inputs.iter_images(cfg["fid_data"], res, cfg["fid_num_images"]), 50):
        x = report.unit_images(np.stack(inputs.padded([r["image"] for r in block], 50)))
        chunks.append(np.asarray(extractor(x))[: len(block)])
    real = np.concatenate(chunks)
    if len(real) < 2:
        raise ValueError(f"FID needs at least 2 real images; --fid-data gave {len(real)}.")
    rd.save_features(f"real_{label}", real)
    return real


def markdown(results: dict) -> str:
    cfg, skipped = results["config"], results["skipped"]
    fid_labels = [k for k in ("FID", "FID_CLIP", "FD_digits") if any(k in m["metrics"] for m in results["models"].values())]
    clip_on = any("clip_score" in m["metrics"] for m in results["models"].values())
    digits_on = any("digit_accuracy" in m["metrics"] for m in results["models"].values())
    headers = (["Model", "ISTD ↓"] + [f"{k} ↓" for k in fid_labels] + (["CLIP score ↑"] if clip_on else [])
               + (["digit accuracy ↑"] if digits_on else []))
    rows = []
    for name, m in results["models"].items():
        mm = m["metrics"]
        rows.append([name, report.fmt(mm["istd"])] + [report.fmt(mm[k]["value"], 2) for k in fid_labels]
                    + ([report.fmt(mm["clip_score"], 2)] if clip_on else [])
                    + ([report.fmt(mm["digit_accuracy"], 3)] if digits_on else []))
    source = cfg["prompts"].get("file") or f"TFDS {cfg['prompts'].get('tfds')} ({cfg['prompts'].get('split')})"
    lines = [
        "# ISTD evaluation (Smooth Diffusion, Table 1)",
        "",
        f"Model `{cfg['model']}`; {cfg['num_prompts']} prompts from `{source}`; {cfg['frames']} frames (slerp "
        f"weights evenly spaced in [0, 1]); {cfg['steps']} DDIM steps, CFG {cfg['guidance']:g}; seed {cfg['seed']}.",
        "",
        report.markdown_table(headers, rows),
        "",
        "ISTD: mean over prompts of the std of each prompt's adjacent-frame L2 distances (± the std over prompts).",
        f"Pixel scale: {results['scale']}.",
    ]
    if fid_labels:
        lines.append("FID columns use the 2 end frames per prompt against "
                     f"{next(iter(results['models'].values()))['metrics'][fid_labels[0]]['n_real']} real images "
                     f"({cfg['fid_data']['source']}).")
    if digits_on:
        lines.append("digit accuracy: share of end frames a digit classifier trained here (metrics.digits, held-out "
                     "accuracy {:.3f}) reads as the prompt's digit; FD_digits: Fréchet distance on its hidden "
                     "features.".format(results.get("digit_judge_held_out_accuracy", float("nan"))))
    if clip_on:
        lines.append(f"CLIP score: 100·max(cos, 0), CLIP `{cfg['metrics']['clip']}`, end frames vs prompt.")
    if skipped:
        lines += ["", "Skipped (weights not given): " + "; ".join(f"{k}: {v}" for k, v in skipped.items()) + "."]
    return "\n".join(lines)


def _grids(rd: report.RunDir, cfg: dict, names: Sequence[str]) -> None:
    """One strip per prompt: a row of frames per model."""
    from smooth_jax import images

    for i in range(min(cfg["grids"], cfg["num_prompts"])):
        rows = [rd.load_arrays(i, name)["frames"] for name in names]
        images.save_grid(np.concatenate(rows), rd.grid_file(f"istd_{i:03d}.png"), nrow=cfg["frames"])


# --- command line -----------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    inputs.add_common_args(p)
    g = p.add_argument_group("prompts")
    g.add_argument("--prompts", default=None, help="text file, one prompt per line ('#' lines skipped)")
    g.add_argument("--tfds-captions", default=None, metavar="NAME", help="or: captions of a TFDS dataset")
    g.add_argument("--data-dir", default="", help="TFDS data_dir for --tfds-captions")
    g.add_argument("--split", default="train", help="TFDS split for --tfds-captions")
    g.add_argument("--caption-key", default="caption", help="caption feature (nested with '/', e.g. captions/text)")
    g.add_argument("--image-key", default="image", help="the dataset's image feature (checked to exist)")
    g.add_argument("--num-prompts", type=int, default=None,
                   help="first N prompts (default: all of --prompts; 500 of --tfds-captions)")
    p.add_argument("--repeats", type=int, default=1,
                   help="evaluate each prompt this many times, each with its own pair of noises (default 1)")
    p.add_argument("--frames", type=int, default=11, help="frames per prompt, ends included (default 11)")
    p.add_argument("--seed", type=int, default=0, help="base seed; prompt i's noises use seeds derived from (seed, i)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--batch-prompts", type=int, default=1,
                   help="prompts per render call (default 1); part of the config, as it fixes the compiled shapes")
    m = p.add_argument_group("metrics (each needs local weights; skipped when not given)")
    inputs.add_clip_arg(m)
    m.add_argument("--fid-inception", default=None, help="FID with pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
    m.add_argument("--fid-clip", default=None, help="FID_CLIP with this Hugging Face CLIP folder")
    inputs.add_data_args(m, prefix="fid-", what="FID's real images")
    m.add_argument("--fid-num-images", type=int, default=1000, help="real images for FID (default 1000)")
    m.add_argument("--digits", action="store_true",
                   help="digit accuracy + FD_digits, judged by a digit classifier trained here on the bundled "
                        "digits (no weights needed; prompts must name a digit; pass --fid-data digits)")


def config_from_args(args) -> dict:
    return {
        **inputs.common_config(args),
        "prompts_file": args.prompts,
        "tfds_captions": args.tfds_captions,
        "data_dir": args.data_dir,
        "split": args.split,
        "caption_key": args.caption_key,
        "image_key": args.image_key,
        "num_prompts": args.num_prompts,
        "repeats": args.repeats,
        "frames": args.frames,
        "seed": args.seed,
        "negative_prompt": args.negative_prompt,
        "batch_prompts": args.batch_prompts,
        "metrics": inputs.metric_options(args, METRICS),
        "fid_data": inputs.data_spec_from_args(args, prefix="fid-"),
        "fid_num_images": args.fid_num_images,
    }


def command(args) -> int:
    run(config_from_args(args), args.out, progress=not args.no_progress, stop_after=args.stop_after)
    return 0


def main(argv: list[str] | None = None) -> int:
    from smooth_jax.evaluation import run_main

    return run_main(RUN, add_arguments, command, argv)


if __name__ == "__main__":
    sys.exit(main())
