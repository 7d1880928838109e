"""Smooth Diffusion training: the train state, the jitted sharded step, and the loop.

Reads top to bottom as the run does: config -> mesh -> model -> data -> state -> step ->
restore -> loop. ``make_train_step`` returns a pure ``train_step(state, frozen, batch) ->
(state, metrics)``; every config choice is settled when it is built, none inside the jit.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from pathlib import Path
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from smooth_jax import attention, export, lora, objective, sharding
from smooth_jax import remat as remat_lib

# --- state --------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. ``lora`` is the only trained tree; ``rng`` a raw uint32[2] key."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    lora: Any
    opt_state: Any
    ema_a: jax.Array  # float32 scalar: EMA of the regularizer's batch-mean norm
    rng: jax.Array


def learning_rate_schedule(train_cfg) -> Callable[[jax.Array], jax.Array]:
    """Constant (the paper) after an optional linear warm-up of ``warmup_steps``."""
    lr, warmup = float(train_cfg.lr), int(train_cfg.warmup_steps)
    if warmup <= 0:
        return optax.constant_schedule(lr)
    return lambda step: lr * jnp.minimum(1.0, (step + 1) / warmup)


def make_optimizer(train_cfg) -> optax.GradientTransformation:
    """Grad-norm clipping then AdamW (the authors' settings live in the config)."""
    return optax.chain(
        optax.clip_by_global_norm(float(train_cfg.grad_clip)),
        optax.adamw(
            learning_rate_schedule(train_cfg),
            b1=float(train_cfg.b1),
            b2=float(train_cfg.b2),
            eps=float(train_cfg.eps),
            weight_decay=float(train_cfg.weight_decay),
        ),
    )


def create_train_state(lora_tree: Any, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    lora_tree = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), lora_tree)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        lora=lora_tree,
        opt_state=tx.init(lora_tree),
        ema_a=jnp.zeros((), jnp.float32),  # the authors start a at 0
        rng=rng,
    )


# --- the step -----------------------------------------------------------------------------

REMAT_POLICIES = remat_lib.POLICIES  # applied per UNet block (smooth_jax/remat.py)


def _unet_fn(sd, remat: str, form: str, scale: float, attention_kind: str = "auto",
             query_chunk: int = attention.DEFAULT_QUERY_CHUNK):
    """``unet(base_params, lora_tree, x, t, ctx) -> eps`` with every UNet block under the ``remat``
    policy (``remat.use_block_remat``), each LoRA module merged into its kernel or run as its own
    low-rank path (``lora.factored``), as ``form`` says ("auto": whichever makes the LoRA gradient
    cheaper, per module; the function is the same either way), attention computed as
    ``attention_kind`` says (``attention.use_attention``)."""
    attention_kind = attention.resolve(attention_kind)
    remat_lib.check(remat)
    if form not in lora.TRAIN_FORMS:
        raise ValueError(f"lora.train_form={form!r}: choose one of {lora.TRAIN_FORMS}.")

    def fn(base, lora_tree, x, t, ctx):
        merged_part, factored_part = lora.split_forms(lora_tree, form)
        params = lora.merge(base, merged_part, scale) if merged_part else base
        with attention.use_attention(attention_kind, query_chunk), remat_lib.use_block_remat(remat):
            if not factored_part:
                return sd.unet_apply(params, x, t, ctx)
            with lora.factored(factored_part, scale):
                return sd.unet_apply(params, x, t, ctx)

    return fn


