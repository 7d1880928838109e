"""LoRA <-> ``.safetensors`` in the three on-disk formats of DESIGN.md §3.

All three formats store PyTorch's layout: ``down``/``lora_A`` is (r, in) and ``up``/``lora_B`` is
(out, r). The in-memory tree (smooth_jax.lora) uses Flax's layout, ``P/down`` (in, r) and ``P/up``
(r, out), so export and import are a transpose plus a renaming of module paths:

==========  ==================================================================================
peft        ``unet.<torch module>.lora_A.weight`` / ``.lora_B.weight`` (diffusers' default)
legacy      ``<torch attention>.processor.to_q_lora.down.weight`` / ``.up.weight`` (authors' file)
kohya       ``lora_unet_<torch module, '.' -> '_'>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
==========  ==================================================================================

The scale of a LoRA is ``alpha / rank``. peft keeps alpha in diffusers' ``lora_adapter_metadata``,
kohya in per-module ``.alpha`` tensors, and legacy has no place for it (its loaders use scale 1),
so a legacy export folds the scale into ``up``. Every file also carries ``smooth_jax.*`` metadata,
which wins on import. No torch is needed: tensors go through ``safetensors.numpy``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors import numpy as st_numpy

from smooth_jax import __version__
from smooth_jax import lora as lora_lib
from smooth_jax.fileio import atomic_write
from smooth_jax.models import naming

FORMATS: tuple[str, ...] = ("peft", "legacy", "kohya")

# Our own metadata keys (all formats).
_META_RANK = "smooth_jax.rank"
_META_ALPHA = "smooth_jax.alpha"
_META_TARGETS = "smooth_jax.targets"
_META_BASE = "smooth_jax.base_model"
_META_FORMAT = "smooth_jax.format"
_META_VERSION = "smooth_jax.version"
# Set by a legacy export whose scale was multiplied into ``up``; the file's own alpha is the rank.
_META_FOLDED = "smooth_jax.folded_scale"
# What diffusers writes and reads (diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY).
_DIFFUSERS_META = "lora_adapter_metadata"
_DIFFUSERS_PREFIX = "unet."


@dataclasses.dataclass
class LoraFile:
    """A LoRA as read from or written to a file.

    lora: nested tree of numpy arrays, ``P/down`` (in, r) and ``P/up`` (r, out) per module path P.
    alpha: scale = alpha / rank.
    targets: regexes (fullmatched against module paths) the LoRA was made for.
    base_model: what it was trained on ("sd15", "tiny", a folder or hub id); "" if unknown.
    format: the format it was read from (None when built in memory).
    metadata: the raw safetensors metadata as read.
    """

    lora: dict
    alpha: float
    targets: tuple[str, ...] = lora_lib.DEFAULT_TARGETS
    base_model: str = ""
    format: str | None = None
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def rank(self) -> int:
        """The most common module rank (files may mix ranks); ties go to the smaller rank."""
        return _common_rank(lora_lib.module_ranks(self.lora))

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank


# ---------------------------------------------------------------------------------------------
# Export


def to_state_dict(lf: LoraFile, fmt: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``lf`` as (tensors, metadata) of format ``fmt``; tensor keys sorted.

    Every tensor is 2-D, (r, in) or (out, r), except kohya's ``.alpha`` scalars (shape ()).
    float32 and float16 are kept; other floats (bfloat16, float64) are written as float32.
    """
    _check_format(fmt)
    mods = _tree_modules(lf.lora)
    if not mods:
        raise ValueError("The LoRA has no modules; there is nothing to export.")
    ranks = {m: down.shape[1] for m, (down, _) in mods.items()}
    rank = _common_rank(ranks)
    writer = {"peft": _export_peft, "legacy": _export_legacy, "kohya": _export_kohya}[fmt]
    tensors, metadata, stored_alpha = writer(mods, ranks, rank, float(lf.alpha))
    metadata.update(
        {
            "format": "pt",  # safetensors' framework tag; diffusers writes it and drops it on read
            _META_RANK: str(rank),
            _META_ALPHA: repr(stored_alpha),
            _META_TARGETS: json.dumps(list(lf.targets)),
            _META_BASE: lf.base_model,
            _META_FORMAT: fmt,
            _META_VERSION: __version__,
        }
    )
    return dict(sorted(tensors.items())), metadata


