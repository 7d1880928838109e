"""smooth-jax plan: ahead-of-time compiles of the train step for TPU and GPU targets, on this CPU.

Tiny preset only (SD-1.5 compiles take minutes: they are for the explicit command), cached
latents at 16 px, so each compile is small. One TPU target (v5p-8, 4 chips) and one GPU target
(8xA100); the planner is shared by the module, so every program compiles once.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smooth_jax import plan

# Each TPU/GPU compile of the tiny regularized step takes ~40-60 s on an idle 2-core CPU. They need
# the plan extra (libtpu, the CUDA compiler plugin); .ci/run installs it in a venv of its own.
_HAVE_PLAN = importlib.util.find_spec("libtpu") is not None


def compiles(fn):
    reason = "the plan extra is not installed (pip install -e '.[plan]')"
    return pytest.mark.slow(pytest.mark.skipif(not _HAVE_PLAN, reason=reason)(fn))

TPU, GPU = "v5p-8", "8xa100"
RES, INPUTS, DTYPE = 16, "latents", "float32"


@pytest.fixture(scope="module")
def planner():
    return plan.Planner(model="tiny", resolution=RES, inputs=INPUTS)


@pytest.fixture(scope="module")
def reg(planner):
    return planner.compile(TPU, 1, "none", DTYPE, regularized=True)


@pytest.fixture(scope="module")
def plain(planner):
    return planner.compile(TPU, 1, "none", DTYPE, regularized=False)


@compiles
def test_tpu_compile_reports_memory_flops_and_time(planner, reg):
    t = plan.TARGETS[TPU]
    assert reg.error == "" and reg.fits and reg.devices == 4
    assert reg.argument_bytes > 0 and reg.temp_bytes > 0 and reg.flops > 0 and reg.bytes_accessed > 0
    assert reg.flops_source == "counted" and reg.bytes_source == "compile"
    # The jaxpr count (matmuls and convolutions, loops x trip count) against XLA's count of the
    # compiled program (every op, each loop body once: the chunked attention's blocks count once).
    assert 0 < reg.compile_flops and reg.compile_flops / 3 < reg.flops < 3 * reg.compile_flops
    assert reg.total_bytes == (reg.argument_bytes + reg.output_bytes - reg.alias_bytes + reg.temp_bytes
                               + reg.code_bytes)
    # The donated train state comes back in place: outputs alias (almost) all of their bytes.
    assert reg.alias_bytes > 0
    # Arguments hold, on every chip, the replicated frozen weights, LoRA, Adam moments and the
    # chip's slice of the batch: at least their bytes, counted here from the shapes alone.
    # With cached latents the VAE and text encoder are unused, and jit drops unused arguments.
    state, frozen, batch_d = planner.per_device_inputs(1, "none", DTYPE)
    lora_bytes = plan.tree_bytes(state.lora)
    assert plan.tree_bytes(state.opt_state) >= 2 * lora_bytes  # Adam mu and nu
    expected = plan.tree_bytes(frozen["unet"]) + plan.tree_bytes(state) + plan.tree_bytes(batch_d)
    assert reg.argument_bytes >= expected
    # TPU layouts pad the minor dims to 128-lane tiles: tiny's 32/64 channels and rank-8 LoRA
    # factors about double (measured 1.93x); nothing else is in there.
    assert reg.argument_bytes < 2.5 * expected
    # Predicted time: the roofline of the reported numbers at v5p's peak (fp32 = one bf16 pass on TPU).
    assert reg.t_compute_s == pytest.approx(reg.flops / t.peak_flops_f32)
    assert reg.t_memory_s == pytest.approx(reg.bytes_accessed / t.hbm_bandwidth)
    assert reg.step_time_s == max(reg.t_compute_s, reg.t_memory_s)
    assert reg.images_per_s == pytest.approx(1 * 4 / reg.step_time_s)


@compiles
def test_regularizer_costs_more_than_the_plain_step(planner, reg, plain):
    # DESIGN.md §4: 2.2x the FLOPs and ~4x the temporaries at SD-1.5 size; at tiny size the double
    # backward still costs well over the plain step, and less than 4 plain steps.
    assert 1.3 * plain.flops < reg.flops < 4 * plain.flops
    assert reg.temp_bytes > plain.temp_bytes
    assert reg.argument_bytes == plain.argument_bytes  # same state, weights and batch
    # The plain step's FLOPs are its jaxpr's count at per-device shapes.
    step = planner.step("none", DTYPE, regularized=False)
    assert plain.flops == plan.counted_step_flops(step, *planner.per_device_inputs(1, "none", DTYPE))


def test_count_flops_of_a_matmul_and_a_conv():
    def f(a, b, x, w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME")  # NCHW, OIHW
        return a @ b, y

    a, b = jnp.zeros((3, 5)), jnp.zeros((5, 7))
    x, w = jnp.zeros((2, 4, 6, 6)), jnp.zeros((8, 4, 3, 3))
    n = plan.count_flops(jax.make_jaxpr(f)(a, b, x, w))
    assert n == 2 * 3 * 5 * 7 + 2 * (2 * 8 * 6 * 6) * (4 * 3 * 3)

    def scanned(a, b):
        return jax.lax.scan(lambda c, _: (c @ b, None), a, None, length=4)[0]

    a, b = jnp.zeros((5, 5)), jnp.zeros((5, 5))
    assert plan.count_flops(jax.make_jaxpr(scanned)(a, b)) == 4 * 2 * 5**3


@compiles
def test_gpu_compile_from_a_target_config(planner, reg):
    try:
        r = planner.compile(GPU, 1, "none", DTYPE, regularized=True)
    except plan.PlanError as e:
        pytest.skip(f"no GPU compile here: {e}")
    t = plan.TARGETS[GPU]
    assert r.error == "" and r.fits and r.devices == 8
    assert r.argument_bytes > 0 and r.temp_bytes > 0
    # The same per-device program as on TPU: the same counted FLOPs; the GPU compile has no cost model.
    assert r.flops_source == "counted" and r.bytes_source == "estimate" and r.compile_flops == 0
    assert r.flops == reg.flops
    # Unpadded GPU buffers: the arguments are the shapes' bytes, plus at most a little alignment.
    state, frozen, batch_d = planner.per_device_inputs(1, "none", DTYPE)
    expected = plan.tree_bytes(frozen["unet"]) + plan.tree_bytes(state) + plan.tree_bytes(batch_d)
    assert expected <= r.argument_bytes < 1.05 * expected
    assert r.t_compute_s == pytest.approx(r.flops / t.peak_flops_f32)  # fp32 compute: TF32 peak


def test_predicted_step_time_is_the_roofline():
    assert plan.predicted_step_time(2e12, 1e9, 1e12, 1e12) == (2.0, 1e-3, 2.0)
    assert plan.predicted_step_time(1e9, 4e12, 1e12, 2e12) == (1e-3, 2.0, 2.0)


def _affine_memory(a: int, c: int, hbm: int, curve: float = 0.0):
    calls = []

    def measure(b):
        calls.append(b)
        total = a + c * b + curve * b * b
        return total <= hbm, total

    return measure, calls


def _largest_fitting(a, c, hbm, curve=0.0, max_batch=256):
    return max([0] + [b for b in range(1, max_batch + 1) if a + c * b + curve * b * b <= hbm])


@pytest.mark.parametrize("a,c,hbm,curve", [(10, 3, 100, 0), (10, 3, 100, 0.2), (10, 3, 5, 0), (10, 3, 14, 0),
                                           (10, 3, 10_000, 0), (10, 0, 100, 0), (50, 30, 95, 0),
                                           (7, 5, 1000, -0.01), (100, 1, 400, 0.05)])
def test_batch_search_finds_the_largest_fitting_batch(a, c, hbm, curve):
    measure, calls = _affine_memory(a, c, hbm, curve)
    best, tried = plan.search_batch(measure, hbm)
    assert best == _largest_fitting(a, c, hbm, curve)
    assert tried == calls and len(set(tried)) == len(tried)  # no batch compiled twice


def test_batch_search_on_affine_memory_takes_four_compiles():
    """1 and 2 give the line; its prediction and prediction + 1 prove the answer."""
    measure, _ = _affine_memory(10, 3, 100)
    assert plan.search_batch(measure, 100) == (30, [1, 2, 30, 31])
    measure, _ = _affine_memory(10, 3, 10_000)
    assert plan.search_batch(measure, 10_000, max_batch=64) == (64, [1, 2, 64])
    measure, _ = _affine_memory(10, 3, 100)
    assert plan.search_batch(measure, 100, refine=False) == (16, [1, 2, 4, 8, 16, 32])


@compiles
def test_search_with_a_small_fake_hbm_compiles_until_it_overflows(planner, reg, tmp_path):
    """An HBM just big enough for batch 1: batch 2 is compiled, does not fit, and the search stops."""
    from smooth_jax import cli

    hbm_gib = reg.total_bytes / plan.GiB
    args, rest = cli.build_parser().parse_known_args(
        ["plan", "--model", "tiny", "--targets", TPU, "--resolution", str(RES), "--inputs", INPUTS,
         "--dtype", DTYPE, "--search", "--hbm-gib", repr(hbm_gib), "--no-progress", "--out", str(tmp_path)])
    assert args.fn is plan.cmd_plan and not rest
    results, rows = plan.run(args, rest, planner=planner)
    assert [r.batch_per_device for r in results] == [1, 2]
    assert [r.fits for r in results] == [True, False]
    assert rows[0]["max_batch"] == 1 and rows[0]["tried"] == [1, 2]
    assert results[1].total_bytes > results[0].total_bytes  # a bigger batch needs more memory
    plan.write_outputs(tmp_path, results, rows)
    payload = json.loads((tmp_path / "plan.json").read_text())
    assert payload["search"][0]["max_batch"] == 1
    assert payload["results"][0]["flops"] == pytest.approx(reg.flops)
    md = (tmp_path / "plan.md").read_text()
    assert "| v5p-8 | reg | xla | none | float32 | 1 |" in md and "Largest per-device batch" in md
    # Resumed from that plan.json by a fresh planner: the same answer with nothing compiled again.
    args.reuse, args.out = [str(tmp_path / "plan.json")], str(tmp_path / "again")
    fresh = plan.Planner(model="tiny", resolution=RES, inputs=INPUTS)
    fresh._compile = lambda *a, **k: pytest.fail(f"compiled again: {a}")
    results2, rows2 = plan.run(args, rest, planner=fresh)
    assert rows2[0]["max_batch"] == 1 and rows2[0]["tried"] == [1, 2]
    assert [r.total_bytes for r in results2] == [r.total_bytes for r in results]
    args.reuse = [str(tmp_path / "missing.json")]
    with pytest.raises(plan.PlanError, match="--reuse: .*missing.json is not a readable plan.json"):
        plan.run(args, rest, planner=fresh)


@compiles
def test_the_cli_compiles_in_a_child_process_with_the_same_result(reg, tmp_path):
    """The plan command's default: each compile in a spawned process (an SD-1.5 search's host RAM
    then stays at one compile's). Its numbers are the in-process compile's, and it reports the
    child's peak RAM."""
    from smooth_jax import cli

    args, rest = cli.build_parser().parse_known_args(
        ["plan", "--model", "tiny", "--targets", TPU, "--resolution", str(RES), "--inputs", INPUTS,
         "--dtype", DTYPE, "--no-progress", "--out", str(tmp_path)])
    assert not args.in_process
    (r,), _ = plan.run(args, rest)
    for field in ("argument_bytes", "temp_bytes", "total_bytes", "flops", "compile_flops", "bytes_accessed",
                  "config_digest", "attention"):
        assert getattr(r, field) == getattr(reg, field), field
    # The child's own peak (jax + libtpu + this compile): below this process's, which made the same
    # compile and more, and not this process's carried over the fork (ru_maxrss would be).
    assert 100 * 2**20 < r.compile_rss_bytes < plan._peak_rss_bytes()
    assert json.loads((tmp_path / "plan.json").read_text())["results"][0]["compile_rss_bytes"] == r.compile_rss_bytes