def make_micro_loss(sd, config: ml_collections.ConfigDict, *, regularize: bool) -> Callable:
    """``micro_loss(lora, frozen, micro, ema_a, rng) -> (loss, LossOut)`` for one micro-batch.

    micro: ``images [b,3,H,W]`` + ``input_ids [b,77]``, or cached ``latents [b,4,h,w]`` +
    ``context [b,77,D]``. rng draws t, eps, u and the VAE posterior sample.
    """
    scale = float(config.lora.alpha) / float(config.lora.rank)
    reg_weight = float(config.objective.reg_weight) * int(config.objective.reg_every)
    decay = float(config.objective.ema_decay)
    abar_table = jnp.asarray(sd.schedule.alphas_cumprod, jnp.float32)
    num_t = sd.schedule.num_train_timesteps
    unet = _unet_fn(sd, config.train.remat, config.lora.get("train_form", "auto"), scale,
                    config.train.get("attention", "auto"),
                    int(config.train.get("attention_chunk", attention.DEFAULT_QUERY_CHUNK)))
    if config.train.latents not in ("sample", "mean"):
        raise ValueError(f"train.latents={config.train.latents!r}: choose 'sample' or 'mean'.")
    sample_posterior = config.train.latents == "sample"

    def micro_loss(lora_tree, frozen, micro, ema_a, rng):
        k_t, k_eps, k_u, k_vae = jax.random.split(rng, 4)
        if "latents" in micro:
            x0, ctx = micro["latents"], micro["context"]
        else:
            x0 = sd.encode_images(frozen["vae"], micro["images"], k_vae if sample_posterior else None)
            ctx = sd.encode_text(frozen["text_encoder"], micro["input_ids"])
        x0, ctx = jax.lax.stop_gradient(x0.astype(jnp.float32)), jax.lax.stop_gradient(ctx)
        b = x0.shape[0]
        t = jax.random.randint(k_t, (b,), 0, num_t)
        abar = abar_table[t]
        eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
        eps_fn = lambda x_t: unet(frozen["unet"], lora_tree, x_t, t, ctx)  # noqa: E731
        if regularize:
            u = objective.sample_direction(k_u, x0.shape)
            out = objective.smooth_loss(eps_fn, x0, eps, abar, u, ema_a, reg_weight=reg_weight, ema_decay=decay)
        else:
            out = objective.plain_loss(eps_fn, x0, eps, abar, ema_a)
        return out.loss, out

    return micro_loss


def make_train_step(sd, config: ml_collections.ConfigDict, *, regularize: bool) -> Callable:
    """Build ``train_step(state, frozen, batch) -> (state, metrics)``.

    frozen: {"unet", "vae", "text_encoder"} base params (never differentiated).
    batch: leaves with a leading grad-accumulation axis A: ``images [A,b,3,H,W]`` and
    ``input_ids [A,b,77]``, or cached ``latents [A,b,4,h,w]`` and ``context [A,b,77,D]``.
    The A micro-batches run in a ``lax.scan`` with rngs ``fold_in(fold_in(state.rng, step), i)``;
    gradients are averaged, the EMA is updated after each micro-batch (as the authors do every
    micro-step). With lazy regularization every k steps, the penalty is weighed by lambda * k.
    """
    tx = make_optimizer(config.train)
    lr_at = learning_rate_schedule(config.train)
    micro_loss = make_micro_loss(sd, config, regularize=regularize)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(state: TrainState, frozen, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        accum = jax.tree_util.tree_leaves(batch)[0].shape[0]

        def body(carry, xs):
            grads, ema_a = carry
            micro, i = xs
            (_, out), g = grad_fn(state.lora, frozen, micro, ema_a, jax.random.fold_in(rng, i))
            grads = jax.tree_util.tree_map(jnp.add, grads, g)
            stats = {
                "loss/total": out.loss,
                "loss/base": out.mse,
                "loss/reg": out.penalty,
                "reg/norm_mean": jnp.mean(out.norms),
                "reg/norm_std": jnp.std(out.norms),
            }
            return (grads, out.ema_a), stats

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.lora)
        (grads, ema_a), stats = jax.lax.scan(body, (zeros, state.ema_a), (batch, jnp.arange(accum)))
        grads = jax.tree_util.tree_map(lambda g: g / accum, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.lora)
        new_lora = optax.apply_updates(state.lora, updates)
        metrics = {k: jnp.mean(v) for k, v in stats.items()}
        metrics.update({"reg/ema_a": ema_a, "grad_norm": optax.tree.norm(grads), "lr": lr_at(state.step)})
        new_state = state.replace(step=state.step + 1, lora=new_lora, opt_state=opt_state, ema_a=ema_a)
        return new_state, metrics

    return train_step


