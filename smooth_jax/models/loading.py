"""Stable Diffusion components in Flax: build from configs, init, and load weights.

Sources, in the order ``load`` tries them:
- a preset name (``tiny``: random init; ``sd15``: architecture only, no weights),
- a local diffusers-format folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
  ``scheduler/``) holding PyTorch ``.safetensors``/``.bin`` or Flax ``.msgpack`` weights,
- a hub id, downloaded where the network allows it.

This module is the only place that touches diffusers' and transformers' Flax classes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from smooth_jax.models import convert, presets
from smooth_jax.models.schedule import NoiseSchedule

COMPONENTS = ("unet", "vae", "text_encoder")
DEFAULT_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


class ModelLoadError(ValueError):
    """A model source that cannot be loaded; the message says what to pass instead."""


# Config values of the PyTorch classes that diffusers' Flax port cannot represent. Loading such a
# model would silently compute something else, so it is an error naming the key.
_UNET_FIXED = {
    "norm_num_groups": 32,
    "act_fn": "silu",
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "class_embed_type": None,
    "encoder_hid_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "resnet_time_scale_shift": "default",
    "norm_eps": 1e-5,
    "dual_cross_attention": False,
    "mid_block_only_cross_attention": None,
}


def _check_fixed(config: dict, fixed: dict, where: str) -> None:
    for key, expected in fixed.items():
        if key in config and config[key] != expected:
            raise ModelLoadError(
                f"{where}: {key}={config[key]!r} is not supported by the Flax UNet (it needs {expected!r})."
            )


def _dataclass_kwargs(cls, config: dict) -> dict:
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "dtype"}
    out = {}
    for key, value in config.items():
        if key in fields:
            out[key] = tuple(value) if isinstance(value, list) else value
    return out


@dataclasses.dataclass
class StableDiffusion:
    """The Flax modules of one SD-1.x model, their configs and (optionally) their params.

    params: ``{"unet": ..., "vae": ..., "text_encoder": ...}`` or None (architecture only).
    Latents are NCHW ``[B, 4, H/f, W/f]`` everywhere, f = ``vae_scale_factor``; images NCHW in [-1, 1].
    """

    configs: dict
    tokenizer: Any
    schedule: NoiseSchedule
    params: dict | None = None
    source: str = ""
    dtype: Any = jnp.float32

    def __post_init__(self):
        from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel
        from transformers import CLIPTextConfig
        from transformers.models.clip.modeling_flax_clip import FlaxCLIPTextModule

        _check_fixed(self.configs["unet"], _UNET_FIXED, f"{self.source} unet config")
        self.unet = FlaxUNet2DConditionModel(
            **_dataclass_kwargs(FlaxUNet2DConditionModel, self.configs["unet"]), dtype=self.dtype
        )
        self.vae = FlaxAutoencoderKL(**_dataclass_kwargs(FlaxAutoencoderKL, self.configs["vae"]), dtype=self.dtype)
        te_config = {k: v for k, v in self.configs["text_encoder"].items() if not k.startswith("_")}
        self.text_config = CLIPTextConfig(**te_config)
        self.text_encoder = FlaxCLIPTextModule(self.text_config, dtype=self.dtype)

    # --- shapes -----------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.configs["vae"]["block_out_channels"]) - 1)

    @property
    def latent_scaling(self) -> float:
        return float(self.configs["vae"].get("scaling_factor", 0.18215))

    @property
    def latent_channels(self) -> int:
        return int(self.configs["unet"]["in_channels"])

    @property
    def context_dim(self) -> int:
        return int(self.configs["unet"]["cross_attention_dim"])

    @property
    def max_length(self) -> int:
        return int(self.configs["text_encoder"]["max_position_embeddings"])

    def default_image_size(self) -> int:
        return int(self.configs["unet"]["sample_size"]) * self.vae_scale_factor

    # --- init -------------------------------------------------------------------------------
    def init_fns(self) -> dict[str, Callable[[jax.Array], Any]]:
        """Per-component ``rng -> params``. Shapes are the smallest legal ones: params don't depend on them."""
        s = self.configs["unet"]["sample_size"]
        f = self.vae_scale_factor

        def unet_init(rng):
            x = jnp.zeros((1, self.latent_channels, s, s), jnp.float32)
            ctx = jnp.zeros((1, 1, self.context_dim), jnp.float32)
            return self.unet.init({"params": rng}, x, jnp.zeros((1,), jnp.int32), ctx)["params"]

        def vae_init(rng):
            img = jnp.zeros((1, 3, 2 * f, 2 * f), jnp.float32)
            r1, r2 = jax.random.split(rng)
            return self.vae.init({"params": r1, "gaussian": r2}, img)["params"]

        def text_init(rng):
            ids = jnp.zeros((1, self.max_length), jnp.int32)
            pos = jnp.arange(self.max_length)[None]
            return self.text_encoder.init({"params": rng}, ids, jnp.ones_like(ids), pos)["params"]

        return {"unet": unet_init, "vae": vae_init, "text_encoder": text_init}

    def param_shapes(self) -> dict:
        """``{"unet", "vae", "text_encoder"}`` trees of ShapeDtypeStructs, with no FLOPs spent."""
        rng = jax.random.PRNGKey(0)
        return {name: jax.eval_shape(fn, rng) for name, fn in self.init_fns().items()}

    def init_params(self, rng: jax.Array) -> dict:
        """Random params for every component; each init is jitted (2 s vs 40 s eager for tiny)."""
        keys = jax.random.split(rng, len(COMPONENTS))
        fns = self.init_fns()
        return {name: jax.jit(fns[name])(k) for name, k in zip(COMPONENTS, keys)}

    # --- apply ------------------------------------------------------------------------------
    def unet_apply(self, unet_params, latents, timesteps, context, train: bool = False, rngs=None):
        """latents: [B,C,h,w]; timesteps: [B] int or float; context: [B,L,D] -> eps: [B,C,h,w]."""
        return self.unet.apply(
            {"params": unet_params}, latents, jnp.asarray(timesteps), context, train=train, rngs=rngs
        ).sample

    def encode_text(self, text_params, input_ids):
        """input_ids: [B,L] int32 -> last hidden state [B,L,D] (SD's conditioning, no attention mask)."""
        ids = jnp.asarray(input_ids, jnp.int32)
        pos = jnp.broadcast_to(jnp.arange(ids.shape[-1]), ids.shape)
        out = self.text_encoder.apply({"params": text_params}, ids, jnp.ones_like(ids), pos, deterministic=True)
        return out.last_hidden_state

    def encode_images(self, vae_params, images, rng: jax.Array | None = None):
        """images: [B,3,H,W] in [-1,1] -> scaled latents [B,4,H/f,W/f]: the posterior mean, or a
        posterior sample when ``rng`` is given (as diffusers' training scripts encode)."""
        posterior = self.vae.apply({"params": vae_params}, images, method=self.vae.encode).latent_dist
        z = posterior.mean if rng is None else posterior.sample(rng)
        return jnp.transpose(z, (0, 3, 1, 2)) * self.latent_scaling

    def decode_latents(self, vae_params, latents):
        """latents: [B,4,h,w] (scaled) -> images [B,3,h*f,w*f], roughly in [-1,1]."""
        # Pass NHWC explicitly: diffusers' decode guesses the layout from the last dim's size.
        z = jnp.transpose(latents / self.latent_scaling, (0, 2, 3, 1))
        return self.vae.apply({"params": vae_params}, z, method=self.vae.decode).sample