def test_run_in_child_returns_results_and_reports_failures():
    """The child runs in another process; its exceptions come back as they were raised; a child
    killed before answering (as the OOM killer does) is a PlanError naming the work and the signal."""
    assert plan.run_in_child(os.getpid, ()) != os.getpid()
    assert plan.run_in_child(divmod, (7, 2)) == (3, 1)
    with pytest.raises(ValueError, match="invalid literal") as err:
        plan.run_in_child(int, ("x",), what="compile of v4-8")
    assert "child process running the compile of v4-8" in "".join(getattr(err.value, "__notes__", []))
    with pytest.raises(plan.PlanError, match=r"compile of v4-8 .*signal 9 \(SIGKILL\).*OOM killer"):
        plan.run_in_child(signal.raise_signal, (signal.SIGKILL,), what="compile of v4-8 reg")
    with pytest.raises(plan.PlanError, match=r"exit code 3"):
        plan.run_in_child(os._exit, (3,))


def _fake(target, batch, **kw):
    gib = 2 + batch
    return plan.Result(target=target, model="sd15", resolution=512, inputs="images", regularized=True, remat="none",
                       compute_dtype="bfloat16", batch_per_device=batch, devices=8, total_bytes=gib * plan.GiB,
                       hbm_bytes=16 * plan.GiB, fits=gib <= 16, **kw)