# --- building blocks of a run -------------------------------------------------------------

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _dtype(name: str, field: str):
    if name not in DTYPES:
        raise ValueError(f"{field}={name!r}: choose one of {sorted(DTYPES)}.")
    return DTYPES[name]


def load_model(config):
    """The SD model with compute dtype ``train.compute_dtype`` and params (fp32 as loaded)."""
    from smooth_jax.models import load

    return load(config.model, rng=jax.random.PRNGKey(config.seed), dtype=_dtype(config.train.compute_dtype, "train.compute_dtype"))


def frozen_params(sd, config, mesh):
    """Base weights cast to ``train.frozen_dtype`` and placed by the partition rules."""
    dtype = _dtype(config.train.frozen_dtype, "train.frozen_dtype")
    tree = {c: sd.params[c] for c in ("unet", "vae", "text_encoder")}
    tree = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
    shardings = sharding.param_shardings(tree, [tuple(r) for r in config.mesh.rules], mesh)
    return jax.device_put(tree, shardings), shardings


def initial_lora(sd, config) -> tuple[Any, str]:
    """(LoRA tree, where it came from): ``lora.init_from`` file if set, else a fresh init."""
    spec = lora.LoraSpec(rank=int(config.lora.rank), alpha=float(config.lora.alpha), targets=tuple(config.lora.targets))
    if config.lora.init_from:
        lf = export.read_any(config.lora.init_from)
        export.check_against(lf, sd.params["unet"], config.lora.init_from)
        if lf.rank != spec.rank or abs(lf.scale - spec.scale) > 1e-12:
            raise ValueError(
                f"lora.init_from={config.lora.init_from!r} has rank {lf.rank}, scale {lf.scale:g}; the config "
                f"asks for rank {spec.rank}, scale {spec.scale:g}. Set lora.rank/lora.alpha to match."
            )
        return lf.lora, f"init LoRA {config.lora.init_from}"
    init = jax.jit(lambda k: lora.init(k, sd.params["unet"], spec))
    return init(jax.random.PRNGKey(config.seed + 1)), "fresh LoRA"


