"""configs/*.py and --config.* overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from smooth_jax import config_loader

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.py") if p.name != "__init__.py"))
def test_every_config_loads_with_a_consistent_batch(name):
    c = config_loader.load_config(ROOT / "configs" / name)
    if name == "demo.py":  # the main job: a base-model config, a LoRA train config and eval settings
        assert dict(c.models) == {"plain": 0.0, "smooth": 1.0} and c.lora.objective.reg_weight == 1.0
        c = c.lora
    if name == "digits_base.py":  # the base model's own schema (smooth_jax.base_model)
        from smooth_jax import base_model

        assert c.to_dict() == base_model.default_config().to_dict()
        return
    assert c.train.batch_size % c.train.grad_accum == 0
    if name.startswith("sd15"):
        assert (c.lora.rank, c.lora.alpha, c.train.lr, c.objective.reg_weight, c.objective.ema_decay) == (8, 8.0, 1e-4, 1.0, 0.01)
        assert c.train.batch_size == 96 and c.train.steps == 30_000 and c.data.resolution == 512
        data = c.mesh.shape["data"]
        if data > 0:  # the per-device micro-batch is whole
            assert (c.train.batch_size // c.train.grad_accum) % data == 0


def test_overrides_parse_by_field_type():
    c = config_loader.load_config(ROOT / "configs" / "tiny.py")
    config_loader.apply_overrides(c, ["--config.train.lr=3e-4", "--config.train.steps", "7", "--config.data.center_crop=true",
                                      "--config.model=/data/sd15", "--config.mesh.shape={'data': 2, 'fsdp': 4}",
                                      "--config.export.formats=('kohya',)", "--config.train.lr=1"])
    assert c.train.lr == 1.0 and isinstance(c.train.lr, float) and c.train.steps == 7
    assert c.data.center_crop is True and c.model == "/data/sd15"
    assert dict(c.mesh.shape) == {"data": 2, "fsdp": 4} and tuple(c.export.formats) == ("kohya",)


@pytest.mark.parametrize("arg,message", [
    ("--config.train.learning_rate=1", "no such field"),
    ("--config.nosection.x=1", "not a config section"),
    ("--config.train.steps=many", "not a valid int"),
    ("--config.data.center_crop=maybe", "expected true or false"),
    ("--config.train.steps=1.5", "the field is a int"),
    ("--lr=1", "Unexpected argument"),
])
def test_bad_overrides_name_the_key(arg, message):
    c = config_loader.load_config(ROOT / "configs" / "tiny.py")
    with pytest.raises(ValueError, match=message):
        config_loader.apply_overrides(c, [arg])


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="nope.py"):
        config_loader.load_config(ROOT / "configs" / "nope.py")