# --- sources ------------------------------------------------------------------------------


def from_preset(name: str, *, rng: jax.Array | None = None, dtype=jnp.float32, tokenizer=None) -> StableDiffusion:
    """Preset architecture; random params if ``rng`` is given, else architecture only."""
    from smooth_jax.models import tokenizer as tok

    configs = presets.preset(name)
    sd = StableDiffusion(
        configs=configs,
        tokenizer=tokenizer if tokenizer is not None else tok.load_clip_tokenizer(),
        schedule=NoiseSchedule.from_config(configs["scheduler"], f"preset {name}"),
        source=name,
        dtype=dtype,
    )
    if rng is not None:
        sd.params = sd.init_params(rng)
    return sd


_FLAX_WEIGHTS = ("diffusion_flax_model.msgpack", "flax_model.msgpack")
_ST_WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors")
_BIN_WEIGHTS = ("diffusion_pytorch_model.bin", "pytorch_model.bin")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is missing: not a diffusers-format Stable Diffusion folder.") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None


def _read_torch_weights(folder: Path) -> tuple[dict[str, np.ndarray], Path] | None:
    from safetensors.numpy import load_file

    for name in _ST_WEIGHTS:
        if (folder / name).exists():
            return _safe_load(load_file, folder / name), folder / name
    for index in sorted(folder.glob("*.safetensors.index.json")):
        shards = sorted(set(_read_json(index)["weight_map"].values()))
        state: dict[str, np.ndarray] = {}
        for shard in shards:
            state.update(_safe_load(load_file, folder / shard))
        return state, index
    for name in _BIN_WEIGHTS:
        if (folder / name).exists():
            try:
                import torch
            except ImportError:
                raise ModelLoadError(
                    f"{folder / name} is a pickled PyTorch file and torch is not installed: "
                    "install the [torch] extra, or convert the folder to .safetensors."
                ) from None
            state = torch.load(folder / name, map_location="cpu", weights_only=True)
            # numpy has no bfloat16: widen it; every other dtype converts as is.
            return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()}, folder / name
    return None


