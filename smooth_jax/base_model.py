"""A base text-to-image latent-diffusion model trained from scratch on the bundled digits.

Smooth Diffusion is a LoRA on top of a pretrained model. The embedded default (no download) has
no pretrained weights to start from, so smooth-jax trains one of the SD-1.5 architecture family
here, in two stages, and caches it as a diffusers-format folder:

1. the autoencoder (``AutoencoderKL``): reconstruction MSE + a small KL term, then the latent
   scaling factor is set to 1 / std of the latents (what SD's 0.18215 is for its VAE);
2. the UNet, every weight: epsilon-prediction MSE on posterior samples of the latents, with the
   caption dropped to the empty prompt ``p_uncond`` of the time (so classifier-free guidance
   works) and an EMA of the weights as the result.

The CLIP text encoder stays at its (seeded) random init: the ten prompts differ in one token, which
is all the UNet's cross-attention needs. The folder is keyed by a hash of the config, so a changed
config trains a new model and an unchanged one loads at once. ``load("digits")`` finds it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from smooth_jax import objective, runtime, sharding
from smooth_jax.models import presets
from smooth_jax.models.loading import COMPONENTS, StableDiffusion
from smooth_jax.models.schedule import NoiseSchedule

FORMAT_VERSION = 1  # bump when training code changes what a given config produces
PROVENANCE = "smooth_jax_base.json"


def default_config() -> ml_collections.ConfigDict:
    """The embedded default base model: 16 px digits, 4x8x8 latents, ~0.8M-param UNet."""
    c = ml_collections.ConfigDict()
    c.name = "digits"
    c.seed = 0
    c.resolution = 16
    c.arch = ml_collections.ConfigDict()
    # Overrides of the tiny preset (which has every SD-1.5 block type): a 2-level VAE (f = 2) and
    # an 8x8-latent UNet keep one training step near a quarter second at batch 64 on 2 CPU cores.
    c.arch.unet_channels = (32, 64)
    c.arch.unet_layers_per_block = 1
    c.arch.vae_channels = (32, 64)
    c.autoencoder = ml_collections.ConfigDict()
    c.autoencoder.steps = 200
    c.autoencoder.batch_size = 64
    c.autoencoder.lr = 2e-3
    c.autoencoder.kl_weight = 1e-4
    c.unet = ml_collections.ConfigDict()
    c.unet.steps = 1600
    c.unet.batch_size = 64
    c.unet.lr = 2e-3
    c.unet.warmup_steps = 100
    c.unet.ema_decay = 0.995
    c.unet.p_uncond = 0.1
    c.unet.grad_clip = 1.0
    return c


def architecture(cfg) -> dict:
    """Component configs (diffusers/transformers schema) of the base model described by ``cfg``."""
    configs = presets.preset("tiny")
    s = int(cfg.resolution)
    f = 2 ** (len(cfg.arch.vae_channels) - 1)
    if s % (f * 2 ** (len(cfg.arch.unet_channels) - 1)):
        raise ValueError(f"resolution={s} must be divisible by the VAE factor {f} times the UNet's downsampling.")
    configs["vae"].update(
        block_out_channels=list(cfg.arch.vae_channels),
        down_block_types=["DownEncoderBlock2D"] * len(cfg.arch.vae_channels),
        up_block_types=["UpDecoderBlock2D"] * len(cfg.arch.vae_channels),
        sample_size=s,
    )
    n = len(cfg.arch.unet_channels)
    configs["unet"].update(
        sample_size=s // f,
        block_out_channels=list(cfg.arch.unet_channels),
        layers_per_block=int(cfg.arch.unet_layers_per_block),
        down_block_types=["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1),
    )
    return configs


def config_key(cfg) -> str:
    """Short hash of everything that decides the trained weights."""
    blob = json.dumps({"v": FORMAT_VERSION, "config": cfg.to_dict()}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def cached_folder(cfg) -> Path:
    """Where the model of ``cfg`` lives: ``$SMOOTH_JAX_CACHE/models/<name>-<hash>``."""
    return runtime.cache_root() / "models" / f"{cfg.name}-{config_key(cfg)}"


def is_complete(folder: Path) -> bool:
    return (Path(folder) / PROVENANCE).is_file()


# --- data -----------------------------------------------------------------------------------


def digit_data(resolution: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All 1797 bundled digits as the training pipeline shows them: images [N,3,R,R] in [-1,1],
    labels [N], and the ten captions ("a handwritten digit zero" ...)."""
    from smooth_jax.data import sources, transforms

    src = sources.DigitsSource()
    images = np.stack([transforms.to_model_image(transforms.resize_shorter_side(im, resolution)) for im in src.images])
    captions = [f"a handwritten digit {name}" for name in sources.DIGIT_NAMES]
    return images, src.labels.astype(np.int32), captions


