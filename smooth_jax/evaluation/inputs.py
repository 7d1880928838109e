"""What an evaluation run reads: the model and its LoRAs, prompts, images, metric networks.

Shared by the istd / reconstruct / edit runs, with the command-line options that name them.
Every model of a run is the same base model (``--model``) with or without one LoRA, so the
text encoder and VAE are shared and only the UNet params differ per model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from smooth_jax.evaluation.report import NAME_RE
from smooth_jax.fileio import file_sha256, source_id

BASE = "base"
RESERVED = ("vae-only",)  # row names the runs use themselves


# --- models -----------------------------------------------------------------------------------


def load_model(source: str):
    """The base model (preset, diffusers folder or hub id). Tests replace this function."""
    from smooth_jax.models import load

    return load(source)


def parse_loras(loras: Sequence[str] | None, base: bool = True) -> list[dict]:
    """``--lora`` values (``NAME=PATH`` or ``PATH``, name = file stem) -> the run's model list:
    ``[{"name": "base", "lora": None, "sha256": None}, {"name", "lora": abs path, "sha256"}, ...]``.

    Names must be unique and file-name safe; the LoRA files must exist (their hash goes into the
    run config, so a changed file is not silently resumed).
    """
    models = [{"name": BASE, "lora": None, "sha256": None}] if base else []
    for arg in loras or []:
        name, path = None, arg
        if not Path(arg).exists() and "=" in arg:
            name, path = arg.split("=", 1)
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"--lora {arg}: no such file {str(p)!r}.")
        name = name or p.stem
        if not NAME_RE.match(name):
            raise ValueError(f"--lora {arg}: model name {name!r} must be letters, digits, '.', '_' or '-' "
                             "(it names files); pass NAME=PATH.")
        models.append({"name": name, "lora": str(p.resolve()), "sha256": file_sha256(p)})
    names = [m["name"] for m in models]
    if not models:
        raise ValueError("nothing to evaluate: --no-base needs at least one --lora.")
    dup = sorted({n for n in names if names.count(n) > 1} | {n for n in names if n in RESERVED})
    if dup:
        raise ValueError(f"model names must be unique and not {RESERVED}: {dup}. Name them with --lora NAME=PATH.")
    return models


def load_loras(sd, models: Sequence[dict]) -> list[tuple[str, Any]]:
    """``[(name, LoraFile | None)]``: each LoRA file in any format, checked against the UNet."""
    from smooth_jax.generation import load_lora_file

    return [(m["name"], None if m["lora"] is None else load_lora_file(m["lora"], sd.params["unet"])) for m in models]


# --- prompts ----------------------------------------------------------------------------------


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line; '#' starts a comment line).")
    return prompts


def dataset_captions(spec: dict, n: int) -> list[str]:
    """The captions of the first ``n`` good records of a data source (``data_spec``)."""
    source = _source(spec)
    out = []
    for i in range(len(source)):
        rec = source[i]
        if rec is not None:
            out.append(rec["caption"])
            if len(out) == n:
                break
    return out


# --- images -----------------------------------------------------------------------------------


def data_spec(source: str, path: str = "", tfds_name: str = "", split: str = "train", image_key: str = "image",
              caption_key: str = "caption") -> dict:
    """A data source as stored in a run config (folders as absolute paths)."""
    if source not in ("digits", "folder", "tfds"):
        raise ValueError(f"--data must be digits, folder or tfds, got {source!r}.")
    if source == "folder" and not path:
        raise ValueError("--data folder needs --data-path (a folder with metadata.jsonl).")
    if source == "tfds" and not (tfds_name or path):
        raise ValueError("--data tfds needs --tfds-name (and --data-path for its data_dir) or --data-path "
                         "(a prepared dataset's version folder).")
    spec = {"source": source, "path": str(Path(path).expanduser().resolve()) if path else ""}
    if source == "tfds":
        spec.update(tfds_name=tfds_name, split=split, image_key=image_key)
    if source in ("folder", "tfds"):
        spec["caption_key"] = caption_key
    return spec


def _source(spec: dict):
    from smooth_jax.data import default_data_config, make_source

    c = default_data_config()
    c.source, c.path = spec["source"], spec.get("path", "")
    c.tfds_name, c.split = spec.get("tfds_name", ""), spec.get("split", "train")
    c.image_key, c.caption_key = spec.get("image_key", "image"), spec.get("caption_key", "caption")
    c.on_bad = "skip"
    return make_source(c)


def model_image(image_uint8: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> float32 ``[3, S, S]`` in [-1, 1]: the data pipeline's resize of the
    shorter side (PIL bilinear) and center crop, at the model's resolution."""
    from smooth_jax.data import transforms

    img = transforms.resize_shorter_side(image_uint8, resolution)
    top, left = transforms.center_crop_offsets(img.shape[0], img.shape[1], resolution)
    return transforms.to_model_image(transforms.crop(img, top, left, resolution))


