"""The real-image commands: inversion, prompt-switch editing and real-image interpolation.

    smooth-jax invert --image cat.png --prompt "a cat" [--method ddim|nti] --out inv/
        inv/reconstruction.png  input | VAE-only | DDIM g=1 | DDIM + CFG [| NTI + CFG]
        inv/metrics.json        MSE/PSNR/SSIM ([0,1] images) of each against the input and the VAE-only image
        inv/inversion.npz       x_T (and NTI's nulls), with the settings ``edit --inversion`` checks
    smooth-jax edit --image cat.png --source-prompt "a cat" --target-prompt "a dog" \
        [--ratio 0.6 --ratio 0.9] [--inversion inv/inversion.npz] --out edit.png
        edit.png                input | NTI reconstruction | one column per ratio
    smooth-jax interpolate-images --image a.png --image b.png --prompt "a photo" [--prompt2 Q] \
        [--frames 11] [--lora L ...] --out strip.png [--gif strip.gif]
        strip.png               per model a row: input A | F frames | input B

What runs (DESIGN §2, the authors' code): the image is resized (shorter side) and centre-cropped
to the model's size (512 for SD-1.5), encoded to the VAE posterior mean x 0.18215, DDIM-inverted
with the conditional UNet (no guidance), and, for NTI, the null embedding of every step is
optimised so that CFG sampling retraces the inversion (``inversion.null_text_invert``; a tqdm bar
over the timesteps). ``edit`` starts from the NTI x_T with its nulls and switches from the
source to the target prompt after ``round((1 - r) S)`` of S steps. ``interpolate-images`` is the
paper's Fig. 3: both images are inverted with ONE shared null series, the two x_T are slerped
(lerp when nearly parallel) and each frame is sampled with the shared nulls; with two prompts
the text states are mixed linearly with the same weight. With several ``--lora`` every model
inverts with its own UNet and gets its own row.

A LoRA may be in any format (peft, legacy, kohya, smooth-jax .msgpack); it is merged into the
UNet once. Errors a user can fix (missing image, ratio outside [0, 1], a LoRA that does not fit,
a saved inversion made with other settings) are ValueError / FileNotFoundError, which the CLI
prints and turns into exit status 2. Every file is written atomically.

``cli.build_parser`` adds the subcommands with ``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from smooth_jax.fileio import file_sha256, source_id

INVERSION_FORMAT = "smooth-jax inversion v1"
EDIT_RATIOS = (0.6, 0.7, 0.8, 0.9)  # the paper's editing ratios (DESIGN §2)
METRICS_SCALE = ("images clipped to [-1,1] and mapped to [0,1]; mse: mean over C*H*W; psnr: dB, data range 1; "
                 "ssim: Gaussian 11x11 window, sigma 1.5; latent_mse: mean over the scaled latents")
DECODE_CHUNK = 4  # images per VAE decode call (padded, so one compile serves every count)
FRAME_CHUNK = 8  # interpolation frames sampled per call


# --- models -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Model:
    """A loaded Stable Diffusion with one UNet: the base, or the base with a LoRA merged in.

    name: "base" or the LoRA file's stem; lora: the LoRA's path ("" for the base);
    lora_sha256: hex digest of the LoRA file ("" for the base), what saved inversions are matched on.
    """

    sd: Any
    unet_params: Any
    name: str = "base"
    lora: str = ""
    lora_sha256: str = ""


def load_model(source: str):
    """``models.load(source)``, looked up at call time (tests substitute a better-behaved tiny UNet)."""
    from smooth_jax import models

    return models.load(source)


def with_lora(sd, lora_path: str | None, name: str | None = None) -> Model:
    """The base model (``lora_path`` None) or the base with the LoRA file (any format) merged once."""
    if not lora_path:
        return Model(sd, sd.params["unet"])
    from smooth_jax.generation import load_lora_file, merged_unet

    lf = load_lora_file(lora_path, sd.params["unet"])
    unet = merged_unet(sd.params["unet"], lf)
    return Model(sd, unet, name or Path(lora_path).stem, str(lora_path), file_sha256(lora_path))


def _require_file(path: str, what: str) -> None:
    """Fail before the (slow) model load when an input file is missing."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {path!r} {'is a folder' if p.is_dir() else 'does not exist'}.")


