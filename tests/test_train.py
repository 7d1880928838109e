"""The train step and loop: optimizer, accumulation, remat, bf16, lazy regularization, meshes,
checkpoints and exact resumption. Numbers are checked against independent computations
(a hand-written AdamW, per-micro-batch gradients, a 1-device run)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smooth_jax import config_loader, export, lora, train
from smooth_jax.models.tokenizer import tokenize

ROOT = Path(__file__).resolve().parent.parent


def tiny_config(**fields):
    """configs/tiny.py shrunk for tests: batch 4, a few steps, no sample grids."""
    c = config_loader.load_config(ROOT / "configs" / "tiny.py")
    c.train.steps = 4
    c.train.batch_size = 4
    c.checkpoint.every = 2
    c.log.sample_every = 0
    c.log.every = 1
    c.export.formats = ("peft",)
    c.mesh.num_devices = 1  # the session has 8 CPU devices (conftest); meshes are tested on purpose below
    overrides = [f"--config.{k}={v}" for k, v in fields.items()]
    return config_loader.apply_overrides(c, overrides)


def _batch(sd, accum=2, b=2, seed=0):
    r = np.random.default_rng(seed)
    images = r.uniform(-1, 1, (accum, b, 3, 32, 32)).astype(np.float32)
    ids = tokenize(sd.tokenizer, ["a handwritten digit seven"] * (accum * b)).reshape(accum, b, -1)
    return {"images": jnp.asarray(images), "input_ids": jnp.asarray(ids)}


def _frozen(sd):
    return {c: sd.params[c] for c in ("unet", "vae", "text_encoder")}


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_step_is_adamw_of_averaged_microbatch_gradients(tiny_sd):
    """One regularized step with 2 accumulated micro-batches, against: the micro-batch gradients
    taken one by one (EMA threaded by hand), averaged, clipped and run through AdamW in numpy.

    Adam's first step is ~lr * g / (|g| + eps): for elements with |g| near eps it amplifies float32
    rounding of g (which differs between the scan and the one-by-one path) into a visible share
    of a step. eps = 1e-5 (a real config option) keeps every element well away from that regime."""
    c = tiny_config(**{"train.grad_accum": 2, "train.lr": 0.01, "train.weight_decay": 0.1, "train.b1": 0.8,
                       "train.b2": 0.95, "train.grad_clip": 1e-3, "train.eps": 1e-5,
                       "train.latents": "mean"})
    spec = lora.LoraSpec(rank=c.lora.rank, alpha=c.lora.alpha)
    tree = lora.random_like(jax.random.PRNGKey(5), lora.init(jax.random.PRNGKey(4), tiny_sd.params["unet"], spec), 0.05)
    state = train.create_train_state(tree, train.make_optimizer(c.train), jax.random.PRNGKey(9))
    state = state.replace(ema_a=jnp.asarray(0.3, jnp.float32))
    batch, frozen = _batch(tiny_sd), _frozen(tiny_sd)
    step = jax.jit(train.make_train_step(tiny_sd, c, regularize=True))
    new_state, metrics = step(state, frozen, batch)

    micro = jax.jit(jax.value_and_grad(train.make_micro_loss(tiny_sd, c, regularize=True), has_aux=True))
    rng = jax.random.fold_in(state.rng, 0)
    a, grads = state.ema_a, []
    for i in range(2):
        (_, out), g = micro(tree, frozen, {k: v[i] for k, v in batch.items()}, a, jax.random.fold_in(rng, i))
        a = out.ema_a
        grads.append(_leaves(g))
    g = [(x + y) / 2 for x, y in zip(*grads)]
    norm = np.sqrt(sum(np.sum(x.astype(np.float64) ** 2) for x in g))
    assert norm > 1e-3  # clipping is active
    g = [x * (1e-3 / norm) for x in g]
    expected = []
    for p, gi in zip(_leaves(tree), g):
        m, v = (1 - 0.8) * gi, (1 - 0.95) * gi**2
        m_hat, v_hat = m / (1 - 0.8), v / (1 - 0.95)
        expected.append(p - 0.01 * (m_hat / (np.sqrt(v_hat) + 1e-5) + 0.1 * p))
    for got, want in zip(_leaves(new_state.lora), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)  # 2e-4 of one lr step
    np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-5)
    np.testing.assert_allclose(float(new_state.ema_a), float(a), rtol=1e-6)
    assert int(new_state.step) == 1 and all(x.dtype == np.float32 for x in _leaves(new_state.lora))


def test_remat_policies_do_not_change_the_numbers(tiny_sd):
    c = tiny_config(**{"train.latents": "mean"})
    spec = lora.LoraSpec(rank=c.lora.rank, alpha=c.lora.alpha)
    tree = lora.random_like(jax.random.PRNGKey(5), lora.init(jax.random.PRNGKey(4), tiny_sd.params["unet"], spec), 0.05)
    micro = {k: v[0] for k, v in _batch(tiny_sd).items()}
    results = {}
    for policy in ("none", "full", "dots"):
        c.train.remat = policy
        f = jax.jit(jax.value_and_grad(train.make_micro_loss(tiny_sd, c, regularize=True), has_aux=True))
        (loss, _), g = f(tree, _frozen(tiny_sd), micro, 0.0, jax.random.PRNGKey(0))
        results[policy] = (float(loss), _leaves(g))
    for policy in ("full", "dots"):
        np.testing.assert_allclose(results[policy][0], results["none"][0], rtol=1e-5)
        for a, b in zip(results[policy][1], results["none"][1]):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * np.abs(b).max())  # fusion-order rounding
    with pytest.raises(ValueError, match="train.remat='sometimes'"):
        c.train.remat = "sometimes"
        train.make_micro_loss(tiny_sd, c, regularize=True)


def test_remat_checkpoints_every_unet_block_once(tiny_sd):
    """train.remat wraps each ResNet and transformer block in its own checkpoint (not the whole
    UNet: that saves nothing at the peak): as many checkpoints in the UNet's jaxpr as block calls."""
    import flax.linen as nn

    from smooth_jax import remat

    calls = []

    def count(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, remat.block_classes()):
            calls.append(type(context.module).__name__)
        return next_fun(*args, **kwargs)

    x, t, ctx = jnp.zeros((1, 4, 16, 16)), jnp.array([3]), jnp.zeros((1, 77, tiny_sd.context_dim))
    lora_tree = lora.init(jax.random.PRNGKey(0), tiny_sd.params["unet"], lora.LoraSpec(rank=4, alpha=4))
    with nn.intercept_methods(count):
        jax.eval_shape(lambda *a: tiny_sd.unet_apply(*a), tiny_sd.params["unet"], x, t, ctx)
    assert {"FlaxResnetBlock2D", "FlaxBasicTransformerBlock"} <= set(calls)
    found = {}
    for policy in ("none", "full", "dots"):
        fn = train._unet_fn(tiny_sd, policy, "auto", 1.0)
        found[policy] = _count_primitive(jax.make_jaxpr(fn)(tiny_sd.params["unet"], lora_tree, x, t, ctx).jaxpr, "remat2")
    # "none" keeps the chunked attention's own per-block checkpoints
    assert found["full"] - found["none"] == found["dots"] - found["none"] == len(calls)