def _export_peft(mods, ranks, rank, alpha):
    tensors = {}
    for module, (down, up) in mods.items():
        stem = f"{_DIFFUSERS_PREFIX}{naming.flax_to_torch(module)}"
        tensors[f"{stem}.lora_A.weight"] = np.ascontiguousarray(down.T)
        tensors[f"{stem}.lora_B.weight"] = np.ascontiguousarray(up.T)
    torch_ranks = {naming.flax_to_torch(m): r for m, r in ranks.items()}
    config = _peft_config(torch_ranks, rank, alpha)
    # Exactly diffusers' write_lora_layers: component-prefixed keys, JSON with indent 2, sorted.
    packed = {f"{_DIFFUSERS_PREFIX}{k}": v for k, v in config.items()}
    return tensors, {_DIFFUSERS_META: json.dumps(packed, indent=2, sort_keys=True)}, alpha


def _peft_config(torch_ranks: Mapping[str, int], rank: int, alpha: float) -> dict[str, Any]:
    """The ``peft.LoraConfig`` kwargs that diffusers passes on from the metadata.

    Only fields that every peft since 0.9 accepts: diffusers calls ``LoraConfig(**metadata)``, so a
    full ``to_dict()`` of a newer peft would be a TypeError under an older one. Modules whose rank
    differs from the common one get rank_pattern/alpha_pattern entries that keep our single scale
    (peft scales each module by its own alpha / r).
    """
    scale = alpha / rank
    rank_pattern = {name: r for name, r in sorted(torch_ranks.items()) if r != rank}
    return {
        "r": rank,
        "lora_alpha": _json_number(alpha),
        "target_modules": sorted(torch_ranks),
        "rank_pattern": rank_pattern,
        "alpha_pattern": {name: _json_number(scale * r) for name, r in rank_pattern.items()},
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "peft_type": "LORA",
        "task_type": None,
    }


_LEGACY_PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out_0": "to_out"}


def _export_legacy(mods, ranks, rank, alpha):
    scale = alpha / rank
    fold = alpha != rank
    tensors = {}
    for module, (down, up) in mods.items():
        attention, _, proj = module.rpartition("/")
        if proj not in _LEGACY_PROJ or not attention:
            raise ValueError(
                f"Module {module!r} cannot be written in the legacy attention-processor format, "
                "which only holds to_q/to_k/to_v/to_out_0 of attention layers. Use 'peft' or 'kohya'."
            )
        if fold:
            up = (up.astype(np.float32) * np.float32(scale)).astype(up.dtype)
        stem = f"{naming.flax_to_torch(attention)}.processor.{_LEGACY_PROJ[proj]}_lora"
        tensors[f"{stem}.down.weight"] = np.ascontiguousarray(down.T)
        tensors[f"{stem}.up.weight"] = np.ascontiguousarray(up.T)
    metadata = {_META_FOLDED: repr(scale)} if fold else {}
    # After folding, the file's weights are meant for scale 1, i.e. alpha == rank.
    return tensors, metadata, float(rank) if fold else alpha


def _export_kohya(mods, ranks, rank, alpha):
    scale = alpha / rank
    tensors = {}
    for module, (down, up) in mods.items():
        stem = "lora_unet_" + naming.flax_to_torch(module).replace(".", "_")
        tensors[f"{stem}.lora_down.weight"] = np.ascontiguousarray(down.T)
        tensors[f"{stem}.lora_up.weight"] = np.ascontiguousarray(up.T)
        # One alpha for all modules of the common rank; other ranks get the alpha of the same scale.
        module_alpha = alpha if ranks[module] == rank else scale * ranks[module]
        tensors[f"{stem}.alpha"] = np.asarray(module_alpha, np.float32)
    # sd-scripts' own keys, which A1111/ComfyUI UIs display.
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(_json_number(alpha)),
    }
    return tensors, metadata, alpha


