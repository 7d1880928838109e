"""``smooth-jax demo``: the embedded default, end to end, with no download.

Until training lands this is the LoRA round trip on the tiny model: a LoRA on the Flax UNet is
written in the three PyTorch formats, read back, and (with the ``torch`` extra) loaded into
diffusers' PyTorch UNet, whose output is compared with ours. Every step is a check; the command
fails if one does not hold. Results go to ``OUT/report.md``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from smooth_jax import export, lora
from smooth_jax.models import load
from smooth_jax.models.tokenizer import tokenize


def _unet_inputs(sd, batch: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    s = sd.configs["unet"]["sample_size"]
    latents = rng.standard_normal((batch, sd.latent_channels, s, s)).astype(np.float32)
    t = np.linspace(50, 950, batch).astype(np.int32)
    ids = tokenize(sd.tokenizer, ["a handwritten digit seven"] * batch, max_length=sd.max_length)
    ctx = np.array(jax.jit(sd.encode_text)(sd.params["text_encoder"], ids))
    return latents, t, ctx


def run(out: Path, model: str = "tiny", rank: int = 8, torch_check: bool = True) -> int:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows: list[tuple[str, str, bool]] = []
    steps = ["load model", "init LoRA", "export + re-import", "PyTorch check", "report"]
    bar = tqdm(steps, desc="demo", unit="step")

    bar.set_postfix_str("load model")
    sd = load(model)
    inputs = _unet_inputs(sd)
    apply = jax.jit(sd.unet_apply)
    base_out = np.asarray(apply(sd.params["unet"], *inputs))
    bar.update()

    bar.set_postfix_str("init LoRA")
    spec = lora.LoraSpec(rank=rank, alpha=float(rank))
    fresh = lora.init(jax.random.PRNGKey(0), sd.params["unet"], spec)
    # A fresh LoRA (up = 0) is the identity; a random non-zero one makes every check bite.
    tree = lora.as_numpy(lora.random_like(jax.random.PRNGKey(1), fresh, std=0.05))
    lf = export.LoraFile(lora=tree, alpha=spec.alpha, base_model=model)
    lora_out = np.asarray(apply(lora.merge(sd.params["unet"], tree, spec.scale), *inputs))
    n_mod, n_par = len(lora.modules(tree)), lora.count(tree)
    rows.append(("LoRA", f"{n_mod} modules, rank {rank}, {n_par:,} params; changes UNet output by "
                         f"{np.abs(lora_out - base_out).max():.3g}", bool(np.abs(lora_out - base_out).max() > 0)))
    bar.update()

    bar.set_postfix_str("export")
    export.save_native(out / "lora.msgpack", lf)
    for fmt in export.FORMATS:
        path = export.save(out / f"lora_{fmt}.safetensors", lf, fmt)
        back = export.read_any(path)
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(back.lora)))
        rows.append((f"{fmt} round trip", f"{path.name}: detected as {back.format}, bit-exact={same}",
                     same and back.format == fmt and back.alpha == lf.alpha))
    export.convert(out / "lora_legacy.safetensors", out / "lora_legacy_to_peft.safetensors", "peft")
    back = export.read_any(out / "lora_legacy_to_peft.safetensors")
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(back.lora)))
    rows.append(("convert legacy -> peft", f"bit-exact={same}", same))
    bar.update()

    bar.set_postfix_str("PyTorch check")
    if torch_check:
        rows.append(_torch_check(sd, out, inputs, base_out, lora_out))
    else:
        rows.append(("diffusers PyTorch", "skipped (--no-torch)", True))
    bar.update()

    bar.set_postfix_str("report")
    ok = all(r[2] for r in rows)
    lines = [f"# smooth-jax demo ({model})", "", "| check | result | ok |", "|---|---|---|"]
    lines += [f"| {name} | {detail} | {'yes' if good else 'NO'} |" for name, detail, good in rows]
    lines += ["", f"Took {time.time() - t0:.0f} s. Files: " + ", ".join(sorted(p.name for p in out.iterdir() if p.is_file()))]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps({"model": model, "ok": ok, "checks": rows}, indent=2))
    bar.update()
    bar.close()
    print("\n".join(lines))
    print(f"\n{'all checks passed' if ok else 'SOME CHECKS FAILED'}; report in {out / 'report.md'}")
    return 0 if ok else 1


def _torch_check(sd, out: Path, inputs, base_out, lora_out) -> tuple[str, str, bool]:
    """Load the peft file into diffusers' PyTorch pipeline built from the same weights."""
    try:
        import torch

        from smooth_jax.models import torch_bridge
    except ImportError:
        return ("diffusers PyTorch", "skipped: torch not installed (pip install -e .[torch])", True)
    pipe = torch_bridge.torch_pipeline(sd)
    pipe.load_lora_weights(str(out), weight_name="lora_peft.safetensors")
    latents, t, ctx = inputs
    with torch.no_grad():
        theirs = pipe.unet(torch.from_numpy(latents), torch.from_numpy(t).long(), torch.from_numpy(ctx)).sample.numpy()
    rel = float(np.abs(theirs - lora_out).max() / np.abs(lora_out).max())
    effect = float(np.abs(lora_out - base_out).max() / np.abs(lora_out).max())
    # diffusers' Flax GEGLU uses tanh-approximate GELU, PyTorch exact GELU (DESIGN.md §4): ~1e-4.
    return ("diffusers PyTorch load_lora_weights",
            f"max abs diff torch vs jax, relative to output scale: {rel:.2e} (LoRA effect {effect:.2e}; GELU approximation gap ~1e-4)",
            rel < 2e-3 and rel < effect / 10)