def iter_images(spec: dict, resolution: int, n: int) -> Iterator[dict]:
    """The first ``n`` good records of a data source as ``{"item", "path", "caption", "image"}``,
    image float32 ``[3, S, S]`` in [-1, 1] (bad records are skipped and logged, as in training)."""
    source = _source(spec)
    item = 0
    for i in range(len(source)):
        if item == n:
            return
        rec = source[i]
        if rec is None:
            continue
        image = model_image(rec["image"], resolution)
        yield {"item": item, "path": rec["path"], "caption": rec["caption"], "image": image}
        item += 1


def read_edits(path: str | Path) -> list[dict]:
    """``--edits`` JSONL: one ``{"image" | "file_name": path, "source": prompt, "target": prompt}``
    per line; relative image paths are relative to the file's folder."""
    path = Path(path)
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg}).") from None
        image = obj.get("image", obj.get("file_name"))
        if not isinstance(image, str) or not all(isinstance(obj.get(k), str) for k in ("source", "target")):
            raise ValueError(f"{path}:{lineno}: need string fields image (or file_name), source and target.")
        out.append({"path": str((path.parent / image).resolve()), "source": obj["source"], "target": obj["target"]})
    if not out:
        raise ValueError(f"{path}: no edits.")
    return out


def iter_edit_images(edits: Sequence[dict], resolution: int, n: int) -> Iterator[dict]:
    """The first ``n`` entries of ``read_edits`` with their images loaded as ``iter_images``."""
    from smooth_jax.data.sources import decode_image

    for item, e in enumerate(edits[:n]):
        yield {"item": item, "path": e["path"], "caption": e["source"], "target": e["target"],
               "image": model_image(decode_image(e["path"], e["path"]), resolution)}


# --- metric networks --------------------------------------------------------------------------


@dataclasses.dataclass
class MetricNets:
    """The metric networks a run was given. ``fid``: column label -> feature extractor.
    ``skipped``: metric -> why it is not reported (no weights given)."""

    clip: Any = None
    lpips: Any = None
    digits: Any = None  # a metrics.digits.DigitJudge (digit accuracy + FD_digits)
    fid: dict = dataclasses.field(default_factory=dict)
    skipped: dict = dataclasses.field(default_factory=dict)


CLIP_HINT = "a local Hugging Face CLIP folder, e.g. openai/clip-vit-large-patch14"
LPIPS_HINT = "torchvision's alexnet-owt-7be5be79.pth and the lpips package's weights/v0.1/alex.pth"
FID_HINT = ("--fid-inception (pytorch-fid's pt_inception-2015-12-05-6726825d.pth) or --fid-clip "
            "(a Hugging Face CLIP folder, for FID_CLIP)")


def load_metric_nets(config: dict, want: Sequence[str]) -> MetricNets:
    """Load the networks the config names, for the metrics in ``want`` ("clip", "lpips", "fid").

    A metric whose weights were not given is skipped (named in ``skipped`` with the option that
    enables it); a path that was given but does not exist raises ``MissingWeightsError`` now,
    before any work.
    """
    from smooth_jax import metrics

    nets = MetricNets()
    m = config["metrics"]
    if "clip" in want:
        if m.get("clip"):
            nets.clip = metrics.CLIPScorer.from_pretrained(m["clip"])
        else:
            nets.skipped["CLIP score"] = f"no --clip given ({CLIP_HINT})"
    if "lpips" in want:
        if m.get("lpips_backbone") and m.get("lpips_heads"):
            nets.lpips = metrics.LPIPS.from_paths(m["lpips_backbone"], m["lpips_heads"], m.get("lpips_net", "alex"))
        elif m.get("lpips_backbone") or m.get("lpips_heads"):
            raise ValueError("LPIPS needs both --lpips-backbone and --lpips-heads.")
        else:
            nets.skipped["LPIPS"] = f"no --lpips-backbone/--lpips-heads given ({LPIPS_HINT})"
    if "fid" in want:
        if m.get("fid_inception"):
            nets.fid["FID"] = metrics.InceptionV3Features.from_path(m["fid_inception"])
        if m.get("fid_clip"):
            nets.fid["FID_CLIP"] = metrics.CLIPImageFeatures.from_pretrained(m["fid_clip"])
        if m.get("digits"):
            from smooth_jax.metrics.digits import DigitJudge

            nets.digits = DigitJudge.fit()
            nets.fid["FD_digits"] = nets.digits
        if not nets.fid:
            nets.skipped["FID"] = f"no {FID_HINT} given"
    return nets


def metric_options(args, want: Sequence[str]) -> dict:
    """The metric-weight options of ``args`` for the metrics in ``want``, as config fields."""
    out: dict = {}
    if "clip" in want:
        out["clip"] = args.clip
    if "lpips" in want:
        out.update(lpips_backbone=args.lpips_backbone, lpips_heads=args.lpips_heads, lpips_net=args.lpips_net)
    if "fid" in want:
        out.update(fid_inception=args.fid_inception, fid_clip=args.fid_clip, digits=bool(args.digits))
    return out