# --- stage 1: the autoencoder ---------------------------------------------------------------


def _batch_constraint(mesh):
    """Shard a batch over every device of ``mesh`` (data parallel; params stay replicated)."""
    if mesh is None:
        return lambda x: x
    spec = sharding.batch_sharding(mesh)
    return lambda x: jax.lax.with_sharding_constraint(x, spec)


def make_autoencoder_step(sd: StableDiffusion, cfg, mesh=None) -> tuple[optax.GradientTransformation, Callable]:
    """``step((params, opt), images [N,3,R,R], rng) -> ((params, opt), metrics)``: one Adam step on
    a random batch of ``cfg.autoencoder.batch_size`` images, split over ``mesh``'s devices."""
    tx = optax.adam(cfg.autoencoder.lr)
    bs, kl_weight = int(cfg.autoencoder.batch_size), float(cfg.autoencoder.kl_weight)
    shard = _batch_constraint(mesh)

    def loss_fn(params, x, rng):
        post = sd.vae.apply({"params": params}, x, method=sd.vae.encode).latent_dist
        z = post.sample(rng)
        rec = sd.vae.apply({"params": params}, z, method=sd.vae.decode).sample
        mse = jnp.mean((rec - x) ** 2)
        kl = jnp.mean(post.kl()) / np.prod(z.shape[1:])  # per latent element, like the MSE per pixel
        return mse + kl_weight * kl, {"mse": mse, "kl": kl}

    def step(carry, images, rng):
        params, opt = carry
        k_idx, k_z = jax.random.split(rng)
        x = shard(images[jax.random.randint(k_idx, (bs,), 0, images.shape[0])])
        (_, m), g = jax.value_and_grad(loss_fn, has_aux=True)(params, x, k_z)
        updates, opt = tx.update(g, opt, params)
        return (optax.apply_updates(params, updates), opt), m

    return tx, step