def _check_settings(args, nti: bool) -> None:
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}.")
    if args.guidance < 1.0:
        raise ValueError(f"--guidance must be >= 1 (1 = no guidance), got {args.guidance}.")
    if nti:
        if args.guidance <= 1.0:
            raise ValueError(
                f"null-text inversion optimises the unconditional embedding, which only acts with guidance > 1; "
                f"got --guidance {args.guidance}."
            )
        if args.inner_steps < 1:
            raise ValueError(f"--inner-steps must be >= 1, got {args.inner_steps}.")


# --- images -----------------------------------------------------------------------------------

_DECODERS: dict[int, tuple[Any, Any]] = {}


def decode(sd, latents) -> np.ndarray:
    """latents [N,4,h,w] -> images float32 [N,3,H,W] (about [-1,1]), ``DECODE_CHUNK`` at a time.

    Chunks are padded to the chunk size so every count reuses one compiled decoder (one per model
    object; SD's VAE decoder at 512 px needs a few GiB per image)."""
    import jax

    if id(sd) not in _DECODERS or _DECODERS[id(sd)][0] is not sd:
        if len(_DECODERS) >= 4:
            _DECODERS.clear()
        _DECODERS[id(sd)] = (sd, jax.jit(sd.decode_latents))
    fn = _DECODERS[id(sd)][1]
    latents = np.asarray(latents, np.float32)
    out = []
    for start in range(0, latents.shape[0], DECODE_CHUNK):
        part = latents[start:start + DECODE_CHUNK]
        real = part.shape[0]
        if real < DECODE_CHUNK:
            part = np.concatenate([part, np.repeat(part[-1:], DECODE_CHUNK - real, axis=0)])
        out.append(np.asarray(fn(sd.params["vae"], part))[:real])
    return np.concatenate(out)


def fidelity(x: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """MSE / PSNR / SSIM of images [B,3,H,W] in [-1,1] against a reference, on the [0,1] scale,
    after clipping to [-1,1] (what the PNG shows); means over the batch."""
    from smooth_jax import metrics

    clip = lambda a: np.clip(np.asarray(a, np.float32), -1.0, 1.0)  # noqa: E731
    return metrics.reconstruction_metrics(clip(x), clip(reference), value_range=(-1.0, 1.0))


def _image_sha256(image: np.ndarray) -> str:
    """Digest of the preprocessed pixels: a saved inversion matches the image, not its file name."""
    return hashlib.sha256(np.ascontiguousarray(image, np.float32).tobytes()).hexdigest()


def _write_json(path: Path, payload: dict) -> None:
    from smooth_jax.fileio import atomic_write

    atomic_write(path, (json.dumps(payload, indent=2, allow_nan=False) + "\n").encode())


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None  # PSNR of identical images is inf: not JSON


# --- saved inversions -------------------------------------------------------------------------


def save_inversion(path: Path, *, x_T, nulls=None, method: str, prompt: str, model: str, lora: str,
                   lora_sha256: str, image: str, image_sha256: str, image_size: int, steps: int,
                   guidance: float, inner_steps: int) -> Path:
    """Write an ``.npz`` with x_T [1,4,h,w] float32, NTI's nulls [S,1,L,D] float32 (NTI only) and
    the settings as 0-d arrays (strings, ints, floats); loadable without pickle."""
    from smooth_jax.fileio import atomic_write

    arrays = {
        "format": np.asarray(INVERSION_FORMAT), "method": np.asarray(method), "prompt": np.asarray(prompt),
        "model": np.asarray(model), "lora": np.asarray(lora), "lora_sha256": np.asarray(lora_sha256),
        "image": np.asarray(image), "image_sha256": np.asarray(image_sha256),
        "image_size": np.asarray(image_size, np.int64), "steps": np.asarray(steps, np.int64),
        "guidance": np.asarray(guidance, np.float64), "inner_steps": np.asarray(inner_steps, np.int64),
        "x_T": np.asarray(x_T, np.float32),
    }
    if nulls is not None:
        arrays["nulls"] = np.asarray(nulls, np.float32)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(Path(path), buf.getvalue())
    return Path(path)


def load_inversion(path: str | Path) -> dict:
    """A saved inversion as a dict: arrays as numpy, settings as Python str/int/float."""
    _require_file(str(path), "saved inversion")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"{str(path)!r} is not a readable .npz file: {e}") from None
    if str(data.get("format", "")) != INVERSION_FORMAT:
        raise ValueError(f"{str(path)!r} is not a smooth-jax inversion (written by `smooth-jax invert`).")
    out = {}
    for key, value in data.items():
        if value.ndim == 0:
            out[key] = value.item()
        else:
            out[key] = value
    return out