def test_merge_joins_runs_in_target_order(tmp_path, capsys):
    """`plan --merge`: one-target runs become one report, in TARGETS order; a later run's result
    for the same configuration wins; a broken file is named in the error."""
    from smooth_jax import cli

    gpu_row = {"target": "8xh100", "remat": "none", "compute_dtype": "bfloat16", "max_batch": 3, "tried": [1, 2, 3, 4],
               "best": None}
    plan.write_outputs(tmp_path / "a", [_fake("8xh100", 1), _fake("v6e-8", 1, compile_s=1.0)], [gpu_row])
    cublas = "xla_gpu_enable_triton_gemm=False"  # another compile of the same batch: kept beside it
    plan.write_outputs(tmp_path / "b", [_fake("v6e-8", 1, compile_s=2.0), _fake("v4-8", 2),
                                        _fake("8xh100", 1, compiler_options=cublas)],
                       [dict(gpu_row, max_batch=4, xla_options=cublas)], partial=True)
    files = [str(tmp_path / d / "plan.json") for d in "ab"]
    assert cli.main(["plan", "--merge", *files, "--out", str(tmp_path / "all")]) == 0
    payload = json.loads((tmp_path / "all" / "plan.json").read_text())
    got = [(r["target"], r["batch_per_device"], r["compile_s"], r["compiler_options"]) for r in payload["results"]]
    assert got == [("v4-8", 2, 0.0, ""), ("v6e-8", 1, 2.0, ""), ("8xh100", 1, 0.0, ""), ("8xh100", 1, 0.0, cublas)]
    assert payload["complete"] and [r["max_batch"] for r in payload["search"]] == [3, 4]
    md = (tmp_path / "all" / "plan.md").read_text()
    assert f"| 8xh100 | none | bfloat16 ({cublas}) | 4 |" in md
    assert md.index("| v4-8 |") < md.index("| v6e-8 |") < md.index("| 8xh100 |") and "partial" not in md
    assert "had not finished" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("{not json")
    assert cli.main(["plan", "--merge", str(tmp_path / "bad.json"), "--out", str(tmp_path / "x")]) == 2
    assert "bad.json is not a readable plan.json" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert cli.main(["plan", "--merge", *files]) == 2
    assert "--merge needs --out" in capsys.readouterr().err