def _safe_load(load_file, path: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise ModelLoadError(f"{path} is not a readable safetensors file: {e}") from None


def _load_component(folder: Path, shapes: Any, name: str) -> Any:
    """Params of one component from ``folder``: Flax msgpack as is, PyTorch weights converted."""
    from flax import serialization

    for fname in _FLAX_WEIGHTS:
        path = folder / fname
        if path.exists():
            params = serialization.msgpack_restore(path.read_bytes())
            params = params.get("params", params) if isinstance(params, dict) else params
            flat_t = {k: v.shape for k, v in _flatten(shapes).items()}
            flat_p = {k: np.shape(v) for k, v in _flatten(params).items()}
            if flat_t != flat_p:
                diff = sorted(set(flat_t.items()) ^ set(flat_p.items()))[:5]
                raise ModelLoadError(f"{path}: params do not match the {name} config; first differences: {diff}")
            return params
    found = _read_torch_weights(folder)
    if found is None:
        raise ModelLoadError(
            f"{folder}: no weights found (looked for {', '.join(_FLAX_WEIGHTS + _ST_WEIGHTS + _BIN_WEIGHTS)})."
        )
    state, path = found
    renames = convert.VAE_RENAMES if name == "vae" else ()
    return convert.torch_to_flax(state, shapes, renames=renames, source=str(path))


def _flatten(tree):
    from smooth_jax.lora import flatten

    return flatten(tree)


def from_folder(folder: str | Path, *, dtype=jnp.float32, load_params: bool = True) -> StableDiffusion:
    """A diffusers-format SD-1.x folder (as ``StableDiffusionPipeline.save_pretrained`` writes)."""
    from smooth_jax.models import tokenizer as tok

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(
            f"{folder} is not a folder. Pass a diffusers-format model folder (with unet/, vae/, "
            "text_encoder/, tokenizer/, scheduler/); single-file .ckpt/.safetensors checkpoints are not supported."
        )
    configs = {c: _read_json(folder / c / "config.json") for c in COMPONENTS}
    sched_path = folder / "scheduler" / "scheduler_config.json"
    configs["scheduler"] = _read_json(sched_path) if sched_path.exists() else presets.SCHEDULER
    tokenizer = tok.load_clip_tokenizer(folder / "tokenizer") if (folder / "tokenizer").is_dir() else tok.load_clip_tokenizer()
    sd = StableDiffusion(
        configs=configs,
        tokenizer=tokenizer,
        schedule=NoiseSchedule.from_config(configs["scheduler"], str(sched_path)),
        source=str(folder),
        dtype=dtype,
    )
    if load_params:
        shapes = sd.param_shapes()
        sd.params = {c: _load_component(folder / c, shapes[c], c) for c in COMPONENTS}
    return sd


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def from_hub(repo_id: str, *, revision: str | None = None, dtype=jnp.float32, load_params: bool = True) -> StableDiffusion:
    """Download the diffusers-format files of ``repo_id`` (needs network) and load them.
    With ``load_params=False`` only configs and tokenizer are fetched."""
    from huggingface_hub import snapshot_download

    patterns = [
        "model_index.json",
        "*/config.json",
        "scheduler/scheduler_config.json",
        "tokenizer/*",
    ]
    if load_params:
        patterns += ["*/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"]
    try:
        local = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except Exception as e:  # the hub raises many kinds: offline, gated, not found
        raise ModelLoadError(
            f"Could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Without network, pass a local diffusers-format folder: --model /path/to/stable-diffusion-v1-5 "
            "(e.g. one saved by StableDiffusionPipeline.save_pretrained), or --model tiny for the embedded model."
        ) from None
    return from_folder(local, dtype=dtype, load_params=load_params)


EMBEDDED = "digits"


def _embedded_folder() -> Path:
    """The cached embedded default (``base_model.default_config()``), or an error saying how to
    build it (it is trained here, not downloaded)."""
    from smooth_jax import base_model

    folder = base_model.cached_folder(base_model.default_config())
    if not base_model.is_complete(folder):
        raise ModelLoadError(
            f"The '{EMBEDDED}' model is trained by smooth-jax on first use and is not cached yet ({folder}). "
            "Build it with `smooth-jax pretrain` (or `smooth-jax demo`, which does so first): about 8 minutes "
            "on 2 CPU cores, no download."
        )
    return folder


def load(source: str, *, rng: jax.Array | None = None, dtype=jnp.float32) -> StableDiffusion:
    """Load ``source``: a preset name, a local diffusers folder, or a hub id (see module docstring).

    ``tiny`` gets random params from ``rng`` (default seed 0). ``sd15`` has no weights here: it is an
    error to ask for its params; use ``from_preset('sd15')`` for shapes only. ``digits`` is the
    cached embedded default that ``smooth-jax pretrain`` trains.
    """
    if source == EMBEDDED:
        return from_folder(_embedded_folder(), dtype=dtype)
    if source in presets.PRESETS:
        if source == "sd15":
            raise ModelLoadError(
                "The 'sd15' preset is the SD-1.5 architecture without weights (for shapes and planning). "
                "For the real model pass a local diffusers-format folder (--model /path/to/stable-diffusion-v1-5) "
                f"or, with network, a hub id (--model {DEFAULT_HUB_ID})."
            )
        return from_preset(source, rng=jax.random.PRNGKey(0) if rng is None else rng, dtype=dtype)
    path = Path(source).expanduser()
    if path.exists():
        return from_folder(path, dtype=dtype)
    if _HUB_ID.match(source):
        return from_hub(source, dtype=dtype)
    raise ModelLoadError(
        f"Model source {source!r} is neither a preset ({', '.join(sorted(presets.PRESETS))}), "
        "an existing diffusers-format folder, nor a hub id of the form owner/name."
    )


def load_architecture(source: str, *, dtype=jnp.float32) -> StableDiffusion:
    """Like ``load`` but without params: configs, tokenizer and schedule only (no weights read or
    downloaded). Any preset works here, ``sd15`` included."""
    if source == EMBEDDED:
        from smooth_jax import base_model

        folder = base_model.cached_folder(base_model.default_config())
        if base_model.is_complete(folder):
            return from_folder(folder, dtype=dtype, load_params=False)
        configs = base_model.architecture(base_model.default_config())
        from smooth_jax.models import tokenizer as tok

        return StableDiffusion(configs=configs, tokenizer=tok.load_clip_tokenizer(),
                               schedule=NoiseSchedule.from_config(configs["scheduler"]), source=EMBEDDED, dtype=dtype)
    if source in presets.PRESETS:
        return from_preset(source, dtype=dtype)
    path = Path(source).expanduser()
    if path.exists():
        return from_folder(path, dtype=dtype, load_params=False)
    if _HUB_ID.match(source):
        return from_hub(source, dtype=dtype, load_params=False)
    raise ModelLoadError(f"Model source {source!r} is neither a preset, an existing folder, nor a hub id.")


@functools.lru_cache(maxsize=None)
def preset_param_shapes(name: str) -> dict:
    """Param shapes of a preset's components (cached: used for counting and validation)."""
    configs = presets.preset(name)
    schedule = NoiseSchedule.from_config(configs["scheduler"])
    return StableDiffusion(configs=configs, tokenizer=None, schedule=schedule, source=name).param_shapes()