def _local_batch_to_global(local: dict, accum: int, mesh) -> dict:
    """Per-host [b_local, ...] -> global [A, B/A, ...] split over data x fsdp on dim 1."""
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        if v.shape[0] % accum:
            raise ValueError(f"per-host batch {v.shape[0]} is not divisible by train.grad_accum={accum}.")
        out[k] = v.reshape((accum, v.shape[0] // accum) + v.shape[1:])
    return sharding.global_batch(out, mesh, leading=1)


class _Preemption:
    """SIGTERM (what TPU and SLURM send before preemption) -> save and stop after this step.

    With several processes the stop must come at the same step on all of them (the save and every
    step are collectives), yet SIGTERM reaches each host at its own time, or only some hosts. There
    jax's preemption service takes the signal instead: it tells every process, and orbax's
    ``reached_preemption(step)`` turns true at one agreed step everywhere. So this handler is only
    installed in a single process; a Python handler would replace the service's.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        from jax._src import distributed

        if jax.process_count() > 1 and distributed.global_state.preemption_sync_manager is not None:
            return self
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


@dataclasses.dataclass
class RunResult:
    step: int
    history: list[dict]  # per-step metrics (host floats), in order, for the steps this call ran
    workdir: Path
    stopped_early: bool = False


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path, *, resume: bool = False,
                       stop_after: int | None = None, progress: bool = True) -> RunResult:
    """Run (or continue) training in ``workdir``.

    Resume order: the workdir's own latest checkpoint, then ``lora.init_from``, then fresh.
    ``resume=True`` makes a missing checkpoint an error. ``stop_after`` ends the call after that
    many steps (as a preemption would), saving a checkpoint first.
    """
    # SIGTERM is caught from the start: a preemption during compilation must not kill the run
    # without a trace; it stops the run after its first step, with a checkpoint.
    with _Preemption() as preempt:
        return _run(config, Path(workdir), preempt, resume=resume, stop_after=stop_after, progress=progress)


def _run(config, workdir: Path, preempt: "_Preemption", *, resume: bool, stop_after: int | None,
         progress: bool) -> RunResult:
    from smooth_jax import checkpoint as ckpt_lib
    from smooth_jax import data as data_lib
    from smooth_jax import train_log

    is_main = jax.process_index() == 0
    # --- mesh
    mesh = sharding.make_mesh(dict(config.mesh.shape), num_devices=int(config.mesh.num_devices))
    replicated = sharding.replicated(mesh)
    n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    accum, batch_size = int(config.train.grad_accum), int(config.train.batch_size)
    if batch_size % accum or (batch_size // accum) % n_batch_shards:
        raise ValueError(f"train.batch_size={batch_size} must split into grad_accum={accum} micro-batches "
                         f"that divide over {n_batch_shards} devices.")
    # --- model
    sd = load_model(config)
    sharding.sync_hosts("model loaded")  # the placement below is the first cross-process collective
    frozen, frozen_sh = frozen_params(sd, config, mesh)
    # --- data
    data_iter = _make_data_iterator(config, sd, data_lib)
    # --- state
    lora_tree, lora_source = initial_lora(sd, config)
    tx = make_optimizer(config.train)
    rng = jax.random.PRNGKey(config.seed + 2)
    init_state = lambda tree, key: create_train_state(tree, tx, key)  # noqa: E731
    state_sh = jax.tree_util.tree_map(lambda _: replicated, jax.eval_shape(init_state, lora_tree, rng))
    state = sharding.SyncedFirstCall(jax.jit(init_state, out_shardings=state_sh), "init state")(lora_tree, rng)
    # --- steps
    batch_sh = sharding.batch_sharding(mesh, leading=1)
    jit_step = lambda fn, name: sharding.SyncedFirstCall(  # noqa: E731
        jax.jit(fn, in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, replicated),
                donate_argnums=0), name)
    reg_every = int(config.objective.reg_every)
    regularized = float(config.objective.reg_weight) > 0 and reg_every > 0
    reg_step = jit_step(make_train_step(sd, config, regularize=True), "regularized step") if regularized else None
    plain_step = jit_step(make_train_step(sd, config, regularize=False), "plain step")
    # --- restore
    ckpt = ckpt_lib.Checkpointer(workdir, keep=int(config.checkpoint.keep), async_save=bool(config.checkpoint.async_save))
    latest = ckpt.latest_step()
    log = train_log.RunLog(workdir, config, enabled=is_main)
    if latest is not None:
        restored = ckpt.restore(latest, state, data_iter)
        ema = restored["ema"]
        state = state.replace(lora=restored["lora"], opt_state=restored["opt_state"], ema_a=ema["a"], step=ema["step"], rng=ema["rng"])
        log.message(f"Resuming from {ckpt.directory / str(latest)} at step {latest} of {config.train.steps}.")
    elif resume:
        raise FileNotFoundError(f"--resume: no checkpoint in {ckpt.directory}.")
    else:
        log.message(f"Starting from a {lora_source} ({lora.count(lora_tree):,} LoRA params) in {workdir}.")
    config_json = json.loads(config.to_json_best_effort())
    # --- loop
    start = int(state.step)
    total = int(config.train.steps)
    end = total if stop_after is None else min(total, start + int(stop_after))
    history: list[dict] = []
    pending = None
    stopped_early = False
    sampler = (train_log.SampleWriter(sd, config, workdir, mesh, save=is_main)
               if int(config.log.sample_every) > 0 else None)
    with log.progress(start, total, enabled=progress and is_main) as bar:
        for step in range(start, end):
            batch = _local_batch_to_global(next(data_iter), accum, mesh)
            use_reg = regularized and step % reg_every == 0
            state, metrics = (reg_step if use_reg else plain_step)(state, frozen, batch)
            if pending is not None:  # fetch the previous step's metrics: the device is busy with this one
                history.append(log.write(*pending, bar=bar))
            pending = (step, metrics)
            done = step + 1
            if sampler is not None and done % int(config.log.sample_every) == 0:
                sampler.write(done, state.lora, frozen, log)
            stop = preempt.requested or ckpt.manager.reached_preemption(done)
            if done % int(config.checkpoint.every) == 0 or done == end or stop:
                ckpt.save(done, state, data_iter, config_json, force=True)
            if stop:
                log.message(f"SIGTERM: saved a checkpoint at step {done} and stopped; rerun the same command to resume.")
                stopped_early = True
                break
        if pending is not None:
            history.append(log.write(*pending, bar=bar))
    ckpt.close()
    final_step = int(state.step)
    if final_step >= total and is_main:
        paths = _export_final(state, config, workdir)
        log.message("Exported the final LoRA: " + ", ".join(str(p) for p in paths))
    log.close()
    return RunResult(step=final_step, history=history, workdir=workdir, stopped_early=stopped_early or final_step < total)


def _make_data_iterator(config, sd, data_lib):
    """Per-host sharded iterator; with data.host_slicing, every host reads the global batch and
    keeps its slice, so any process layout sees the same global batches (exact cross-topology
    reproducibility, at the price of reading everything on every host)."""
    batch_size = int(config.train.batch_size)
    if config.data.host_slicing:
        it = data_lib.make_train_iterator(config.data, sd.tokenizer, global_batch_size=batch_size, seed=config.seed,
                                          process_index=0, process_count=1)
        return _HostSlice(it, jax.process_index(), jax.process_count())
    return data_lib.make_train_iterator(config.data, sd.tokenizer, global_batch_size=batch_size, seed=config.seed)


class _HostSlice:
    """Keeps this host's contiguous slice of each global batch; checkpointable like the inner iterator."""

    def __init__(self, inner, index: int, count: int):
        self.inner, self.index, self.count = inner, index, count

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.inner)
        n = next(iter(batch.values())).shape[0] // self.count
        return {k: v[self.index * n:(self.index + 1) * n] for k, v in batch.items()}

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)

    def start_prefetch(self):
        self.inner.start_prefetch()