class _Lowered:
    """Stands in for a jax Lowered whose default compile hits XLA:GPU's Triton tiling error."""

    def __init__(self, error: str):
        self.error, self.calls = error, []

    def compile(self, compiler_options=None):
        self.calls.append(compiler_options)
        if not compiler_options:
            raise RuntimeError(f"INTERNAL: {self.error}: dot.6893 = bf16[539,768]")
        return "executable"


def test_gpu_triton_tiling_error_is_retried_with_cublas_and_recorded():
    low = _Lowered(plan.GPU_RETRY[0])
    assert plan.compile_for(plan.TARGETS["8xa100"], low) == ("executable", "xla_gpu_enable_triton_gemm=False")
    assert low.calls == [None, {"xla_gpu_enable_triton_gemm": False}]
    for target, error in (("v5p-8", plan.GPU_RETRY[0]), ("8xh100", "RESOURCE_EXHAUSTED: out of memory")):
        with pytest.raises(RuntimeError, match=error):  # TPU, or another GPU error: raised as it is
            plan.compile_for(plan.TARGETS[target], _Lowered(error))
    row = _fake("8xa100", 7, compiler_options="xla_gpu_enable_triton_gemm=False")
    assert "| 0 (xla_gpu_enable_triton_gemm=False) |" in plan.markdown_table([row])