def _tree_modules(tree) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Validated ``{module: (down (in, r), up (r, out))}`` as writable numpy arrays, sorted."""
    out = {}
    for module, (down, up) in sorted(lora_lib.modules(tree).items()):
        down, up = _writable(down, f"{module}/down"), _writable(up, f"{module}/up")
        if down.ndim != 2 or up.ndim != 2 or down.shape[1] != up.shape[0]:
            raise ValueError(
                f"LoRA module {module!r} has down {down.shape} and up {up.shape}; "
                "expected (in, r) and (r, out)."
            )
        out[module] = (down, up)
    return out


def _writable(x, where: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype in (np.float32, np.float16):
        return x
    # bfloat16 (kind 'V' under ml_dtypes) and float64: safetensors.numpy cannot write bfloat16,
    # and float32 holds it exactly.
    if x.dtype.kind == "f" or x.dtype.name == "bfloat16":
        return x.astype(np.float32)
    raise ValueError(f"LoRA leaf {where!r} has dtype {x.dtype}; expected a float array.")


def save(path: str | os.PathLike, lf: LoraFile, fmt: str = "peft") -> Path:
    """Write ``lf`` to ``path`` in format ``fmt``, atomically; creates parent folders.

    The file appears complete or not at all: an existing file at ``path`` is replaced only once the
    new one is fully written, and is left untouched on any error.
    """
    path = Path(path)
    tensors, metadata = to_state_dict(lf, fmt)
    atomic_write(path, st_numpy.save(tensors, metadata=metadata))
    return path


# ---------------------------------------------------------------------------------------------
# Import


def load(path: str | os.PathLike, module_names: Iterable[str] | None = None) -> LoraFile:
    """Read a LoRA file of any of the three formats.

    module_names: Flax module paths of the base model (``.../kernel`` paths are accepted too);
    only needed for kohya names that the built-in UNet grammar cannot resolve.
    Raises FileNotFoundError if ``path`` is missing, ValueError if it is not a valid
    safetensors file or not a UNet LoRA in a known format.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"LoRA file {str(path)!r} does not exist.")
    if path.is_dir():
        raise ValueError(
            f"LoRA path {str(path)!r} is a folder; pass the .safetensors file inside it "
            "(diffusers names it pytorch_lora_weights.safetensors)."
        )
    try:
        tensors, metadata = _read_safetensors(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{str(path)!r} is not a valid .safetensors file: {e}") from e
    return from_state_dict(tensors, metadata, source=str(path), module_names=module_names)


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    with safe_open(str(path), framework="numpy") as f:  # validates the file before we parse it
        metadata = dict(f.metadata() or {})
        header, data_start = _header(path)
        tensors = {}
        for name in f.keys():
            # safetensors.numpy has no bfloat16 (sd-scripts can save LoRAs in it); decode by hand.
            if header[name]["dtype"] == "BF16":
                tensors[name] = _read_bf16(path, header[name], data_start)
            else:
                tensors[name] = f.get_tensor(name)
    return tensors, metadata


def _header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header and the offset of the data buffer (format: u64 LE length, header, data)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


def _read_bf16(path: Path, info: Mapping[str, Any], data_start: int) -> np.ndarray:
    begin, end = info["data_offsets"]
    with open(path, "rb") as f:
        f.seek(data_start + begin)
        raw = np.frombuffer(f.read(end - begin), dtype="<u2")
    # bfloat16 is the top half of a float32: shifting the bits up is an exact conversion.
    return (raw.astype("<u4") << 16).view("<f4").astype(np.float32).reshape(info["shape"])


# Recognised key forms, per format. Groups: module (or attention + proj) and role.
_KEY_PATTERNS = {
    "peft": re.compile(
        r"^(?:unet\.)?(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<role>[AB])(?:\.default)?\.weight$"
    ),
    "legacy": re.compile(
        r"^(?:unet\.)?(?P<attention>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora"
        r"\.(?P<role>down|up)\.weight$"
    ),
    "kohya": re.compile(r"^lora_unet_(?P<module>.+)\.(?P<role>lora_down\.weight|lora_up\.weight|alpha)$"),
}
_TEXT_ENCODER_KEY = re.compile(r"^(?:lora_te\d*_|(?:unet\.)?text_encoder(?:_\d+)?\.)")
_ROLES = {"A": "down", "B": "up", "down": "down", "up": "up", "lora_down.weight": "down", "lora_up.weight": "up"}


def detect_format(keys: Iterable[str], source: str = "<memory>") -> str:
    """The format ("peft", "legacy" or "kohya") that all ``keys`` share.

    Raises ValueError naming ``source`` and the key for: no keys, a text-encoder key, a key of no
    known format, or keys of two formats.
    """
    found: dict[str, str] = {}  # format -> first key seen of it
    keys = sorted(keys)
    if not keys:
        raise ValueError(f"{source}: the file holds no tensors.")
    for key in keys:
        if _TEXT_ENCODER_KEY.match(key):
            raise ValueError(
                f"{source}: key {key!r} belongs to a text encoder; smooth-jax LoRAs are UNet-only. "
                "Remove the text-encoder tensors first."
            )
        fmt = next((f for f, pattern in _KEY_PATTERNS.items() if pattern.match(key)), None)
        if fmt is None:
            raise ValueError(
                f"{source}: key {key!r} is not a UNet LoRA tensor of any known format "
                f"({', '.join(FORMATS)})."
            )
        found.setdefault(fmt, key)
    if len(found) > 1:
        examples = "; ".join(f"{fmt}: {key!r}" for fmt, key in found.items())
        raise ValueError(f"{source}: the keys mix LoRA formats ({examples}).")
    return next(iter(found))


def from_state_dict(
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str] | None,
    source: str = "<memory>",
    module_names: Iterable[str] | None = None,
) -> LoraFile:
    """A LoraFile from safetensors (tensors, metadata) of any format; ``source`` names it in errors.

    Alpha comes from, in order: smooth_jax metadata, kohya ``.alpha`` tensors, diffusers'
    ``lora_adapter_metadata``, else alpha = rank (scale 1, what diffusers assumes without it).
    """
    metadata = dict(metadata or {})
    fmt = detect_format(tensors.keys(), source)
    resolve = _kohya_resolver(module_names, source) if fmt == "kohya" else None
    halves: dict[str, dict[str, tuple[str, np.ndarray]]] = collections.defaultdict(dict)
    alphas: dict[str, tuple[str, float]] = {}
    for key in sorted(tensors):
        module, role = _parse_key(fmt, key, resolve)
        value = np.asarray(tensors[key])
        if role == "alpha":
            alphas[module] = (key, _scalar(value, key, source))
            continue
        if role in halves[module]:
            raise ValueError(f"{source}: keys {halves[module][role][0]!r} and {key!r} are the same tensor.")
        halves[module][role] = (key, value)
    mods = _pair_modules(halves, alphas, source)
    ranks = {m: down.shape[1] for m, (down, _) in mods.items()}
    flat = {}
    for module, (down, up) in mods.items():
        flat[f"{module}/down"], flat[f"{module}/up"] = down, up
    return LoraFile(
        lora=lora_lib.unflatten(flat),
        alpha=_resolve_alpha(metadata, alphas, ranks, source),
        targets=_resolve_targets(metadata, ranks, source),
        base_model=metadata.get(_META_BASE, ""),
        format=fmt,
        metadata=metadata,
    )