def build_cache(config, out: str | Path, batch_size: int = 16) -> int:
    """Encode the configured dataset once (VAE posterior mean x scaling, text-encoder states) into a
    cache folder that ``data.cache_dir`` then trains from. Crops are centred: a cache freezes them."""
    from smooth_jax import data as data_lib

    sd = load_model(config)
    data_cfg = ml_collections.ConfigDict(config.data.to_dict())
    data_cfg.center_crop = True
    data_cfg.cache_dir = ""
    encode = jax.jit(lambda vae, text, images, ids: (sd.encode_images(vae, images), sd.encode_text(text, ids)))

    def encode_fn(images, input_ids):
        return encode(sd.params["vae"], sd.params["text_encoder"], images, input_ids)

    batches = data_lib.make_single_pass_iterator(data_cfg, sd.tokenizer, batch_size=batch_size, seed=config.seed)
    return data_lib.cache_encodings(batches, encode_fn, out)


def _export_final(state: TrainState, config, workdir: Path) -> list[Path]:
    tree = jax.tree_util.tree_map(np.asarray, jax.device_get(state.lora))
    lf = export.LoraFile(lora=tree, alpha=float(config.lora.alpha), targets=tuple(config.lora.targets), base_model=str(config.model))
    paths = [export.save_native(workdir / "lora_final.msgpack", lf)]
    for fmt in config.export.formats:
        paths.append(export.save(workdir / f"lora_final_{fmt}.safetensors", lf, fmt))
    return paths


def timed_steps(step_fn, state, frozen, batch, n: int) -> tuple[Any, float]:
    """Run ``n`` steps after one warm-up call; returns (state, seconds per step). For benchmarks."""
    state, m = step_fn(state, frozen, batch)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(n):
        state, m = step_fn(state, frozen, batch)
    jax.block_until_ready(m)
    return state, (time.perf_counter() - t0) / n