def test_xla_options_are_parsed_passed_to_the_compile_and_recorded():
    """`plan --xla-option`: typed values, every compile gets them (the Triton retry adds to them,
    and is not tried again when the user already turned Triton GEMMs off), and the digest differs."""
    opts = plan.parse_xla_options(["xla_gpu_enable_triton_gemm=false", "xla_gpu_autotune_level=0", "xla_x=a b"])
    assert opts == {"xla_gpu_enable_triton_gemm": False, "xla_gpu_autotune_level": 0, "xla_x": "a b"}
    # jax's build options (not XLA debug options) are taken by name too.
    assert plan.parse_xla_options(["exec_time_optimization_effort=-1", "memory_fitting_level=O3",
                                   "optimization_level=19"]) == {
        "exec_time_optimization_effort": -1, "memory_fitting_level": 39, "optimization_level": 19}
    for bad in ("triton=false", "xla_gpu_enable_triton_gemm", "optimization_effort=1"):
        with pytest.raises(plan.PlanError, match=f"--xla-option '{bad}'"):
            plan.parse_xla_options([bad])
    low = _Lowered(plan.GPU_RETRY[0])
    low.compile = lambda compiler_options=None: low.calls.append(compiler_options) or "executable"
    assert plan.compile_for(plan.TARGETS["8xh100"], low, {"xla_gpu_autotune_level": 0}) == (
        "executable", "xla_gpu_autotune_level=0")
    assert low.calls == [{"xla_gpu_autotune_level": 0}]
    low = _Lowered(plan.GPU_RETRY[0])  # fails whenever no options are given; here with Triton already off
    low.compile = lambda compiler_options=None: (low.calls.append(compiler_options),
                                                 _Lowered(plan.GPU_RETRY[0]).compile(None))
    with pytest.raises(RuntimeError, match="output tile sizes"):
        plan.compile_for(plan.TARGETS["8xa100"], low, {"xla_gpu_enable_triton_gemm": False})
    assert low.calls == [{"xla_gpu_enable_triton_gemm": False}]
    p0 = plan.Planner(model="tiny", resolution=RES, inputs=INPUTS)
    p1 = plan.Planner(model="tiny", resolution=RES, inputs=INPUTS, xla_options=opts)
    assert p0.digest("8xh100", "none", "bfloat16") != p1.digest("8xh100", "none", "bfloat16")


def test_missing_libtpu_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # import libtpu -> ImportError
    with pytest.raises(plan.PlanError, match=r"pip install -e '\.\[plan\]'.*install\.sh --plan"):
        plan.devices_for(plan.TARGETS["v6e-8"])