def latent_moments(sd: StableDiffusion, vae_params, images: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Unscaled posterior mean and std of every image: two arrays [N,4,h,w]."""
    @jax.jit
    def moments(x):
        post = sd.vae.apply({"params": vae_params}, x, method=sd.vae.encode).latent_dist
        return jnp.transpose(post.mean, (0, 3, 1, 2)), jnp.transpose(post.std, (0, 3, 1, 2))

    parts = [moments(jnp.asarray(images[i : i + chunk])) for i in range(0, len(images), chunk)]
    return np.concatenate([np.asarray(m) for m, _ in parts]), np.concatenate([np.asarray(s) for _, s in parts])


# --- stage 2: the UNet ----------------------------------------------------------------------


def unet_batch(data: dict, rng, batch_size: int, p_uncond: float, scaling: float, num_t: int):
    """One training batch drawn from ``data`` (see ``make_unet_step``): ``x0 [B,4,h,w]`` a scaled
    posterior sample of random images, ``ctx [B,L,D]`` their caption's embedding or, with
    probability ``p_uncond``, the empty prompt's, ``t [B]`` uniform, ``eps [B,4,h,w]``."""
    k_idx, k_z, k_t, k_eps, k_drop = jax.random.split(rng, 5)
    idx = jax.random.randint(k_idx, (batch_size,), 0, data["labels"].shape[0])
    mean, std = data["mean"][idx], data["std"][idx]
    x0 = (mean + std * jax.random.normal(k_z, mean.shape)) * scaling
    uncond = data["contexts"].shape[0] - 1
    which = jnp.where(jax.random.uniform(k_drop, (batch_size,)) < p_uncond, uncond, data["labels"][idx])
    t = jax.random.randint(k_t, (batch_size,), 0, num_t)
    return x0, data["contexts"][which], t, jax.random.normal(k_eps, x0.shape)


def make_unet_step(sd: StableDiffusion, cfg, mesh=None) -> tuple[optax.GradientTransformation, Callable]:
    """``step(state, data, rng) -> (state, metrics)``; state: dict of params, ema, opt, step.
    data: ``mean``/``std`` [N,4,h,w] unscaled posterior moments, ``labels`` [N], ``contexts``
    [K+1,L,D] (K captions, then the empty one)."""
    u = cfg.unet
    total = max(int(u.steps), int(u.warmup_steps) + 1)
    schedule = optax.warmup_cosine_decay_schedule(0.0, u.lr, int(u.warmup_steps), total, u.lr * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(u.grad_clip), optax.adamw(schedule, weight_decay=0.0))
    bs, p_uncond, decay = int(u.batch_size), float(u.p_uncond), float(u.ema_decay)
    abar_table = jnp.asarray(sd.schedule.alphas_cumprod, jnp.float32)
    num_t = sd.schedule.num_train_timesteps
    scaling = sd.latent_scaling
    shard = _batch_constraint(mesh)

    def loss_fn(params, x0, ctx, t, eps):
        x_t = objective.add_noise(x0, eps, abar_table[t])
        return objective.diffusion_mse(eps, sd.unet_apply(params, x_t, t, ctx))

    def step(state, data, rng):
        x0, ctx, t, eps = unet_batch(data, rng, bs, p_uncond, scaling, num_t)
        loss, g = jax.value_and_grad(loss_fn)(state["params"], *map(shard, (x0, ctx, t, eps)))
        updates, opt = tx.update(g, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema"], params)
        return dict(params=params, ema=ema, opt=opt, step=state["step"] + 1), {"loss": loss}

    return tx, step


# --- the whole build ------------------------------------------------------------------------


def _loop(step, carry, steps: int, seed: int, desc: str, progress: bool, args=(), log: Callable | None = None,
          mesh=None):
    """Run a jitted ``step(carry, *args, rng)`` ``steps`` times with a progress bar; returns
    (carry, mean of the last 10% of each logged metric)."""
    jstep = jax.jit(step, donate_argnums=0)
    if mesh is not None:
        # Committed, replicated inputs: otherwise step 2 (fed step 1's outputs) compiles again.
        carry, args = jax.device_put((carry, args), sharding.replicated(mesh))
    rng = jax.random.PRNGKey(seed)
    history: list[dict] = []
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
    for i in bar:
        carry, m = jstep(carry, *args, jax.random.fold_in(rng, i))
        if (i + 1) % 25 == 0 or i + 1 == steps:
            vals = {k: float(v) for k, v in m.items()}
            history.append(vals)
            bar.set_postfix({k: f"{v:.4g}" for k, v in vals.items()})
            if log is not None:
                log(i + 1, vals)
    tail = history[-max(1, len(history) // 10):]
    return carry, {k: float(np.mean([h[k] for h in tail])) for k in tail[0]}


def train(cfg, *, progress: bool = True, log: Callable | None = None) -> tuple[StableDiffusion, dict]:
    """Train the base model of ``cfg`` from scratch. Returns the model (params set) and a record of
    what was measured (losses, latent scale, seconds per stage). ``log(stage, step, metrics)``."""
    from smooth_jax.models.tokenizer import load_clip_tokenizer, tokenize

    t_start = time.time()
    configs = architecture(cfg)
    sd = StableDiffusion(configs=configs, tokenizer=load_clip_tokenizer(),
                         schedule=NoiseSchedule.from_config(configs["scheduler"]), source=cfg.name)
    images, labels, captions = digit_data(int(cfg.resolution))
    keys = jax.random.split(jax.random.PRNGKey(int(cfg.seed)), 6)
    fns = sd.init_fns()
    params = {name: jax.jit(fns[name])(k) for name, k in zip(COMPONENTS, keys[:3])}
    record: dict[str, Any] = {"num_images": int(len(images))}

    t0 = time.time()
    # Every device gets a slice of each batch: on CPU, N host devices run on N threads.
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    if int(cfg.autoencoder.batch_size) % mesh.size or int(cfg.unet.batch_size) % mesh.size:
        mesh = None
    tx, ae_step = make_autoencoder_step(sd, cfg, mesh)
    (vae, _), ae_final = _loop(
        ae_step, (params["vae"], tx.init(params["vae"])), int(cfg.autoencoder.steps), int(cfg.seed) + 1,
        "base model 1/2: autoencoder", progress, (jnp.asarray(images),),
        None if log is None else (lambda s, m: log("autoencoder", s, m)), mesh,
    )
    params["vae"] = vae
    mean, std = latent_moments(sd, vae, images)
    scale = float(1.0 / np.std(mean))
    sd.configs["vae"]["scaling_factor"] = scale
    rec = _reconstruction_mse(sd, vae, mean, images)
    record["autoencoder"] = {**ae_final, "reconstruction_mse": rec, "scaling_factor": scale, "seconds": time.time() - t0}

    t0 = time.time()
    ids = tokenize(sd.tokenizer, list(captions) + [""], max_length=sd.max_length)
    contexts = np.asarray(jax.jit(sd.encode_text)(params["text_encoder"], ids))
    data = {"mean": jnp.asarray(mean), "std": jnp.asarray(std), "labels": jnp.asarray(labels), "contexts": jnp.asarray(contexts)}
    tx, unet_step = make_unet_step(sd, cfg, mesh)
    p = params["unet"]
    state = dict(params=p, ema=jax.tree_util.tree_map(jnp.copy, p), opt=tx.init(p), step=jnp.zeros((), jnp.int32))
    state, unet_final = _loop(
        unet_step, state, int(cfg.unet.steps), int(cfg.seed) + 2, "base model 2/2: UNet", progress, (data,),
        None if log is None else (lambda s, m: log("unet", s, m)), mesh,
    )
    params["unet"] = state["ema"]
    record["unet"] = {**unet_final, "seconds": time.time() - t0}
    record["seconds"] = time.time() - t_start
    sd.params = jax.tree_util.tree_map(np.asarray, params)
    return sd, record


def _reconstruction_mse(sd, vae_params, mean: np.ndarray, images: np.ndarray) -> float:
    """MSE of decoding each image's posterior mean (unscaled, from ``latent_moments``)."""
    decode = jax.jit(sd.decode_latents)
    out = np.concatenate([np.asarray(decode(vae_params, jnp.asarray(mean[i : i + 256]) * sd.latent_scaling))
                          for i in range(0, len(mean), 256)])
    return float(np.mean((out - images) ** 2))


def save(sd: StableDiffusion, folder: str | os.PathLike, provenance: dict) -> Path:
    """Write ``sd`` as a diffusers-format folder: per component ``config.json`` and Flax msgpack
    weights (and PyTorch safetensors when torch is installed, so diffusers' PyTorch
    ``from_pretrained`` reads it too), ``scheduler/``, ``tokenizer/``, ``model_index.json``. The
    folder is built beside ``folder`` and renamed into place: it is complete or absent."""
    from flax import serialization

    from smooth_jax.models.tokenizer import clip_tokenizer_dir

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        os.chmod(tmp, 0o755)
        weights = {"unet": "diffusion_flax_model.msgpack", "vae": "diffusion_flax_model.msgpack", "text_encoder": "flax_model.msgpack"}
        for comp in COMPONENTS:
            (tmp / comp).mkdir()
            config = {k: v for k, v in sd.configs[comp].items()}
            (tmp / comp / "config.json").write_text(json.dumps(config, indent=2))
            (tmp / comp / weights[comp]).write_bytes(serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, sd.params[comp])))
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sd.configs["scheduler"], indent=2))
        shutil.copytree(clip_tokenizer_dir(), tmp / "tokenizer")
        (tmp / "model_index.json").write_text(json.dumps(_model_index(), indent=2))
        _write_torch_weights(sd, tmp)
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2, default=list))
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _model_index() -> dict:
    return {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _write_torch_weights(sd: StableDiffusion, folder: Path) -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        return  # the Flax weights are enough for smooth-jax; PyTorch tools need the [torch] extra
    from safetensors.torch import save_file

    from smooth_jax.models import torch_bridge

    modules = {
        "unet": (torch_bridge.torch_unet, "diffusion_pytorch_model.safetensors"),
        "vae": (torch_bridge.torch_vae, "diffusion_pytorch_model.safetensors"),
        "text_encoder": (torch_bridge.torch_text_encoder, "model.safetensors"),
    }
    for comp, (build, fname) in modules.items():
        module = build(sd, sd.params[comp])
        state = {k: v.contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(folder / comp / fname), metadata={"format": "pt"})


def build(cfg=None, *, progress: bool = True, log: Callable | None = None, force: bool = False) -> Path:
    """The cached base model of ``cfg`` (default: ``default_config()``): trained and saved on first
    use, reused afterwards. Returns its folder (load it with ``smooth_jax.models.load``)."""
    cfg = default_config() if cfg is None else cfg
    folder = cached_folder(cfg)
    if is_complete(folder) and not force:
        return folder
    sd, record = train(cfg, progress=progress, log=log)
    provenance = {"config": cfg.to_dict(), "config_key": config_key(cfg), "format_version": FORMAT_VERSION,
                  "trained": record, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    return save(sd, folder, provenance)


def read_provenance(folder: str | os.PathLike) -> dict:
    return json.loads((Path(folder) / PROVENANCE).read_text())


def with_overrides(cfg, overrides: dict) -> ml_collections.ConfigDict:
    """A copy of ``cfg`` with dotted-key overrides applied (tests shrink the step counts)."""
    out = copy.deepcopy(cfg)
    out.update_from_flattened_dict(overrides)
    return out