def _count_primitive(jaxpr, name: str) -> int:
    """Equations of primitive ``name`` in a jaxpr and every jaxpr nested in its equations' params."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    n += _count_primitive(inner, name)
    return n


def test_lora_train_forms_give_the_same_numbers_and_the_closed_form_flops(tiny_sd):
    """lora.train_form "merged", "factored" and "auto" are one function: same loss and LoRA gradient
    (plain and regularized). Their cost differs as counted in closed form: per targeted layer with
    N tokens, fan-in i, fan-out o, rank r, the plain loss's gradient through a merged kernel costs
    2 N i o (x^T dy) + 6 i r o (merge, and dW to down and up), factored 6 N r (i + o) less 2 N r i
    where the layer's input carries no derivative (cross-attention keys/values read the text; the
    first self-attention's q/k/v read the conv path), as neither form then forms dx."""
    from smooth_jax import plan

    c = tiny_config(**{"train.latents": "mean"})
    spec = lora.LoraSpec(rank=c.lora.rank, alpha=c.lora.alpha)
    tree = lora.random_like(jax.random.PRNGKey(5), lora.init(jax.random.PRNGKey(4), tiny_sd.params["unet"], spec), 0.05)
    micro = {k: v[0] for k, v in _batch(tiny_sd).items()}
    out, flops = {}, {}
    for form in ("factored", "merged", "auto"):
        c.lora.train_form = form
        for reg in (True, False):
            f = jax.value_and_grad(train.make_micro_loss(tiny_sd, c, regularize=reg), has_aux=True)
            args = (tree, _frozen(tiny_sd), micro, jnp.float32(0.2), jax.random.PRNGKey(0))
            (loss, aux), g = jax.jit(f)(*args)
            out[form, reg] = (float(loss), float(aux.penalty), _leaves(g))
            flops[form, reg] = plan.count_flops(jax.make_jaxpr(f)(*args))
    for form in ("factored", "auto"):
        for reg in (True, False):
            np.testing.assert_allclose(out[form, reg][:2], out["merged", reg][:2], rtol=1e-5)
            for a, b in zip(out[form, reg][2], out["merged", reg][2]):
                np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * np.abs(b).max())
    assert out["merged", True][1] > 0

    # Tokens and shapes of every targeted Dense call, recorded while the UNet runs.
    import flax.linen as nn

    mods, calls = lora.modules(tree), []

    def record(next_fun, args, kwargs, context):
        path = "/".join(context.module.path)
        if context.method_name == "__call__" and path in mods:
            x = args[0]
            calls.append((path, int(np.prod(x.shape[:-1])), x.shape[-1], context.module.features))
        return next_fun(*args, **kwargs)

    x0 = tiny_sd.encode_images(tiny_sd.params["vae"], micro["images"])
    ctx = tiny_sd.encode_text(tiny_sd.params["text_encoder"], micro["input_ids"])
    with nn.intercept_methods(record):
        tiny_sd.unet_apply(tiny_sd.params["unet"], x0, jnp.array([10, 500]), ctx)
    assert len(calls) == len(mods)
    r = c.lora.rank
    first_attn1 = calls[0][0].rsplit("/", 1)[0]
    assert first_attn1.endswith("attn1")

    def no_input_derivative(path):
        return path.rsplit("/", 1)[0] == first_attn1 and not path.endswith("to_out_0") or (
            "/attn2/" in path and path.endswith(("to_k", "to_v")))

    merged_cost = sum(2 * n * i * o + 6 * i * r * o for _, n, i, o in calls)
    factored_cost = sum(6 * n * r * (i + o) - (2 * n * r * i if no_input_derivative(p) else 0) for p, n, i, o in calls)
    np.testing.assert_allclose(flops["merged", False] - flops["factored", False], merged_cost - factored_cost, rtol=1e-6)
    # auto chooses per layer, so it costs no more than either form, in both losses.
    for reg in (True, False):
        assert flops["auto", reg] <= min(flops["merged", reg], flops["factored", reg])
    assert flops["auto", False] < min(flops["merged", False], flops["factored", False])  # tiny mixes 32/64 widths