def test_targets_table_is_consistent():
    for t in plan.TARGETS.values():
        assert t.peak_flops >= t.peak_flops_f32 > 0 and t.hbm_bytes > 10 * plan.GiB and t.hbm_bandwidth > 5e11
        if t.platform == "cuda":
            assert "device_memory_size" in plan.gpu_target_config(t)
    assert np.isclose(plan.TARGETS["8xh100"].peak_flops, 989e12)


def test_batch_search_resumes_from_known_compiles():
    """Compiles from an earlier run (`plan --reuse`) set the bracket and the line and are not
    compiled again; the answer is the one a search from scratch finds."""
    measure, calls = _affine_memory(10, 3, 100)
    known = {b: measure(b) for b in (1, 2)}
    calls.clear()
    assert plan.search_batch(measure, 100, known=known) == (30, [1, 2, 30, 31]) and calls == [30, 31]
    for pre in ((1,), (5, 40), (29, 31), (7,), (3, 17, 50)):
        measure, calls = _affine_memory(10, 3, 100, 0.05)
        known = {b: measure(b) for b in pre}
        calls.clear()
        best, tried = plan.search_batch(measure, 100, known=known)
        assert best == _largest_fitting(10, 3, 100, 0.05)
        assert tried[:len(pre)] == sorted(pre) and not set(calls) & set(pre) and tried[len(pre):] == calls
    measure, calls = _affine_memory(10, 3, 100)  # a known fit above a known failure (GPU memory is not monotone)
    assert plan.search_batch(measure, 100, known={1: (True, 13), 4: (False, 0), 6: (True, 28)})[0] == 3


def test_batch_search_from_a_guess():
    """A right guess (`plan --search-start`) costs two compiles and skips batches 1 and 2; a wrong
    one still ends at the answer a search from scratch finds, compiling no batch twice."""
    measure, calls = _affine_memory(10, 3, 100)
    assert plan.search_batch(measure, 100, start=30) == (30, [30, 31]) and calls == [30, 31]
    measure, _ = _affine_memory(10, 3, 100)  # too high: 35 and 34 compile but do not fit; their line
    assert plan.search_batch(measure, 100, start=35) == (30, [35, 34, 30, 31])
    measure, _ = _affine_memory(10, 3, 100)  # too low: 20 and 21 fit and give the line
    assert plan.search_batch(measure, 100, start=20) == (30, [20, 21, 30, 31])
    for a, c, hbm, curve in [(10, 3, 100, 0.05), (10, 3, 14, 0), (10, 3, 5, 0), (50, 30, 95, 0), (100, 1, 400, 0.05)]:
        for start in (1, 2, 3, 7, 30, 64, 256):
            measure, calls = _affine_memory(a, c, hbm, curve)
            best, tried = plan.search_batch(measure, hbm, start=start)
            assert best == _largest_fitting(a, c, hbm, curve), (a, c, hbm, curve, start)
            assert tried[0] == start and tried == calls and len(set(tried)) == len(tried)

    def overflow_errors(b):  # a compile that overflows reports no memory (libtpu's compile error)
        ok, total = _affine_memory(10, 3, 100)[0](b)
        return ok, total if ok else 0

    assert plan.search_batch(overflow_errors, 100, start=30) == (30, [30, 31])
    # Both too big to compile: no memory figures, so batches 1 and 2 give the line.
    assert plan.search_batch(overflow_errors, 100, start=40) == (30, [40, 39, 1, 2, 30, 31])
    measure, calls = _affine_memory(10, 3, 100)  # with earlier compiles: the guess's neighbour is known
    assert plan.search_batch(measure, 100, known={31: measure(31)}, start=30) == (30, [31, 30])
    with pytest.raises(ValueError, match="search start batch 0 is outside 1..256"):
        plan.search_batch(measure, 100, start=0)
    with pytest.raises(ValueError, match="drop --no-refine"):
        plan.search_batch(measure, 100, start=8, refine=False)


