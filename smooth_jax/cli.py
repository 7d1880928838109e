"""The ``smooth-jax`` command line.

    smooth-jax demo      [--out DIR]                        the embedded default, end to end
    smooth-jax train     --config configs/tiny.py --workdir runs/x [--resume] [--config.a.b=v ...]
    smooth-jax init-lora --model tiny --rank 8 --out L.msgpack
    smooth-jax export    SOURCE | --checkpoint WORKDIR[/STEP] --out OUT.safetensors [--format ...]
    smooth-jax import    IN.safetensors --model MODEL --out L.msgpack
    smooth-jax convert   IN OUT --to peft|legacy|kohya
    smooth-jax info      FILE

Heavy imports happen inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

FORMATS = ("peft", "legacy", "kohya")


def _model_shapes(source: str):
    """UNet param shapes of a preset, a local folder or a hub id; no weights are read."""
    from smooth_jax.models import load_architecture, preset_param_shapes, presets

    if source in presets.PRESETS:
        return preset_param_shapes(source)["unet"]
    return load_architecture(source).param_shapes()["unet"]


def cmd_init_lora(args) -> int:
    import jax

    from smooth_jax import export, lora

    shapes = _model_shapes(args.model)
    spec = lora.LoraSpec(rank=args.rank, alpha=args.alpha if args.alpha is not None else float(args.rank),
                         targets=tuple(args.targets) if args.targets else lora.DEFAULT_TARGETS)
    tree = lora.as_numpy(jax.jit(lambda k: lora.init(k, shapes, spec))(jax.random.PRNGKey(args.seed)))
    lf = export.LoraFile(lora=tree, alpha=spec.alpha, targets=spec.targets, base_model=args.model)
    out = export.save_native(args.out, lf)
    print(f"wrote {out}: {len(lora.modules(tree))} modules, rank {spec.rank}, alpha {spec.alpha:g}, "
          f"{lora.count(tree):,} parameters")
    return 0


def cmd_train(args, overrides: list[str]) -> int:
    from smooth_jax import config_loader, sharding, train

    sharding.maybe_initialize_distributed()
    config = config_loader.apply_overrides(config_loader.load_config(args.config), overrides)
    result = train.train_and_evaluate(config, args.workdir, resume=args.resume,
                                      stop_after=args.stop_after, progress=not args.no_progress)
    if result.history:
        last = result.history[-1]
        print(f"step {result.step}: loss {last['loss/total']:.4f} (base {last['loss/base']:.4f}, "
              f"reg {last['loss/reg']:.4g}, a {last['reg/ema_a']:.4g})")
    return 0


def cmd_cache(args, overrides: list[str]) -> int:
    from smooth_jax import config_loader, train

    config = config_loader.apply_overrides(config_loader.load_config(args.config), overrides)
    n = train.build_cache(config, args.out, batch_size=args.batch_size)
    print(f"cached {n} records in {args.out}; train from it with --config.data.cache_dir={args.out}")
    return 0


def _generators(args):
    """The base model (unless --no-base) and one Generator per --lora, for sample/interpolate."""
    from smooth_jax.generation import Generator, load_lora_file
    from smooth_jax.models import load

    sd = load(args.model)
    gens = [] if (args.lora and args.no_base) else [("base", Generator(sd, None, num_steps=args.steps, guidance_scale=args.guidance))]
    for path in args.lora or []:
        lf = load_lora_file(path, sd.params["unet"])
        gens.append((Path(path).stem, Generator(sd, lf, num_steps=args.steps, guidance_scale=args.guidance)))
    return gens


def cmd_sample(args) -> int:
    from smooth_jax import images

    rows, gens = [], _generators(args)
    seeds = list(range(args.seed, args.seed + args.num))
    noise = None
    if args.noise:
        noise = np.load(args.noise).astype(np.float32)
        if noise.ndim != 4 or noise.shape[1:] != gens[0][1].latent_shape:
            raise ValueError(f"--noise {args.noise}: shape {noise.shape}, expected [N, *{gens[0][1].latent_shape}].")
    for name, gen in gens:
        x_T = gen.noise(seeds) if noise is None else noise
        ctx, unc = gen.text([args.prompt] * len(x_T), args.negative_prompt)
        rows.append(gen.render(x_T, ctx, unc))
        print(f"{name}: {len(x_T)} images " + (f"from {args.noise}" if noise is not None else f"seeds {seeds[0]}..{seeds[-1]}"))
    out = images.save_grid(np.concatenate(rows), args.out, nrow=len(rows[0]))
    print(f"wrote {out} (one row per model: {', '.join(n for n, _ in gens)})")
    return 0


def cmd_interpolate(args) -> int:
    from smooth_jax import images

    rows, gens = [], _generators(args)
    for name, gen in gens:
        frames = gen.interpolation(args.prompt, args.prompt2 or args.prompt, args.seed, args.seed2, args.frames,
                                   args.negative_prompt)
        rows.append(frames)
        if args.gif:
            gif = Path(args.gif)
            path = gif if len(rows) == 1 and not args.lora else gif.with_name(f"{gif.stem}_{name}{gif.suffix}")
            images.save_gif(np.concatenate([frames, frames[-2:0:-1]]), path, duration_ms=args.frame_ms)  # loops back
            print(f"wrote {path}")
    out = images.save_grid(np.concatenate(rows), args.out, nrow=args.frames)
    print(f"wrote {out}: {args.frames} frames per row, rows: {', '.join(n for n, _ in gens)}")
    return 0


def _checkpoint_lora(path: str):
    from smooth_jax import checkpoint, export

    tree, config, step = checkpoint.restore_lora(path)
    lora_cfg = config["lora"]
    lf = export.LoraFile(lora=tree, alpha=float(lora_cfg["alpha"]), targets=tuple(lora_cfg["targets"]),
                         base_model=str(config.get("model", "")))
    print(f"{path}: checkpoint at step {step}")
    return lf


def cmd_export(args) -> int:
    from smooth_jax import export

    if (args.source is None) == (args.checkpoint is None):
        raise ValueError("pass either a LoRA file or --checkpoint WORKDIR[/STEP], not both or neither.")
    lf = export.read_any(args.source) if args.source else _checkpoint_lora(args.checkpoint)
    if args.base_model:
        lf.base_model = args.base_model
    out = export.save(args.out, lf, args.format)
    print(f"wrote {out} ({args.format}): {_describe(lf)}")
    return 0


def cmd_import(args) -> int:
    from smooth_jax import export

    lf = export.read_any(args.source)
    shapes = _model_shapes(args.model)
    export.check_against(lf, shapes, args.source)
    lf.base_model = lf.base_model or args.model
    print(f"{args.source}: {lf.format} format, {_describe(lf)}; compatible with {args.model}")
    if args.out:
        print(f"wrote {export.save_native(args.out, lf)}")
    return 0


def cmd_convert(args) -> int:
    from smooth_jax import export

    lf = export.read_any(args.source)
    out = export.save(args.out, lf, args.to)
    print(f"{args.source} ({lf.format}) -> {out} ({args.to}): {_describe(lf)}")
    return 0


def cmd_info(args) -> int:
    from smooth_jax import export

    lf = export.read_any(args.source)
    print(f"{args.source}: {lf.format} format, {_describe(lf)}, base model {lf.base_model or 'unknown'}")
    return 0


def _describe(lf) -> str:
    from smooth_jax import lora

    return (f"{len(lora.modules(lf.lora))} modules, rank {lf.rank}, alpha {lf.alpha:g} "
            f"(scale {lf.alpha / lf.rank:g}), {lora.count(lf.lora):,} parameters")


def cmd_demo(args, overrides: list[str]) -> int:
    from smooth_jax import config_loader, demo

    config = config_loader.apply_overrides(config_loader.load_config(args.config), overrides)
    return demo.run(config, Path(args.out), torch=not args.no_torch, progress=not args.no_progress)


def cmd_pretrain(args, overrides: list[str]) -> int:
    from smooth_jax import base_model, config_loader

    config = config_loader.apply_overrides(config_loader.load_config(args.config), overrides)
    folder = base_model.build(config, progress=not args.no_progress, force=args.force)
    trained = base_model.read_provenance(folder)["trained"]
    print(f"base model: {folder}\n  autoencoder reconstruction MSE {trained['autoencoder']['reconstruction_mse']:.3g}, "
          f"UNet loss {trained['unet']['loss']:.4f}, trained in {trained['seconds'] / 60:.1f} min")
    if config.to_dict() == base_model.default_config().to_dict():
        print("  use it with --model digits (or the folder path)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smooth-jax", description="Smooth Diffusion (CVPR 2024) in JAX/Flax.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run the embedded default end to end (no download)")
    from smooth_jax.demo import REPO_CONFIG

    d.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    d.add_argument("--config", default=str(REPO_CONFIG), help="config file (default: configs/demo.py)")
    d.add_argument("--no-torch", action="store_true", help="skip the check with diffusers' PyTorch UNet")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(fn=cmd_demo, takes_overrides=True, host_devices=True)

    b = sub.add_parser("pretrain", help="train (or find cached) the embedded default base model on the bundled digits",
                       description="Train the SD-architecture base model of the embedded default from scratch "
                                   "(autoencoder, then UNet) and cache it; later calls return the cached folder.")
    b.add_argument("--config", default=str(REPO_CONFIG.parent / "digits_base.py"))
    b.add_argument("--force", action="store_true", help="train again even if cached")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(fn=cmd_pretrain, takes_overrides=True, host_devices=True)

    t = sub.add_parser("train", help="train a Smooth LoRA (any mesh, single- or multi-host)",
                       description="Train a Smooth Diffusion LoRA. Config fields are overridden with "
                                   "--config.SECTION.FIELD=VALUE, e.g. --config.train.lr=1e-4.")
    t.add_argument("--config", required=True, help="a configs/*.py file defining get_config()")
    t.add_argument("--workdir", required=True, help="checkpoints, TensorBoard logs, samples and the final LoRA go here")
    t.add_argument("--resume", action="store_true",
                   help="require a checkpoint in the workdir (a run always continues from one if present)")
    t.add_argument("--stop-after", type=int, default=None, help="stop (with a checkpoint) after this many steps")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(fn=cmd_train, takes_overrides=True)

    k = sub.add_parser("cache", help="encode a dataset once (VAE latents + text embeddings) for faster training",
                       description="Encode the config's dataset with the model's VAE (posterior mean, centre crop) "
                                   "and text encoder, once. Then train with --config.data.cache_dir=OUT.")
    k.add_argument("--config", required=True)
    k.add_argument("--out", required=True, help="cache folder to create")
    k.add_argument("--batch-size", type=int, default=16)
    k.set_defaults(fn=cmd_cache, takes_overrides=True)

    def add_generation_args(q):
        q.add_argument("--model", default="tiny", help="preset, diffusers folder or hub id")
        q.add_argument("--lora", action="append", help="LoRA file in any format (peft, legacy, kohya, .msgpack); "
                                                       "repeat to compare several; each gets a row")
        q.add_argument("--no-base", action="store_true", help="with --lora: leave out the base model's row")
        q.add_argument("--prompt", required=True)
        q.add_argument("--negative-prompt", default="")
        q.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
        q.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--out", required=True, help="PNG grid")

    q = sub.add_parser("sample", help="text-to-image with DDIM + CFG, base model and/or LoRAs")
    add_generation_args(q)
    q.add_argument("--num", type=int, default=4, help="images per model (seeds SEED..SEED+NUM-1)")
    q.add_argument("--noise", default=None, help="a .npy of initial latents x_T [N,4,h,w] to use instead of seeds")
    q.set_defaults(fn=cmd_sample)

    q = sub.add_parser("interpolate", help="slerp between two noises (and prompts): a PNG strip, optionally a GIF")
    add_generation_args(q)
    q.add_argument("--prompt2", default=None, help="end prompt (default: the same prompt)")
    q.add_argument("--seed2", type=int, default=1)
    q.add_argument("--frames", type=int, default=11, help="frames including both ends (11 as ISTD)")
    q.add_argument("--gif", default=None, help="also write an animated GIF (there and back)")
    q.add_argument("--frame-ms", type=int, default=120)
    q.set_defaults(fn=cmd_interpolate)

    i = sub.add_parser("init-lora", help="a fresh LoRA for a model (down ~ N(0, 1/r^2), up = 0)")
    i.add_argument("--model", default="tiny", help="preset (tiny, sd15), diffusers folder or hub id")
    i.add_argument("--rank", type=int, default=8)
    i.add_argument("--alpha", type=float, default=None, help="scale = alpha / rank (default: alpha = rank)")
    i.add_argument("--targets", nargs="*", help="regexes over module paths (default: to_q/to_k/to_v/to_out_0 of attn1/attn2)")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--out", required=True, help="smooth-jax LoRA file (.msgpack)")
    i.set_defaults(fn=cmd_init_lora)

    e = sub.add_parser("export", help="write a LoRA as PyTorch .safetensors (diffusers/peft, legacy or kohya)",
                       description="Write a smooth-jax LoRA (.msgpack), a training checkpoint, or any LoRA "
                                   ".safetensors as PyTorch .safetensors. No base model weights are needed.")
    e.add_argument("source", nargs="?", help="smooth-jax LoRA (.msgpack) or LoRA .safetensors in any of the three formats")
    e.add_argument("--checkpoint", default=None,
                   help="a training workdir (latest checkpoint), WORKDIR/checkpoints/STEP, or its checkpoints folder; "
                        "any topology, single- or multi-host")
    e.add_argument("--out", required=True, help="output .safetensors (written atomically)")
    e.add_argument("--format", choices=FORMATS, default="peft",
                   help="peft: diffusers load_lora_weights (default); legacy: the authors' attention-processor "
                        "format (unet.load_attn_procs); kohya: ComfyUI / A1111")
    e.add_argument("--base-model", default=None, help="recorded in the file's metadata")
    e.set_defaults(fn=cmd_export)

    m = sub.add_parser("import", help="read a PyTorch LoRA (any format) and check it against a base model",
                       description="Detect the format of a LoRA .safetensors (diffusers/peft, legacy, kohya), "
                                   "check every module against the base model's UNet, and optionally write it "
                                   "as a smooth-jax LoRA.")
    m.add_argument("source", help="LoRA .safetensors")
    m.add_argument("--model", default="tiny", help="base model: preset (tiny, sd15), diffusers folder or hub id; "
                                                   "only its configs are read")
    m.add_argument("--out", default=None, help="write the smooth-jax LoRA here (.msgpack)")
    m.set_defaults(fn=cmd_import)

    c = sub.add_parser("convert", help="convert a LoRA file between formats, no base model needed")
    c.add_argument("source")
    c.add_argument("out")
    c.add_argument("--to", choices=FORMATS, required=True)
    c.set_defaults(fn=cmd_convert)

    f = sub.add_parser("info", help="print a LoRA file's format, rank, alpha and size")
    f.add_argument("source")
    f.set_defaults(fn=cmd_info)

    from smooth_jax import evaluation, image_commands, plan

    image_commands.register(sub)  # invert, edit, interpolate-images
    plan.register(sub)  # plan: ahead-of-time compiles for TPU pods and GPU nodes
    evaluation.register(sub)  # eval istd | reconstruct | edit
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from smooth_jax import runtime

    if getattr(args, "host_devices", False):
        runtime.split_host_devices()
    runtime.setup()
    try:
        return args.fn(args, rest) if getattr(args, "takes_overrides", False) else args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"smooth-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