def _parse_key(fmt: str, key: str, resolve) -> tuple[str, str]:
    """(Flax module path, role in {"down", "up", "alpha"}) of a key already matched to ``fmt``."""
    m = _KEY_PATTERNS[fmt].match(key)
    role = _ROLES.get(m["role"], m["role"])
    if fmt == "peft":
        return naming.torch_to_flax(m["module"]), role
    if fmt == "legacy":
        proj = "to_out_0" if m["proj"] == "to_out" else m["proj"]
        return f"{naming.torch_to_flax(m['attention'])}/{proj}", role
    return resolve(m["module"], key), role


def _scalar(value: np.ndarray, key: str, source: str) -> float:
    if value.size != 1:
        raise ValueError(f"{source}: {key!r} should be a scalar alpha but has shape {value.shape}.")
    return float(value.reshape(()).astype(np.float64))


def _pair_modules(halves, alphas, source) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Check every module has a 2-D down (r, in) and up (out, r) of one rank; to Flax layout."""
    for module, (key, _) in alphas.items():
        if module not in halves:
            raise ValueError(f"{source}: {key!r} is an alpha without lora_down/lora_up weights.")
    out = {}
    for module, parts in sorted(halves.items()):
        for role, other in (("down", "up"), ("up", "down")):
            if role not in parts:
                raise ValueError(f"{source}: {parts[other][0]!r} has no matching '{role}' tensor.")
        (down_key, down), (up_key, up) = parts["down"], parts["up"]
        for key, value in ((down_key, down), (up_key, up)):
            if value.ndim != 2:
                raise ValueError(
                    f"{source}: {key!r} has shape {value.shape}; only 2-D (Dense) LoRA weights are "
                    "supported (conv LoRAs are not)."
                )
        if down.shape[0] != up.shape[1]:
            raise ValueError(
                f"{source}: {down_key!r} has rank {down.shape[0]} but {up_key!r} has rank {up.shape[1]}."
            )
        out[module] = (np.ascontiguousarray(down.T), np.ascontiguousarray(up.T))
    return out


# --- alpha and targets


def _resolve_alpha(metadata, kohya_alphas, ranks, source) -> float:
    if _META_FOLDED in metadata:  # our legacy export multiplied the scale into ``up``
        return float(_common_rank(ranks))
    if _META_ALPHA in metadata:
        try:
            return float(metadata[_META_ALPHA])
        except ValueError:
            raise ValueError(f"{source}: metadata {_META_ALPHA}={metadata[_META_ALPHA]!r} is not a number.") from None
    if kohya_alphas:
        # kohya's convention: a module without an .alpha tensor has alpha = its rank.
        per_module = {m: kohya_alphas.get(m, (f"{m} (no .alpha)", float(r))) for m, r in ranks.items()}
        return _single_alpha(per_module, ranks, source)
    config = _diffusers_config(metadata, source)
    if config and "lora_alpha" in config:
        return _single_alpha(_peft_alphas(config, ranks), ranks, source)
    return float(_common_rank(ranks))


def _diffusers_config(metadata, source) -> dict[str, Any] | None:
    raw = metadata.get(_DIFFUSERS_META)
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: metadata {_DIFFUSERS_META!r} is not valid JSON: {e}") from None
    # Pipelines write component-prefixed keys ("unet.lora_alpha"); model.save_lora_adapter does not.
    if any(k.startswith(_DIFFUSERS_PREFIX) for k in config):
        config = {k[len(_DIFFUSERS_PREFIX) :]: v for k, v in config.items() if k.startswith(_DIFFUSERS_PREFIX)}
    return config


def _peft_alphas(config, ranks) -> dict[str, tuple[str, float]]:
    """Per-module alpha, as peft would apply it (alpha_pattern keys are suffix regexes)."""
    patterns = config.get("alpha_pattern") or {}
    out = {}
    for module, r in ranks.items():
        name = naming.flax_to_torch(module)
        key = next((k for k in patterns if re.match(rf"(.*\.)?({k})$", name)), None)
        alpha = float(patterns[key] if key is not None else config["lora_alpha"])
        if config.get("use_rslora"):
            alpha *= math.sqrt(r)  # rsLoRA scales by alpha / sqrt(r) = (alpha sqrt(r)) / r
        out[module] = (f"{_DIFFUSERS_META}[{name}]", alpha)
    return out


def _single_alpha(per_module: Mapping[str, tuple[str, float]], ranks, source) -> float:
    """The alpha of the common rank, after checking every module has the same alpha / rank."""
    rank = _common_rank(ranks)
    ref = next(m for m in sorted(ranks) if ranks[m] == rank)
    ref_key, ref_alpha = per_module[ref]
    for module, (key, alpha) in sorted(per_module.items()):
        if not math.isclose(alpha / ranks[module], ref_alpha / rank, rel_tol=1e-6):
            raise ValueError(
                f"{source}: modules have different LoRA scales: {key!r} has alpha {alpha:g} at rank "
                f"{ranks[module]}, {ref_key!r} has alpha {ref_alpha:g} at rank {rank}. "
                "smooth-jax supports one alpha / rank for all modules."
            )
    return ref_alpha


def _resolve_targets(metadata, ranks, source) -> tuple[str, ...]:
    if _META_TARGETS in metadata:
        try:
            targets = json.loads(metadata[_META_TARGETS])
        except json.JSONDecodeError:
            targets = None
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise ValueError(f"{source}: metadata {_META_TARGETS} is not a JSON list of strings.")
        return tuple(targets)
    # A foreign file: the default if it fits, otherwise exactly the modules it holds.
    default = [re.compile(t) for t in lora_lib.DEFAULT_TARGETS]
    if all(any(p.fullmatch(m) for p in default) for m in ranks):
        return lora_lib.DEFAULT_TARGETS
    return tuple(re.escape(m) for m in sorted(ranks))


# --- kohya module names

# One Flax path component of diffusers' UNet (2D condition models, SD 1.x/2.x/XL). Kohya names join
# these with '_', which is also inside the components, so a name is parsed, not split.
_UNET_COMPONENT = re.compile(
    "|".join(
        [
            r"(down|up)_blocks_\d+",
            r"mid_block",
            r"(attentions|resnets|transformer_blocks|net|to_out|(down|up)samplers|linear)_\d+",
            r"attn[12]",
            r"to_[qkv]",
            r"proj(_in|_out)?",
            r"ff",
            r"norm\d?",
            r"conv(\d|_shortcut|_in|_out|_norm_out)?",
            r"time_emb_proj",
            r"time_embedding",
            r"add_embedding",
        ]
    )
)
_LDM_PREFIXES = ("input_blocks_", "middle_block_", "output_blocks_")


def _kohya_resolver(module_names: Iterable[str] | None, source: str):
    """``resolve(name, key) -> Flax path`` for kohya names (the part after ``lora_unet_``)."""
    known: dict[str, str | None] = {}  # kohya name -> Flax path; None where two paths collide
    for path in module_names or ():
        path = path.removesuffix("/kernel")
        name = path.replace("/", "_")
        known[name] = path if known.get(name, path) == path else None

    def resolve(name: str, key: str) -> str:
        if name.startswith(_LDM_PREFIXES):
            raise ValueError(
                f"{source}: key {key!r} uses original-SD (ldm) block names (input_blocks/middle_block/"
                "output_blocks), which are not supported; convert it to diffusers names first."
            )
        if name in known:
            if known[name] is None:
                raise ValueError(f"{source}: key {key!r} matches more than one module of the base model.")
            return known[name]
        parses = _parse_unet_name(name)
        if len(parses) == 1:
            return parses[0]
        what = "is ambiguous" if parses else "cannot be parsed as a diffusers UNet module"
        hint = "" if module_names is not None else "; pass the base model so its module names can resolve it"
        raise ValueError(f"{source}: kohya key {key!r} {what}{hint}.")

    return resolve


def _parse_unet_name(name: str) -> list[str]:
    """Every way to read ``name`` as '_'-joined UNet path components, as '/'-joined Flax paths."""
    words = name.split("_")

    def parses(i: int) -> list[list[str]]:
        if i == len(words):
            return [[]]
        out = []
        for j in range(i + 1, len(words) + 1):
            component = "_".join(words[i:j])
            if _UNET_COMPONENT.fullmatch(component):
                out.extend([component, *rest] for rest in parses(j))
        return out

    return ["/".join(p) for p in parses(0)]


# ---------------------------------------------------------------------------------------------
# Conversion and checks


def convert(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    to: str,
    module_names: Iterable[str] | None = None,
) -> LoraFile:
    """Read a LoRA file of any format and write it as format ``to``; returns what was read."""
    _check_format(to)
    lf = load(in_path, module_names=module_names)
    save(out_path, lf, to)
    return lf


def check_against(lf: LoraFile, param_shapes, source: str = "LoRA") -> None:
    """Raise ValueError (naming ``source``) if ``lf`` does not fit the base model's params/shapes."""
    lora_lib.check_compatible(param_shapes, lf.lora, where=source)


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"Unknown LoRA format {fmt!r}; expected one of {', '.join(FORMATS)}.")