def test_search_start_reaches_the_search_from_the_command_line(tmp_path):
    """`plan --search --search-start B`: B and B+1 are the batches compiled (a stand-in compile:
    memory affine in the batch, so no XLA compile is needed)."""
    from smooth_jax import cli

    args, rest = cli.build_parser().parse_known_args(
        ["plan", "--model", "tiny", "--targets", TPU, "--search", "--search-start", "6", "--hbm-gib", "1",
         "--no-progress", "--in-process", "--out", str(tmp_path)])
    planner = plan.Planner(model="tiny", resolution=512, inputs="images", isolate=False)

    def fake_compile(target, batch, remat, dtype, regularized):
        total = (200 + 120 * batch) * 2**20  # 6 fits in 1 GiB (920 MiB), 7 does not
        return plan.Result(target=target.name, model="tiny", resolution=512, inputs="images", regularized=regularized,
                           remat=remat, compute_dtype=dtype, batch_per_device=batch, devices=target.devices,
                           total_bytes=total)

    planner._compile = fake_compile
    results, rows = plan.run(args, rest, planner=planner)
    assert rows[0]["tried"] == [6, 7] and rows[0]["max_batch"] == 6
    assert [r.fits for r in results] == [True, False]
    partial = json.loads((tmp_path / "plan.json").read_text())  # kept after each compile, for --reuse
    assert [r["batch_per_device"] for r in partial["results"]] == [6, 7] and not partial["complete"]
    args.search = False
    with pytest.raises(ValueError, match="--search-start B only applies to --search"):
        plan.run(args, rest, planner=planner)


def test_reuse_takes_earlier_compiles_of_the_same_config_only(tmp_path):
    """`plan --reuse`: a result of the same model/resolution/inputs and config digest is taken
    into the planner's cache; another digest, or an old file without one under a non-default
    config, is not."""
    p = plan.Planner(model="tiny", resolution=RES, inputs=INPUTS)
    want = p.digest("v5p-8", "none", "bfloat16")
    assert want != p.digest("v5p-8", "full", "bfloat16") != p.digest("v5p-8", "full", "float32")
    mk = lambda b, digest, **kw: dataclasses.replace(  # noqa: E731
        _fake("v5p-8", b), model="tiny", resolution=RES, inputs=INPUTS, config_digest=digest, **kw)
    taken = p.reuse([mk(1, want), mk(2, "0" * 12), mk(3, ""), mk(4, want, remat="full")], default_config=False)
    assert [r.batch_per_device for r in taken] == [1]
    assert p.reuse([mk(3, "")], default_config=True)[0].batch_per_device == 3
    assert set(p.cache) == {("v5p-8", 1, "none", "bfloat16", True), ("v5p-8", 3, "none", "bfloat16", True)}
    r = p.compile("v5p-8", 3, hbm_bytes=4 * plan.GiB)  # from the cache: judged against this run's HBM
    assert r.total_bytes == 5 * plan.GiB and not r.fits and r.config_digest == want


@compiles
def test_tpu_hbm_is_what_libtpu_allows():
    """A TPU target's HBM is the budget libtpu's compiler names when a program overflows it (a
    single-device program with 400 GiB of temporaries), so `fits` agrees with the compiler."""
    import re

    from smooth_jax import runtime

    f = jax.jit(lambda x: (jnp.sin(x) * jnp.cos(x[::-1])).sum())
    for name, t in plan.TARGETS.items():
        if t.platform != "tpu":
            continue
        x = jax.ShapeDtypeStruct((200 * plan.GiB // 4,), jnp.float32,
                                 sharding=jax.sharding.SingleDeviceSharding(plan.devices_for(t)[0]))
        with pytest.raises(Exception, match="exceeds available HBM") as err:
            runtime.compile_uncached(f.lower(x))
        available = float(re.search(r"available HBM \(([\d.]+)G\)", str(err.value)).group(1))
        assert t.hbm_bytes / plan.GiB == pytest.approx(available, abs=0.005), name