def test_factored_lora_with_paths_the_model_lacks_is_an_error(tiny_sd, unet_inputs):
    tree = lora.init(jax.random.PRNGKey(4), tiny_sd.params["unet"], lora.LoraSpec(rank=2, alpha=2))
    bad = dict(lora.flatten(tree))
    bad["mid_block/attentions_7/attn1/to_q/down"] = jnp.zeros((32, 2))
    bad["mid_block/attentions_7/attn1/to_q/up"] = jnp.zeros((2, 32))
    latents, t, ctx = unet_inputs
    with pytest.raises(ValueError, match=r"1 LoRA module\(s\) matched no Dense.*mid_block/attentions_7/attn1/to_q"):
        with lora.factored(lora.unflatten(bad), 1.0):
            tiny_sd.unet_apply(tiny_sd.params["unet"], latents, t, ctx)


def test_bf16_compute_keeps_fp32_lora_and_close_losses(tiny_sd):
    from smooth_jax.models import StableDiffusion

    c = tiny_config(**{"train.latents": "mean", "train.compute_dtype": "bfloat16"})
    sd16 = StableDiffusion(configs=tiny_sd.configs, tokenizer=tiny_sd.tokenizer, schedule=tiny_sd.schedule,
                           params=tiny_sd.params, dtype=jnp.bfloat16)
    spec = lora.LoraSpec(rank=c.lora.rank, alpha=c.lora.alpha)
    tree = lora.init(jax.random.PRNGKey(4), tiny_sd.params["unet"], spec)
    state = train.create_train_state(tree, train.make_optimizer(c.train), jax.random.PRNGKey(9))
    batch = _batch(tiny_sd)
    s16, m16 = jax.jit(train.make_train_step(sd16, c, regularize=True))(state, _frozen(tiny_sd), batch)
    s32, m32 = jax.jit(train.make_train_step(tiny_sd, c, regularize=True))(state, _frozen(tiny_sd), batch)
    assert all(x.dtype == np.float32 for x in _leaves(s16.lora))
    # bf16 has 8 mantissa bits: ~0.4% per op; the losses are sums over many, so allow 5%.
    for k in ("loss/base", "reg/norm_mean"):
        np.testing.assert_allclose(float(m16[k]), float(m32[k]), rtol=5e-2)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """4 steps, lazy regularization every 2 steps, checkpoints every 2."""
    workdir = tmp_path_factory.mktemp("full")
    c = tiny_config(**{"objective.reg_every": 2})
    return c, train.train_and_evaluate(c, workdir, progress=False)