def _common_rank(ranks: Mapping[str, int]) -> int:
    if not ranks:
        raise ValueError("The LoRA has no modules.")
    counts = collections.Counter(ranks.values())
    return max(sorted(counts), key=counts.__getitem__)


def _json_number(x: float) -> int | float:
    """8.0 -> 8, as diffusers' configs have it; other values unchanged."""
    return int(x) if float(x).is_integer() else float(x)


# ---------------------------------------------------------------------------------------------
# smooth-jax's own single-file LoRA (Flax layout, msgpack): what `init-lora` and `import` write
# and what training reads as an init LoRA. The PyTorch formats above are for other tools.

NATIVE_SUFFIX = ".msgpack"


def save_native(path: str | os.PathLike, lf: LoraFile) -> Path:
    """Write ``lf`` as a Flax-layout msgpack file, atomically."""
    from flax import serialization

    path = Path(path)
    payload = {
        "lora": lora_lib.as_numpy(lf.lora),
        "alpha": float(lf.alpha),
        "targets": list(lf.targets),
        "base_model": lf.base_model,
        "version": __version__,
    }
    atomic_write(path, serialization.msgpack_serialize(payload))
    return path


def load_native(path: str | os.PathLike) -> LoraFile:
    """Read a file written by ``save_native``; errors name the path and the missing field."""
    from flax import serialization

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"LoRA file {str(path)!r} does not exist.")
    try:
        payload = serialization.msgpack_restore(path.read_bytes())
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ValueError(f"{str(path)!r} is not a smooth-jax LoRA (.msgpack) file: {e}") from None
    if not isinstance(payload, dict):
        raise ValueError(f"{str(path)!r} is not a smooth-jax LoRA (.msgpack) file.")
    for field in ("lora", "alpha", "targets"):
        if field not in payload:
            raise ValueError(f"{str(path)!r}: field {field!r} is missing; not a smooth-jax LoRA file.")
    lora_lib.modules(payload["lora"])  # validates the down/up pairing
    return LoraFile(
        lora=payload["lora"],
        alpha=float(payload["alpha"]),
        targets=tuple(payload["targets"]),
        base_model=str(payload.get("base_model", "")),
        format="native",
    )


def read_any(path: str | os.PathLike, module_names: Iterable[str] | None = None) -> LoraFile:
    """A smooth-jax ``.msgpack`` LoRA or a ``.safetensors`` LoRA in any of the three formats."""
    if Path(path).suffix == NATIVE_SUFFIX:
        return load_native(path)
    return load(path, module_names)