def check_inversion(saved: dict, path: str, expected: dict) -> None:
    """ValueError naming every field where ``saved`` differs from ``expected`` (same keys)."""
    wrong = []
    for key, want in expected.items():
        have = saved.get(key)
        same = np.isclose(have, want, rtol=0, atol=1e-9) if isinstance(want, float) else have == want
        if not same:
            wrong.append(f"{key}: saved {have!r}, this run {want!r}")
    if wrong:
        raise ValueError(f"saved inversion {path!r} does not match this run ({'; '.join(wrong)}). "
                         "Drop --inversion to invert again, or pass matching settings.")


# --- invert -----------------------------------------------------------------------------------


def cmd_invert(args) -> int:
    from smooth_jax import images, inversion, sampling

    nti = args.method == "nti"
    _check_settings(args, nti)
    _require_file(args.image, "image")
    sd = load_model(args.model)
    model = with_lora(sd, args.lora)
    size = sd.default_image_size()
    image = images.load_image(args.image, size)[None]  # [1,3,H,W]
    latents = inversion.encode_latents(sd, sd.params["vae"], image)
    context, uncond = sampling.encode_prompts(sd, sd.params["text_encoder"], [args.prompt])
    steps, g = args.steps, args.guidance

    x_T, pivots = inversion.ddim_invert(sd, model.unet_params, latents, context, num_steps=steps)
    recs = {"ddim_g1": inversion.reconstruct(sd, model.unet_params, x_T, context, num_steps=steps)}
    if g > 1.0:  # DDIM inversion + CFG with the "" embedding: the gap NTI closes
        recs["ddim_cfg"] = inversion.reconstruct(sd, model.unet_params, x_T, context, num_steps=steps,
                                                 guidance_scale=g, null_series=uncond)
    nti_result = None
    if nti:
        nti_result = inversion.null_text_optimize(sd, model.unet_params, pivots, context, uncond, guidance_scale=g,
                                                  inner_steps=args.inner_steps, progress=True)
        recs["nti_cfg"] = inversion.sample_with_nulls(sd, model.unet_params, nti_result.x_T, context,
                                                      nti_result.nulls, guidance_scale=g, num_steps=steps)

    decoded = decode(sd, np.concatenate([np.asarray(latents)] + [np.asarray(r) for r in recs.values()]))
    vae_only, rec_images = decoded[:1], dict(zip(recs, decoded[1:, None]))
    out = Path(args.out)
    columns = ["input", "vae"] + list(recs)
    grid = images.save_grid(np.concatenate([image, vae_only, *rec_images.values()]), out / "reconstruction.png",
                            nrow=len(columns))

    def rounded(m):
        return {k: _finite(v) for k, v in m.items()}

    report = {
        "image": str(args.image), "prompt": args.prompt, "model": source_id(args.model), "lora": model.lora,
        "method": args.method, "steps": steps, "guidance": g, "image_size": size,
        "columns": columns, "scale": METRICS_SCALE,
        "vs_input": {"vae": rounded(fidelity(vae_only, image)),
                     **{k: rounded(fidelity(v, image)) for k, v in rec_images.items()}},
        "vs_vae": {k: rounded(fidelity(v, vae_only)) for k, v in rec_images.items()},
        "latent_mse": {k: float(np.mean((np.asarray(v) - np.asarray(latents)) ** 2)) for k, v in recs.items()},
    }
    if nti_result is not None:
        report["nti"] = {"inner_steps": args.inner_steps,
                         "inner_steps_taken": np.asarray(nti_result.inner_steps)[:, 0].tolist(),
                         "losses": np.asarray(nti_result.losses)[:, 0].astype(float).tolist()}
    _write_json(out / "metrics.json", report)
    npz = save_inversion(
        out / "inversion.npz", x_T=x_T, nulls=None if nti_result is None else nti_result.nulls, method=args.method,
        prompt=args.prompt, model=source_id(args.model), lora=model.lora, lora_sha256=model.lora_sha256,
        image=str(args.image), image_sha256=_image_sha256(image), image_size=size, steps=steps, guidance=g,
        inner_steps=args.inner_steps if nti else 0,
    )

    def cells(m, width):  # PSNR is None (JSON null) where the images are equal
        return f"{m['mse']:>{width}.5f}" + (f"{m['psnr']:>8.2f}" if m["psnr"] is not None else f"{'inf':>8}")

    print(f"{'reconstruction':<16}{'vs input: MSE':>14}{'PSNR':>8}{'vs VAE-only: MSE':>18}{'PSNR':>8}")
    for name in ["vae"] + list(recs):
        b = report["vs_vae"].get(name)
        print(f"{name:<16}{cells(report['vs_input'][name], 14)}{cells(b, 18) if b else ''}")
    print(f"wrote {grid} ({' | '.join(columns)}), {out / 'metrics.json'}, {npz}")
    return 0