def test_lazy_regularization_schedule_and_weight(uninterrupted):
    c, run = uninterrupted
    assert [h["step"] for h in run.history] == [1, 2, 3, 4]
    for h in run.history:
        if (h["step"] - 1) % 2 == 0:  # steps 0 and 2 (0-based) regularize, with lambda * k
            assert h["loss/reg"] > 0
            np.testing.assert_allclose(h["loss/total"] - h["loss/base"], 2 * h["loss/reg"], rtol=1e-4)
        else:
            assert h["loss/reg"] == 0 and h["loss/total"] == h["loss/base"]
    assert run.history[1]["reg/ema_a"] == run.history[0]["reg/ema_a"]  # the plain step leaves a alone


def test_run_writes_checkpoints_tensorboard_and_final_lora(uninterrupted, tiny_sd):
    _, run = uninterrupted
    steps = sorted(int(p.name) for p in (run.workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 4]
    assert list((run.workdir / "tensorboard").glob("events.out.tfevents.*"))
    lf = export.read_any(run.workdir / "lora_final_peft.safetensors")
    export.check_against(lf, tiny_sd.param_shapes()["unet"], "final")
    from smooth_jax import checkpoint

    tree, config, step = checkpoint.restore_lora(run.workdir)
    assert step == 4 and config["lora"]["rank"] == 8
    for a, b in zip(_leaves(tree), _leaves(lf.lora)):
        assert np.array_equal(a, b)


def test_resume_continues_exactly(uninterrupted, tmp_path, capsys):
    """Stopped after 2 steps and resumed: the same losses for steps 3-4 and the same final LoRA."""
    c, full = uninterrupted
    first = train.train_and_evaluate(c, tmp_path, stop_after=2, progress=False)
    assert first.step == 2 and first.stopped_early
    assert not (tmp_path / "lora_final_peft.safetensors").exists()
    capsys.readouterr()
    second = train.train_and_evaluate(c, tmp_path, resume=True, progress=False)
    assert "Resuming from" in capsys.readouterr().out
    assert second.step == 4 and [h["step"] for h in second.history] == [3, 4]
    for got, want in zip(first.history + second.history, full.history):
        assert got == want
    a = export.read_any(tmp_path / "lora_final_peft.safetensors")
    b = export.read_any(full.workdir / "lora_final_peft.safetensors")
    assert all(np.array_equal(x, y) for x, y in zip(_leaves(a.lora), _leaves(b.lora)))


def test_keep_last_n_checkpoints(tmp_path):
    run = train.train_and_evaluate(tiny_config(**{"checkpoint.keep": 1, "checkpoint.every": 1}), tmp_path, progress=False)
    assert run.step == 4
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["4"]


def test_resume_flag_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train.train_and_evaluate(tiny_config(), tmp_path / "empty", resume=True, progress=False)


@pytest.mark.slow
def test_sigterm_saves_and_stops_then_resumes(tmp_path):
    c = tiny_config(**{"train.steps": 16, "checkpoint.every": 100})
    timer = threading.Timer(2.0, lambda: os.kill(os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        run = train.train_and_evaluate(c, tmp_path, progress=False)
    finally:
        timer.cancel()
    assert run.stopped_early and 1 <= run.step < 16
    assert (tmp_path / "checkpoints" / str(run.step)).is_dir()  # saved although checkpoint.every = 100
    rest = train.train_and_evaluate(c, tmp_path, resume=True, progress=False)
    assert rest.step == 16 and rest.history[0]["step"] == run.step + 1


@pytest.mark.slow
def test_eight_device_mesh_matches_one_device(tmp_path):
    """data=4 x fsdp=2 with the UNet's frozen weights FSDP-sharded vs a single device: same losses."""
    assert jax.device_count() == 8
    one = train.train_and_evaluate(tiny_config(**{"train.steps": 2, "train.batch_size": 8, "mesh.num_devices": 1,
                                                  "mesh.shape": {"data": 1, "fsdp": 1}}), tmp_path / "one", progress=False)
    c8 = tiny_config(**{"train.steps": 2, "train.batch_size": 8, "mesh.num_devices": 8,
                      "mesh.shape": {"data": 4, "fsdp": 2}})
    c8.mesh.rules = (("unet/.*", "fsdp"), (".*", "replicate"))
    eight = train.train_and_evaluate(c8, tmp_path / "eight", progress=False)
    _assert_same_training(one.history, eight.history, tmp_path / "one", tmp_path / "eight")


def _assert_same_training(hist_a, hist_b, workdir_a, workdir_b):
    """Two runs of one config on different topologies: the same metrics (up to reduction order
    across devices, ~1e-6 relative; 2e-4 allowed) and the same final LoRA."""
    assert [h["step"] for h in hist_a] == [h["step"] for h in hist_b]
    for a, b in zip(hist_a, hist_b):
        for k in ("loss/total", "loss/base", "loss/reg", "reg/norm_mean", "reg/ema_a", "grad_norm"):
            np.testing.assert_allclose(b[k], a[k], rtol=2e-4, err_msg=k)
    la = export.read_any(workdir_a / "lora_final_peft.safetensors")
    lb = export.read_any(workdir_b / "lora_final_peft.safetensors")
    for x, y in zip(_leaves(la.lora), _leaves(lb.lora)):
        np.testing.assert_allclose(y, x, rtol=1e-3, atol=1e-6)


def _launch_tiny_train(workdir: Path, fields: dict, devices_per_process: int = 4) -> list[str]:
    """`smooth-jax train` of configs/tiny.py on 2 local processes (launch/multiprocess.py), with
    ``fields`` as --config overrides, as a user would type them."""
    import sys

    return [sys.executable, str(ROOT / "launch" / "multiprocess.py"), "--processes", "2", "--devices-per-process",
            str(devices_per_process), "--", "train", "--config", str(ROOT / "configs" / "tiny.py"), "--workdir",
            str(workdir), "--no-progress", *[f"--config.{k}={v}" for k, v in fields.items()]]


@pytest.mark.slow
def test_two_processes_of_four_devices_match_one_process(tmp_path):
    """A real multi-host run: 2 processes x 4 CPU devices joined by jax.distributed on localhost
    (launch/multiprocess.py), against one process with the same 8-device mesh. With
    data.host_slicing both see the same global batches, so losses and the LoRA must agree.
    The UNet's weights are split over all 8 devices (fsdp across both hosts), and a sample grid is
    rendered at step 2: every host must join that render, and host 0's PNG must match."""
    from PIL import Image

    fields = {"train.steps": 2, "train.batch_size": 8, "data.host_slicing": True,
              "mesh.shape": {"data": 1, "fsdp": 8}, "mesh.rules": (("unet/.*", "fsdp"),), "mesh.num_devices": 0,
              "log.sample_every": 2}
    single = train.train_and_evaluate(tiny_config(**fields), tmp_path / "single", progress=False)
    # The same settings as tiny_config(**fields), as a user would pass them on the command line.
    cli_fields = {"checkpoint.every": 2, "log.every": 1, "export.formats": ("peft",), **fields}
    cmd = _launch_tiny_train(tmp_path / "multi", cli_fields)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    # Each host's own tail: when both fail, the first one's error is usually the cause.
    tails = ["\n".join(ln for ln in proc.stdout.splitlines() if ln.startswith(f"[p{i}]"))[-2500:] for i in (0, 1)]
    assert proc.returncode == 0, "\n".join(tails) + "\n" + proc.stderr[-1000:]
    assert "[p0]" in proc.stdout and "[p1]" in proc.stdout
    multi = [json.loads(line) for line in (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in multi] == [1, 2]
    _assert_same_training(single.history, multi, tmp_path / "single", tmp_path / "multi")
    grids = [np.asarray(Image.open(tmp_path / run / "samples" / "step_0000002.png"), np.float32)
             for run in ("single", "multi")]
    assert grids[0].shape == grids[1].shape == (32, 3 * 32, 3)  # 3 prompts x 32 px
    assert grids[0].std() > 1  # a real image, not a blank one
    assert np.abs(grids[0] - grids[1]).max() <= 2, np.abs(grids[0] - grids[1]).max()
    # A multi-host checkpoint exports from one process, without the base model.
    from smooth_jax import cli

    out = tmp_path / "from_ckpt.safetensors"
    assert cli.main(["export", "--checkpoint", str(tmp_path / "multi"), "--out", str(out), "--format", "kohya"]) == 0
    final = export.read_any(tmp_path / "multi" / "lora_final_peft.safetensors")
    assert all(np.array_equal(x, y) for x, y in zip(_leaves(export.read_any(out).lora), _leaves(final.lora)))


def test_multiprocess_launcher_reports_a_failed_host():
    """A host that fails ends the job with its exit code, and the launcher names it (an OOM-killed
    host reads "signal 9"), instead of leaving the other host waiting at a barrier."""
    import sys

    cmd = [sys.executable, str(ROOT / "launch" / "multiprocess.py"), "--processes", "2", "--", "no-such-command"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "ended with exit code 2" in proc.stderr and "invalid choice: 'no-such-command'" in proc.stdout


def _state_and_parent(pid: int | str) -> tuple[str, int] | None:
    """(state letter, parent pid) of a process from Linux /proc; None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def _alive(pid: int) -> bool:
    stat = _state_and_parent(pid)
    return stat is not None and stat[0] != "Z"


def _children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` and that have exec'd smooth_jax.cli (Linux /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        stat = _state_and_parent(d.name) if d.name.isdigit() else None
        if stat is None or stat[0] == "Z" or stat[1] != pid:
            continue
        try:
            if b"smooth_jax.cli" in (d / "cmdline").read_bytes():
                out.append(int(d.name))
        except OSError:
            continue
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from Linux /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_multiprocess_launcher_takes_its_processes_with_it(tmp_path, sig):
    """A scheduler stopping the launcher (SIGTERM) stops every host process; one killing it
    outright (SIGKILL, a timeout) kills them too, instead of leaving them waiting in a collective."""
    import time

    cmd = _launch_tiny_train(tmp_path / "run", {}, devices_per_process=1)
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while len(children := _children(launcher.pid)) < 2 and time.time() < deadline:
        time.sleep(0.1)
    assert len(children) == 2, "the launcher did not start two processes"
    launcher.send_signal(sig)
    out, err = launcher.communicate(timeout=600)
    deadline = time.time() + 30
    while any(map(_alive, children)) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(map(_alive, children)), f"host processes outlived the launcher: {children}"
    if sig == signal.SIGTERM:  # passed on: each host either died of it or, inside train, saved and stopped
        assert "ended with signal 15 (SIGTERM)" in err or "SIGTERM: saved a checkpoint" in out, (out[-2000:], err)
        assert launcher.returncode in (0, 128 + signal.SIGTERM), launcher.returncode


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from Linux /proc")
def test_sigterm_to_one_host_stops_every_host_at_one_step(tmp_path):
    """A preemption notice reaches TPU hosts one at a time, or only some of them. Here only host 1
    gets SIGTERM: both hosts must stop after the same step and save one checkpoint there (before,
    host 1 alone stopped to save while host 0 went on to the next step, and both hung)."""
    import time

    work = tmp_path / "run"
    overrides = {"train.steps": 1000, "train.batch_size": 8, "data.host_slicing": True, "mesh.num_devices": 0,
                 "mesh.shape": {"data": 8, "fsdp": 1}, "log.sample_every": 0, "log.every": 1, "checkpoint.every": 1000}
    cmd = _launch_tiny_train(work, overrides)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.time() + 600
        metrics = work / "metrics.jsonl"
        while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and time.time() < deadline:
            assert launcher.poll() is None, launcher.stdout.read()[-3000:]
            time.sleep(0.5)
        host1 = [pid for pid in _children(launcher.pid)
                 if b"SMOOTH_JAX_PROCESS_ID=1\0" in Path(f"/proc/{pid}/environ").read_bytes()]
        assert len(host1) == 1
        os.kill(host1[0], signal.SIGTERM)
        out, _ = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()  # its hosts go with it (PDEATHSIG)
    assert launcher.returncode == 0, out[-3000:]
    saved = [int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit()]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert len(saved) == 1 and saved[0] == steps[-1] < 1000, (saved, steps)
    for host in ("[p0]", "[p1]"):  # both hosts ran exactly the saved number of steps
        assert f"{host} step {saved[0]}: loss" in out and f"{host} step {saved[0] + 1}: loss" not in out, out[-3000:]


_GLOO_PROBE = """
import jax, numpy as np
from jax.experimental import multihost_utils
from smooth_jax import sharding
assert sharding.maybe_initialize_distributed()
print("gathered", multihost_utils.process_allgather(np.array([jax.process_index()])).ravel().tolist(), flush=True)
"""


_DRIFT_PROBE = """
import time
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from smooth_jax import sharding
assert sharding.maybe_initialize_distributed()
mesh = sharding.make_mesh({"data": 8, "fsdp": 1}, num_devices=0)
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), np.full((4,), jax.process_index() + 1.0))
if jax.process_index() == 1:
    time.sleep(40)  # a host that loads or compiles slowly: more than gloo's 30 s rendezvous
total = sharding.SyncedFirstCall(jax.jit(jnp.sum, out_shardings=sharding.replicated(mesh)), "sum")
print("sum", float(total(x).addressable_data(0)), flush=True)
"""


def _two_probe_processes(gloo_hostname: str, probe: str = _GLOO_PROBE,
                         devices: int = 1) -> list[subprocess.CompletedProcess]:
    import socket
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", SMOOTH_JAX_COORDINATOR=f"127.0.0.1:{port}", SMOOTH_JAX_NUM_PROCESSES="2",
               SMOOTH_JAX_GLOO_HOSTNAME=gloo_hostname)
    procs = [subprocess.Popen([sys.executable, "-c", probe], env={**env, "SMOOTH_JAX_PROCESS_ID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=300)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout))
    return out


def test_gloo_transport_follows_the_environment():
    """SMOOTH_JAX_GLOO_HOSTNAME reaches gloo: on loopback two processes all-gather their ids; an
    address this machine does not have fails at once, naming it."""
    for p in _two_probe_processes("127.0.0.1"):
        assert p.returncode == 0 and "gathered [0, 1]" in p.stdout, p.stdout[-3000:]
    for p in _two_probe_processes("203.0.113.77"):  # TEST-NET-3: never a local address
        assert p.returncode != 0 and "203.0.113.77" in p.stdout, p.stdout[-3000:]


@pytest.mark.slow
def test_processes_that_drift_apart_meet_before_their_first_collective():
    """One host 40 s behind the other at its first cross-process step: a bare jitted call fails in
    gloo's 30 s rendezvous (the CI failure of the two-process training test); SyncedFirstCall
    compiles, meets the other host, then runs, and the 8-device sum is exact."""
    for p in _two_probe_processes("127.0.0.1", _DRIFT_PROBE, devices=4):
        assert p.returncode == 0 and "sum 12.0" in p.stdout, p.stdout[-3000:]


def test_cached_encodings_train_like_images(tiny_sd, tmp_path):
    """`smooth-jax cache` output: the loss of a cached micro-batch equals the loss of the same
    images encoded in the step (posterior mean, centre crop), and a run trains from the cache."""
    from smooth_jax import cli
    from smooth_jax.data import CachedSource, make_single_pass_iterator

    c = tiny_config(**{"train.latents": "mean", "data.center_crop": True})
    cache = tmp_path / "cache"
    assert cli.main(["cache", "--config", str(ROOT / "configs" / "tiny.py"), "--out", str(cache),
                     "--config.data.resolution=32", "--batch-size", "64"]) == 0
    src = CachedSource(cache)
    assert len(src) == 1797
    batch = next(iter(make_single_pass_iterator(c.data, tiny_sd.tokenizer, batch_size=2)))
    cached = {"latents": np.stack([src[i]["latents"] for i in range(2)]), "context": np.stack([src[i]["context"] for i in range(2)])}
    f = jax.jit(train.make_micro_loss(tiny_sd, c, regularize=True))
    tree = lora.init(jax.random.PRNGKey(0), tiny_sd.params["unet"], lora.LoraSpec(rank=8, alpha=8))
    a = f(tree, _frozen(tiny_sd), {k: jnp.asarray(v) for k, v in batch.items()}, 0.0, jax.random.PRNGKey(3))[0]
    b = f(tree, _frozen(tiny_sd), {k: jnp.asarray(v) for k, v in cached.items()}, 0.0, jax.random.PRNGKey(3))[0]
    np.testing.assert_allclose(float(b), float(a), rtol=1e-4)
    run = train.train_and_evaluate(tiny_config(**{"data.cache_dir": str(cache), "train.steps": 2}), tmp_path / "run", progress=False)
    assert run.step == 2 and np.isfinite(run.history[-1]["loss/total"])