def resolve_metric_options(options: dict) -> dict:
    """Weight paths made absolute (the network choice ``lpips_net`` is kept as is)."""
    return {k: (str(Path(v).expanduser().resolve()) if isinstance(v, str) and v and k != "lpips_net" else v)
            for k, v in options.items()}


# --- command-line options ---------------------------------------------------------------------


def add_common_args(p: argparse.ArgumentParser, *, guidance_help: str = "classifier-free guidance scale") -> None:
    p.add_argument("--model", default="tiny", help="base model: preset (tiny), diffusers folder or hub id")
    p.add_argument("--lora", action="append", metavar="[NAME=]PATH",
                   help="a LoRA in any format (peft, legacy, kohya, .msgpack); repeat to compare several in one "
                        "run. The row is named NAME, or the file's stem")
    p.add_argument("--no-base", action="store_true", help="leave out the base model (needs --lora)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50, the paper's)")
    p.add_argument("--guidance", type=float, default=7.5, help=f"{guidance_help} (default 7.5, the paper's)")
    p.add_argument("--out", required=True, help="output folder; rerunning the same command there resumes")
    p.add_argument("--grids", type=int, default=4, help="draw grids (and keep arrays) for this many items (default 4)")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after N new (model, item) results; rerun the same command to continue")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_data_args(p: argparse.ArgumentParser, prefix: str = "", what: str = "images") -> None:
    """``--{prefix}data digits|folder|tfds`` and its options."""
    p.add_argument(f"--{prefix}data", choices=("digits", "folder", "tfds"), default=None if prefix else "digits",
                   help=f"where the {what} come from (default: {'none' if prefix else 'digits'}); "
                        "center-cropped at the model's resolution")
    p.add_argument(f"--{prefix}data-path", default="", help="folder with metadata.jsonl, or the TFDS data_dir")
    p.add_argument(f"--{prefix}tfds-name", default="", help="TFDS dataset name, e.g. coco_captions")
    p.add_argument(f"--{prefix}split", default="train", help="TFDS split (slicing allowed)")
    p.add_argument(f"--{prefix}image-key", default="image", help="TFDS image feature")
    p.add_argument(f"--{prefix}caption-key", default="caption",
                   help="caption field (TFDS: nested with '/', e.g. captions/text)")


def data_spec_from_args(args, prefix: str = "") -> dict | None:
    a = prefix.replace("-", "_")
    source = getattr(args, f"{a}data")
    if source is None:
        return None
    return data_spec(source, getattr(args, f"{a}data_path"), getattr(args, f"{a}tfds_name"), getattr(args, f"{a}split"),
                     getattr(args, f"{a}image_key"), getattr(args, f"{a}caption_key"))


def add_clip_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clip", default=None, help=f"CLIP score with this model: {CLIP_HINT}")


def add_lpips_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lpips-backbone", default=None,
                   help="LPIPS backbone weights (torchvision alexnet-owt-7be5be79.pth or vgg16-397923af.pth)")
    p.add_argument("--lpips-heads", default=None, help="LPIPS lin heads (lpips' weights/v0.1/alex.pth or vgg.pth)")
    p.add_argument("--lpips-net", choices=("alex", "vgg"), default="alex")


def common_config(args) -> dict:
    """The config fields every run has, from parsed options (resolved later by ``resolve_models``)."""
    return {
        "model": args.model,
        "loras": list(args.lora or []),
        "base": not args.no_base,
        "steps": int(args.steps),
        "guidance": float(args.guidance),
        "grids": int(args.grids),
    }


def resolve_common(config: dict) -> dict:
    """The stored form of ``common_config``'s fields: model source made absolute, LoRAs named,
    resolved and hashed."""
    return {
        "model": source_id(config["model"]),
        "models": parse_loras(config["loras"], base=config["base"]),
        "steps": int(config["steps"]),
        "guidance": float(config["guidance"]),
        "grids": int(config["grids"]),
    }


def blocks(records: Iterator[dict], size: int) -> Iterator[list[dict]]:
    """Consecutive lists of ``size`` records (the last may be shorter): blocks aligned to item
    indices 0, size, 2 size, ..., the same in a resumed run as in an uninterrupted one."""
    block: list[dict] = []
    for rec in records:
        block.append(rec)
        if len(block) == size:
            yield block
            block = []
    if block:
        yield block


def items_done(done, model: str, wanted: int) -> int:
    """How many items 0, 1, ... the data gave (``model``'s results in ``done``); warns when the
    data ran out of good records before ``wanted``."""
    n = len({i for (m, i) in done if m == model})
    if n < wanted:
        print(f"warning: asked for {wanted} images, the data gave {n} good ones; the results cover those {n}.")
    if n == 0:
        raise ValueError("the data gave no usable images.")
    return n


def padded(values: Sequence, size: int) -> list:
    """``values`` padded to ``size`` by repeating the last: every block runs at one compiled shape."""
    return list(values) + [values[-1]] * (size - len(values))