# --- edit -------------------------------------------------------------------------------------


def cmd_edit(args) -> int:
    from smooth_jax import images, inversion, sampling

    ratios = list(args.ratio) if args.ratio else list(EDIT_RATIOS)
    for r in ratios:
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"--ratio {r} is outside [0, 1] (the fraction of steps conditioned on the target).")
    _check_settings(args, nti=True)
    _require_file(args.image, "image")
    if args.inversion:
        _require_file(args.inversion, "saved inversion")
    sd = load_model(args.model)
    model = with_lora(sd, args.lora)
    size = sd.default_image_size()
    image = images.load_image(args.image, size)[None]
    text = sd.params["text_encoder"]
    source, uncond = sampling.encode_prompts(sd, text, [args.source_prompt])
    target, _ = sampling.encode_prompts(sd, text, [args.target_prompt])
    steps, g = args.steps, args.guidance

    if args.inversion:
        saved = load_inversion(args.inversion)
        if saved["method"] != "nti" or "nulls" not in saved:
            raise ValueError(f"saved inversion {args.inversion!r} was made with --method {saved['method']}: it has no "
                             "null embeddings; editing needs `smooth-jax invert --method nti`.")
        check_inversion(saved, args.inversion, {
            "image_sha256": _image_sha256(image), "image_size": size, "prompt": args.source_prompt,
            "model": source_id(args.model), "lora_sha256": model.lora_sha256, "steps": steps, "guidance": g,
        })
        x_T, nulls = saved["x_T"], saved["nulls"]
        print(f"reusing the inversion in {args.inversion}")
    else:
        latents = inversion.encode_latents(sd, sd.params["vae"], image)
        inv = inversion.null_text_invert(sd, model.unet_params, latents, source, uncond, num_steps=steps,
                                         guidance_scale=g, inner_steps=args.inner_steps, progress=True)
        x_T, nulls = inv.x_T, inv.nulls

    rec = inversion.sample_with_nulls(sd, model.unet_params, x_T, source, nulls, guidance_scale=g, num_steps=steps)
    edits = [inversion.edit(sd, model.unet_params, x_T, nulls, source, target, ratio=r, num_steps=steps,
                            guidance_scale=g) for r in ratios]
    decoded = decode(sd, np.concatenate([np.asarray(rec)] + [np.asarray(e) for e in edits]))
    out = images.save_grid(np.concatenate([image, decoded]), args.out, nrow=2 + len(ratios))
    for r, img in zip(ratios, decoded[1:]):
        n_source = int((~inversion.edit_switch(steps, r)).sum())
        print(f"ratio {r:g}: {n_source} of {steps} steps on the source prompt; "
              f"MSE to the reconstruction {fidelity(img[None], decoded[:1])['mse']:.5f}")
    print(f"wrote {out}: input | reconstruction | ratio {' | '.join(f'{r:g}' for r in ratios)}")
    return 0


