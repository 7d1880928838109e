"""LoRA <-> safetensors: round trips, exact key names (DESIGN.md §3), atomic writes, bad inputs."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from safetensors import numpy as st_numpy

from smooth_jax import export
from smooth_jax import lora as lora_lib

RANK = 4
ATTN = "down_blocks_0/attentions_0/transformer_blocks_0"
# (module path, in, out): self- and cross-attention projections in three blocks, varied dims.
MODULES = [
    (f"{ATTN}/attn1/to_q", 32, 32),
    (f"{ATTN}/attn1/to_k", 32, 32),
    (f"{ATTN}/attn1/to_v", 32, 32),
    (f"{ATTN}/attn1/to_out_0", 32, 32),
    (f"{ATTN}/attn2/to_q", 32, 32),
    (f"{ATTN}/attn2/to_k", 24, 32),
    (f"{ATTN}/attn2/to_v", 24, 32),
    (f"{ATTN}/attn2/to_out_0", 32, 32),
    ("mid_block/attentions_0/transformer_blocks_0/attn1/to_q", 64, 64),
    ("mid_block/attentions_0/transformer_blocks_0/attn1/to_out_0", 64, 64),
    ("up_blocks_1/attentions_2/transformer_blocks_0/attn2/to_k", 24, 48),
    ("up_blocks_1/attentions_2/transformer_blocks_0/attn2/to_out_0", 48, 48),
]
PEFT_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
PEFT_OUT = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
LEGACY_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora"
LEGACY_OUT = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora"
KOHYA_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
KOHYA_OUT = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"


def make_tree(rank=RANK, dtype=np.float32, seed=0, modules=MODULES):
    rng = np.random.default_rng(seed)
    flat = {}
    for path, d_in, d_out in modules:
        flat[f"{path}/down"] = rng.standard_normal((d_in, rank)).astype(dtype)
        flat[f"{path}/up"] = rng.standard_normal((rank, d_out)).astype(dtype)
    return lora_lib.unflatten(flat)


def make_file(alpha=float(RANK), **kw):
    return export.LoraFile(lora=make_tree(**kw), alpha=alpha, base_model="tiny")


def assert_trees_equal(a, b):
    fa, fb = lora_lib.flatten(a), lora_lib.flatten(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        assert fa[k].shape == fb[k].shape, k
        assert np.array_equal(fa[k], fb[k]), k


def deltas(lf):
    mods = lora_lib.modules(lf.lora)
    return {m: d.astype(np.float64) @ u.astype(np.float64) * lf.scale for m, (d, u) in mods.items()}


def write_raw(path, tensors, metadata=None):
    path.write_bytes(st_numpy.save(tensors, metadata=metadata))
    return path


def saved_tensors(lf, fmt):
    return export.to_state_dict(lf, fmt)[0]


# --- round trips


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_round_trip_alpha_equals_rank(tmp_path, fmt):
    lf = make_file()
    path = export.save(tmp_path / f"lora_{fmt}.safetensors", lf, fmt)
    back = export.load(path)
    assert_trees_equal(lf.lora, back.lora)
    assert back.alpha == RANK and back.rank == RANK
    assert back.format == fmt
    assert back.targets == lf.targets
    assert back.base_model == "tiny"


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
@pytest.mark.parametrize("alpha", [1.0, 16.0, 0.3])
def test_round_trip_keeps_alpha(tmp_path, fmt, alpha):
    lf = make_file(alpha=alpha)
    back = export.load(export.save(tmp_path / "l.safetensors", lf, fmt))
    assert_trees_equal(lf.lora, back.lora)
    assert back.alpha == alpha


def test_float16_is_kept(tmp_path):
    lf = make_file(dtype=np.float16)
    for fmt in export.FORMATS:
        back = export.load(export.save(tmp_path / f"{fmt}.safetensors", lf, fmt))
        assert_trees_equal(lf.lora, back.lora)


def test_legacy_folds_scale_into_up(tmp_path):
    lf = make_file(alpha=2.0)  # scale 0.5, which the legacy format cannot store
    first = export.save(tmp_path / "a.safetensors", lf, "legacy")
    back = export.load(first)
    assert back.alpha == back.rank == RANK
    assert back.metadata["smooth_jax.folded_scale"] == repr(0.5)
    want, got = deltas(lf), deltas(back)
    for m in want:
        np.testing.assert_allclose(got[m], want[m], rtol=1e-6, atol=1e-6)
    # The down halves are stored untouched; only up carries the scale.
    for m, (down, _) in lora_lib.modules(lf.lora).items():
        assert np.array_equal(lora_lib.modules(back.lora)[m][0], down)
    # Saving what was read gives the same tensors again.
    second = export.save(tmp_path / "b.safetensors", back, "legacy")
    t1, t2 = st_numpy.load_file(str(first)), st_numpy.load_file(str(second))
    assert sorted(t1) == sorted(t2)
    for k in t1:
        assert t1[k].dtype == t2[k].dtype and np.array_equal(t1[k], t2[k]), k


def test_legacy_without_our_metadata_means_scale_one(tmp_path):
    tensors = saved_tensors(make_file(alpha=1.0), "legacy")
    assert export.from_state_dict(tensors, {}).alpha == RANK


@pytest.mark.parametrize("src", export.FORMATS)
@pytest.mark.parametrize("dst", export.FORMATS)
def test_convert_all_pairs(tmp_path, src, dst):
    lf = make_file()
    a = export.save(tmp_path / "in.safetensors", lf, src)
    read = export.convert(a, tmp_path / "out" / "x.safetensors", dst)
    assert read.format == src
    back = export.load(tmp_path / "out" / "x.safetensors")
    assert back.format == dst
    assert_trees_equal(lf.lora, back.lora)
    assert back.alpha == lf.alpha


def test_mixed_ranks_keep_one_scale(tmp_path):
    extra = [("up_blocks_1/attentions_2/transformer_blocks_0/attn1/to_q", 48, 48)]
    tree = lora_lib.unflatten({**lora_lib.flatten(make_tree()), **lora_lib.flatten(make_tree(rank=8, modules=extra))})
    lf = export.LoraFile(lora=tree, alpha=2.0)
    assert lf.rank == RANK
    for fmt in ("peft", "kohya"):
        tensors, meta = export.to_state_dict(lf, fmt)
        meta = {k: v for k, v in meta.items() if not k.startswith("smooth_jax.")}
        back = export.from_state_dict(tensors, meta)  # alpha from the format's own fields
        assert back.alpha == 2.0
        assert_trees_equal(lf.lora, back.lora)
    config = json.loads(export.to_state_dict(lf, "peft")[1]["lora_adapter_metadata"])
    name = "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_q"
    assert config["unet.rank_pattern"] == {name: 8}
    assert config["unet.alpha_pattern"] == {name: 4}  # scale 0.5 at rank 8


# --- exact names and layout (DESIGN.md §3)


def test_peft_keys_and_shapes():
    lf = make_file()
    down, up = lora_lib.modules(lf.lora)[f"{ATTN}/attn1/to_q"]
    t = saved_tensors(lf, "peft")
    assert t[f"{PEFT_Q}.lora_A.weight"].shape == (RANK, 32)
    assert t[f"{PEFT_Q}.lora_B.weight"].shape == (32, RANK)
    assert np.array_equal(t[f"{PEFT_Q}.lora_A.weight"], down.T)
    assert np.array_equal(t[f"{PEFT_Q}.lora_B.weight"], up.T)
    assert f"{PEFT_OUT}.lora_A.weight" in t
    cross = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    assert t[f"{cross}.lora_A.weight"].shape == (RANK, 24)
    assert len(t) == 2 * len(MODULES)
    assert list(t) == sorted(t)
    assert all(v.flags.c_contiguous for v in t.values())


def test_legacy_keys_and_shapes():
    t = saved_tensors(make_file(), "legacy")
    assert t[f"{LEGACY_Q}.down.weight"].shape == (RANK, 32)
    assert t[f"{LEGACY_Q}.up.weight"].shape == (32, RANK)
    assert f"{LEGACY_OUT}.down.weight" in t and f"{LEGACY_OUT}.up.weight" in t
    assert len(t) == 2 * len(MODULES)


def test_kohya_keys_and_shapes():
    t = saved_tensors(make_file(alpha=2.0), "kohya")
    assert t[f"{KOHYA_Q}.lora_down.weight"].shape == (RANK, 32)
    assert t[f"{KOHYA_Q}.lora_up.weight"].shape == (32, RANK)
    alpha = t[f"{KOHYA_Q}.alpha"]
    assert alpha.shape == () and alpha.dtype == np.float32 and float(alpha) == 2.0
    assert f"{KOHYA_OUT}.lora_down.weight" in t
    assert len(t) == 3 * len(MODULES)


def test_peft_metadata_is_what_diffusers_reads():
    lf = make_file(alpha=8.0)
    _, meta = export.to_state_dict(lf, "peft")
    assert meta["format"] == "pt"
    config = json.loads(meta["lora_adapter_metadata"])
    # diffusers keeps the keys with the "unet." prefix, strips it, and calls LoraConfig(**rest).
    assert all(k.startswith("unet.") for k in config)
    assert config["unet.r"] == RANK
    assert config["unet.lora_alpha"] == 8
    assert config["unet.rank_pattern"] == {} and config["unet.alpha_pattern"] == {}
    assert PEFT_OUT.removeprefix("unet.") in config["unet.target_modules"]
    assert len(config["unet.target_modules"]) == len(MODULES)
    for key in ("rank", "alpha", "targets", "base_model", "format", "version"):
        assert f"smooth_jax.{key}" in meta
    assert json.loads(meta["smooth_jax.targets"]) == list(lora_lib.DEFAULT_TARGETS)


def test_alpha_from_diffusers_metadata_alone():
    tensors, meta = export.to_state_dict(make_file(alpha=1.0), "peft")
    back = export.from_state_dict(tensors, {"lora_adapter_metadata": meta["lora_adapter_metadata"]})
    assert back.alpha == 1.0
    assert back.targets == lora_lib.DEFAULT_TARGETS
    assert export.from_state_dict(tensors, {}).alpha == RANK  # no metadata: scale 1, as diffusers


def test_alpha_from_kohya_tensors_alone():
    tensors = saved_tensors(make_file(alpha=1.0), "kohya")
    assert export.from_state_dict(tensors, None).alpha == 1.0


@pytest.mark.parametrize("prefix", ["unet.", "", "base_model.model."])
def test_peft_prefixes(prefix):
    lf = make_file()
    tensors = {prefix + k.removeprefix("unet."): v for k, v in saved_tensors(lf, "peft").items()}
    back = export.from_state_dict(tensors, {})
    assert_trees_equal(lf.lora, back.lora)


def test_peft_default_adapter_keys():
    lf = make_file()
    tensors = {k.replace(".weight", ".default.weight"): v for k, v in saved_tensors(lf, "peft").items()}
    assert_trees_equal(lf.lora, export.from_state_dict(tensors, {}).lora)


def test_legacy_with_unet_prefix():
    lf = make_file()
    tensors = {"unet." + k: v for k, v in saved_tensors(lf, "legacy").items()}
    assert_trees_equal(lf.lora, export.from_state_dict(tensors, {}).lora)


def test_bfloat16_file_is_read_as_float32(tmp_path):
    values = np.array([[1.0, -2.5], [0.15625, 3.0]], np.float32)  # exact in bfloat16
    bf16 = (values.view(np.uint32) >> 16).astype("<u2")
    tensors = {f"{PEFT_Q}.lora_A.weight": values, f"{PEFT_Q}.lora_B.weight": values}
    header = {k: {"dtype": "BF16", "shape": [2, 2], "data_offsets": [8 * i, 8 * i + 8]} for i, k in enumerate(tensors)}
    blob = json.dumps(header).encode()
    path = tmp_path / "bf16.safetensors"
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + bf16.tobytes() * 2)
    down, up = lora_lib.modules(export.load(path).lora)[f"{ATTN}/attn1/to_q"]
    assert down.dtype == np.float32 and np.array_equal(down, values.T) and np.array_equal(up, values.T)


# --- kohya names


def test_kohya_grammar_resolves_names():
    lf = make_file()
    back = export.from_state_dict(saved_tensors(lf, "kohya"), {})
    assert sorted(lora_lib.modules(back.lora)) == sorted(lora_lib.modules(lf.lora))


@pytest.mark.parametrize(
    "name, path",
    [
        (
            "mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
            "mid_block/attentions_0/transformer_blocks_0/ff/net_0/proj",
        ),
        ("up_blocks_3_attentions_1_proj_in", "up_blocks_3/attentions_1/proj_in"),
        ("down_blocks_1_resnets_0_time_emb_proj", "down_blocks_1/resnets_0/time_emb_proj"),
        ("time_embedding_linear_1", "time_embedding/linear_1"),
    ],
)
def test_kohya_grammar_other_modules(name, path):
    assert export._parse_unet_name(name) == [path]


def test_kohya_names_from_module_names():
    # A module the grammar does not know: resolvable only through the base model's names.
    odd = "custom_block_0/my_proj"
    tree = make_tree(modules=[(odd, 8, 8)])
    tensors = saved_tensors(export.LoraFile(lora=tree, alpha=4.0, targets=(odd,)), "kohya")
    assert "lora_unet_custom_block_0_my_proj.lora_down.weight" in tensors
    with pytest.raises(ValueError, match="lora_unet_custom_block_0_my_proj.*pass the base model"):
        export.from_state_dict(tensors, {}, source="odd.safetensors")
    names = [f"{odd}/kernel", f"{odd}/bias", "custom_block_0/other/kernel"]
    back = export.from_state_dict(tensors, {}, module_names=names)
    assert_trees_equal(tree, back.lora)


# --- atomic writes


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("where", ["serialize", "fsync", "replace"])
def test_failed_write_leaves_nothing(tmp_path, monkeypatch, where):
    target = tmp_path / "lora.safetensors"

    def boom(*args, **kwargs):
        raise OSError(f"simulated failure in {where}")

    patch = {"serialize": (st_numpy, "save"), "fsync": (os, "fsync"), "replace": (os, "replace")}[where]
    monkeypatch.setattr(*patch, boom)
    with pytest.raises(OSError, match="simulated"):
        export.save(target, make_file(), "peft")
    assert _leftovers(tmp_path) == []


def test_failed_write_keeps_existing_file(tmp_path, monkeypatch):
    target = export.save(tmp_path / "lora.safetensors", make_file(seed=1), "kohya")
    before = target.read_bytes()
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("simulated")))
    with pytest.raises(OSError):
        export.save(target, make_file(seed=2), "peft")
    assert target.read_bytes() == before
    assert _leftovers(tmp_path) == ["lora.safetensors"]


def test_save_creates_parents_and_overwrites(tmp_path):
    target = tmp_path / "a" / "b" / "lora.safetensors"
    export.save(target, make_file(seed=1))
    export.save(target, make_file(seed=2))
    assert_trees_equal(export.load(target).lora, make_tree(seed=2))
    assert _leftovers(target.parent) == ["lora.safetensors"]


# --- bad inputs


def test_missing_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        export.load(path)


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(ValueError, match="junk.safetensors.*not a valid"):
        export.load(path)


def test_empty_file(tmp_path):
    path = write_raw(tmp_path / "empty.safetensors", {})
    with pytest.raises(ValueError, match="empty.safetensors.*no tensors"):
        export.load(path)


def _bad(tmp_path, tensors, match):
    path = write_raw(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(ValueError, match=match) as info:
        export.load(path)
    assert "bad.safetensors" in str(info.value)


W = np.ones((RANK, 8), np.float32)
WT = np.ones((8, RANK), np.float32)


def test_unknown_key(tmp_path):
    _bad(tmp_path, {f"{PEFT_Q}.lora_A.weight": W, "model.diffusion_model.weird": W}, "model.diffusion_model.weird")


def test_mixed_formats(tmp_path):
    tensors = {f"{PEFT_Q}.lora_A.weight": W, f"{PEFT_Q}.lora_B.weight": WT, f"{KOHYA_Q}.lora_down.weight": W}
    _bad(tmp_path, tensors, f"mix LoRA formats.*{KOHYA_Q}")


def test_down_without_up(tmp_path):
    _bad(tmp_path, {f"{LEGACY_Q}.down.weight": W}, f"{LEGACY_Q}.down.weight.*no matching 'up'")


def test_up_without_down(tmp_path):
    _bad(tmp_path, {f"{KOHYA_Q}.lora_up.weight": WT}, f"{KOHYA_Q}.lora_up.weight.*no matching 'down'")


def test_rank_mismatch(tmp_path):
    tensors = {f"{PEFT_Q}.lora_A.weight": W, f"{PEFT_Q}.lora_B.weight": np.ones((8, RANK + 1), np.float32)}
    _bad(tmp_path, tensors, f"{PEFT_Q}.lora_A.weight.*rank 4.*{PEFT_Q}.lora_B.weight.*rank 5")


def test_non_2d_tensor(tmp_path):
    conv = np.ones((RANK, 8, 3, 3), np.float32)
    tensors = {f"{KOHYA_Q}.lora_down.weight": conv, f"{KOHYA_Q}.lora_up.weight": WT}
    _bad(tmp_path, tensors, f"{KOHYA_Q}.lora_down.weight.*2-D")


@pytest.mark.parametrize(
    "key",
    [
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
    ],
)
def test_text_encoder_key(tmp_path, key):
    _bad(tmp_path, {f"{PEFT_Q}.lora_A.weight": W, f"{PEFT_Q}.lora_B.weight": WT, key: W}, f"{key}.*text encoder")


def test_ldm_kohya_key(tmp_path):
    key = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight"
    _bad(tmp_path, {key: W}, f"{key}.*not supported")


def test_kohya_alphas_differ(tmp_path):
    tensors = saved_tensors(make_file(), "kohya")
    tensors[f"{KOHYA_OUT}.alpha"] = np.asarray(1.0, np.float32)
    _bad(tmp_path, tensors, f"different LoRA scales.*{KOHYA_OUT}.alpha")


def test_kohya_unparseable_name(tmp_path):
    key = "lora_unet_down_blocks_0_attentions_0_frobnicator.lora_down.weight"
    _bad(tmp_path, {key: W, key.replace("down.", "up."): WT}, f"{key}.*pass the base model")


def test_legacy_rejects_other_modules():
    tree = make_tree(modules=[("mid_block/attentions_0/proj_in", 8, 8)])
    with pytest.raises(ValueError, match="mid_block/attentions_0/proj_in"):
        export.to_state_dict(export.LoraFile(lora=tree, alpha=4.0), "legacy")


def test_unknown_format():
    with pytest.raises(ValueError, match="'ckpt'"):
        export.to_state_dict(make_file(), "ckpt")


def test_check_against():
    lf = make_file()
    shapes = {}
    for path, d_in, d_out in MODULES:
        node = shapes
        for part in path.split("/"):
            node = node.setdefault(part, {})
        node["kernel"] = np.zeros((d_in, d_out))
    export.check_against(lf, shapes, "x.safetensors")
    shapes["mid_block"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"] = np.zeros((64, 32))
    with pytest.raises(ValueError, match="x.safetensors.*mid_block"):
        export.check_against(lf, shapes, "x.safetensors")


# --- diffusers (PyTorch) reads what we write, at the right scale


@pytest.mark.torch
@pytest.mark.filterwarnings("ignore:.*load_attn_procs.*:FutureWarning")
@pytest.mark.parametrize("fmt, alpha", [("peft", 2.0), ("kohya", 2.0), ("legacy", 2.0)])
def test_diffusers_applies_our_scale(tmp_path, fmt, alpha):
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    from peft.tuners.lora import LoraLayer

    from smooth_jax.models import naming

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, layers_per_block=1, block_out_channels=(32, 64), cross_attention_dim=24,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8, norm_num_groups=32,
    )
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    rng = np.random.default_rng(0)
    flat = {}
    for name, mod in unet.named_modules():
        if isinstance(mod, torch.nn.Linear) and re.search(r"\.attn[12]\.(to_[qkv]|to_out\.0)$", name):
            flat[naming.torch_to_flax(name) + "/down"] = rng.standard_normal((mod.in_features, RANK)).astype(np.float32)
            flat[naming.torch_to_flax(name) + "/up"] = rng.standard_normal((RANK, mod.out_features)).astype(np.float32)
    lf = export.LoraFile(lora=lora_lib.unflatten(flat), alpha=alpha)
    path = export.save(tmp_path / "lora.safetensors", lf, fmt)

    if fmt == "legacy":  # what the authors' release is loaded with
        unet.load_attn_procs(str(tmp_path), weight_name=path.name)
    else:  # what StableDiffusionPipeline.load_lora_weights does
        loader = StableDiffusionLoraLoaderMixin
        state_dict, alphas, metadata = loader.lora_state_dict(str(path), return_lora_metadata=True)
        loader.load_lora_into_unet(state_dict, alphas, unet, metadata=metadata)
    layers = {name: mod for name, mod in unet.named_modules() if isinstance(mod, LoraLayer)}
    assert len(layers) == len(flat) // 2
    want = {m: (d @ u * lf.scale).T for m, (d, u) in lora_lib.modules(lf.lora).items()}
    for name, mod in layers.items():
        mod.merge()
        got = mod.get_base_layer().weight.detach().numpy() - base[f"{name}.weight"].numpy()
        np.testing.assert_allclose(got, want[naming.torch_to_flax(name)], atol=1e-5, err_msg=name)


def test_native_msgpack_round_trip_and_errors(tmp_path):
    lf = make_file(alpha=2.0)
    path = export.save_native(tmp_path / "l.msgpack", lf)
    back = export.read_any(path)
    assert_trees_equal(lf.lora, back.lora)
    assert (back.alpha, back.targets, back.base_model, back.format) == (2.0, lf.targets, "tiny", "native")
    (tmp_path / "bad.msgpack").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="bad.msgpack"):
        export.read_any(tmp_path / "bad.msgpack")
    with pytest.raises(FileNotFoundError, match="missing.msgpack"):
        export.read_any(tmp_path / "missing.msgpack")