# --- interpolate-images -----------------------------------------------------------------------


def _unique_names(names: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return out


def interpolate_frames(model: Model, latents_pair, context_pair, uncond, weights, *, num_steps: int,
                       guidance_scale: float, inner_steps: int):
    """Fig. 3 for one model: shared-null NTI of the pair [2,4,h,w] under context_pair [2,L,D], then one
    frame per weight. Returns (latents [F,4,h,w], the ``NullTextInversion``)."""
    from smooth_jax import inversion

    sd = model.sd
    inv = inversion.null_text_invert_pair(sd, model.unet_params, latents_pair, context_pair, uncond[:1],
                                          num_steps=num_steps, guidance_scale=guidance_scale,
                                          inner_steps=inner_steps, progress=True)
    w = np.asarray(weights, np.float32)
    chunk = min(len(w), FRAME_CHUNK)
    frames = []
    for start in range(0, len(w), chunk):  # fixed chunk (last one padded): one compile for any count
        part = w[start:start + chunk]
        real = len(part)
        part = np.concatenate([part, np.ones(chunk - real, np.float32)])
        lat = inversion.interpolate(sd, model.unet_params, inv.x_T, context_pair, inv.nulls, part,
                                    num_steps=num_steps, guidance_scale=guidance_scale)
        frames.append(np.asarray(lat)[:real])
    return np.concatenate(frames), inv


def cmd_interpolate_images(args) -> int:
    from smooth_jax import images, inversion, sampling

    if len(args.image or []) != 2:
        raise ValueError(f"interpolate-images needs exactly two --image, got {len(args.image or [])}.")
    if args.frames < 2:
        raise ValueError(f"--frames must be >= 2 (both ends included), got {args.frames}.")
    if args.no_base and not args.lora:
        raise ValueError("--no-base needs at least one --lora (otherwise there is no model left).")
    _check_settings(args, nti=True)
    for p in args.image:
        _require_file(p, "image")
    sd = load_model(args.model)
    models = [] if args.no_base else [with_lora(sd, None)]
    models += [with_lora(sd, p) for p in args.lora or []]
    for m, name in zip(models, _unique_names([m.name for m in models])):
        m.name = name
    size = sd.default_image_size()
    pair = np.stack([images.load_image(p, size) for p in args.image])  # [2,3,H,W]
    latents = inversion.encode_latents(sd, sd.params["vae"], pair)  # the LoRA is UNet-only: one encoding
    context, uncond = sampling.encode_prompts(sd, sd.params["text_encoder"], [args.prompt, args.prompt2 or args.prompt])
    weights = sampling.interpolation_weights(args.frames)

    vae_only = decode(sd, latents)
    rows = []
    for m in models:
        lat, _ = interpolate_frames(m, latents, context, uncond, weights, num_steps=args.steps,
                                    guidance_scale=args.guidance, inner_steps=args.inner_steps)
        frames = decode(sd, lat)
        rows.append(np.concatenate([pair[:1], frames, pair[1:]]))
        ends = np.stack([frames[0], frames[-1]])
        a, b = fidelity(ends, pair), fidelity(ends, vae_only)
        print(f"{m.name}: end frames vs inputs MSE {a['mse']:.5f} PSNR {a['psnr']:.2f}; "
              f"vs VAE-only MSE {b['mse']:.5f} PSNR {b['psnr']:.2f}")
        if args.gif:
            gif = Path(args.gif)
            path = gif if len(models) == 1 and not args.lora else gif.with_name(f"{gif.stem}_{m.name}{gif.suffix}")
            images.save_gif(np.concatenate([frames, frames[-2:0:-1]]), path, duration_ms=args.frame_ms)  # and back
            print(f"wrote {path}")
    out = images.save_grid(np.concatenate(rows), args.out, nrow=args.frames + 2)
    print(f"wrote {out}: per row input A | {args.frames} frames | input B; rows: {', '.join(m.name for m in models)}")
    return 0


# --- parser -----------------------------------------------------------------------------------


def _add_common(q: argparse.ArgumentParser, *, many_loras: bool, nti_always: bool) -> None:
    q.add_argument("--model", default="tiny", help="preset, diffusers folder or hub id (default: tiny)")
    if many_loras:
        q.add_argument("--lora", action="append",
                       help="LoRA file in any format (peft, legacy, kohya, .msgpack); repeat to compare several, "
                            "each inverting with its own UNet and getting a row")
        q.add_argument("--no-base", action="store_true", help="with --lora: leave out the base model's row")
    else:
        q.add_argument("--lora", default=None, help="LoRA file in any format (peft, legacy, kohya, .msgpack)")
    q.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    q.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    q.add_argument("--inner-steps", type=int, default=10,
                   help="NTI: at most this many Adam steps per timestep (default 10)"
                        + ("" if nti_always else "; with --method nti"))


def register(subparsers) -> None:
    """Add ``invert``, ``edit`` and ``interpolate-images`` to an argparse subparsers object; each sets
    ``fn`` to its command (``fn(args) -> exit status``)."""
    q = subparsers.add_parser(
        "invert", help="invert a real image (DDIM or null-text inversion): reconstructions, metrics, x_T",
        description="Encode an image, DDIM-invert it (optionally + null-text inversion) and reconstruct. "
                    "Writes OUT/reconstruction.png (input | VAE-only | DDIM g=1 | DDIM+CFG [| NTI+CFG]), "
                    "OUT/metrics.json (MSE/PSNR/SSIM on [0,1] images) and OUT/inversion.npz (for edit --inversion).")
    q.add_argument("--image", required=True)
    q.add_argument("--prompt", required=True, help="caption of the image, used for inversion and reconstruction")
    q.add_argument("--method", choices=("ddim", "nti"), default="ddim")
    _add_common(q, many_loras=False, nti_always=False)
    q.add_argument("--out", required=True, help="output folder")
    q.set_defaults(fn=cmd_invert)

    q = subparsers.add_parser(
        "edit", help="prompt-switch editing of a real image (null-text inversion, then source -> target prompt)",
        description="Null-text-invert an image under the source prompt (or reuse OUT/inversion.npz of "
                    "`invert --method nti`), then sample from x_T with its nulls: the first (1-r) of the steps "
                    "with the source prompt, the rest with the target. One PNG: input | reconstruction | one "
                    "column per ratio.")
    q.add_argument("--image", required=True)
    q.add_argument("--source-prompt", required=True)
    q.add_argument("--target-prompt", required=True)
    q.add_argument("--ratio", type=float, action="append",
                   help="fraction of the steps on the target prompt, in [0, 1]; repeat for several "
                        f"(default: {' '.join(f'{r:g}' for r in EDIT_RATIOS)})")
    q.add_argument("--inversion", default=None,
                   help="reuse an inversion.npz from `invert --method nti` (must match image, prompt, model, "
                        "LoRA, steps and guidance)")
    _add_common(q, many_loras=False, nti_always=True)
    q.add_argument("--out", required=True, help="PNG grid")
    q.set_defaults(fn=cmd_edit)

    q = subparsers.add_parser(
        "interpolate-images", help="interpolate between two real images (shared-null NTI, slerp of x_T)",
        description="The paper's Fig. 3: null-text inversion of both images with one shared null series, "
                    "slerp of the two inverted x_T, every frame sampled with the shared nulls. PNG: per model "
                    "a row input A | frames | input B; optionally a there-and-back GIF.")
    q.add_argument("--image", action="append", required=True, help="give twice: the two end images")
    q.add_argument("--prompt", required=True, help="caption of the first image (and of both without --prompt2)")
    q.add_argument("--prompt2", default=None, help="caption of the second image; text states are mixed linearly")
    q.add_argument("--frames", type=int, default=11, help="frames including both ends (default 11)")
    _add_common(q, many_loras=True, nti_always=True)
    q.add_argument("--out", required=True, help="PNG strip")
    q.add_argument("--gif", default=None, help="also write an animated GIF (there and back)")
    q.add_argument("--frame-ms", type=int, default=120)
    q.set_defaults(fn=cmd_interpolate_images)
