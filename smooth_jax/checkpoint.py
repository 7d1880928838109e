"""Orbax checkpoints of a training run, as named items.

    lora       the LoRA tree (the only trained params)
    opt_state  optax state
    ema        {"a": EMA of the regularizer norm, "step", "rng"}
    data_iter  grain iterator state, one file per process
    config     the run's config (JSON), so a checkpoint alone can be exported

Saving is asynchronous (the step loop goes on while the files are written) and keeps the last N.
A checkpoint written by a multi-host run is read by a single process too (``restore_lora``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

CKPT_DIR = "checkpoints"


def _grain_args():
    import grain

    return grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` with the run's items."""

    def __init__(self, workdir: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(workdir).absolute() / CKPT_DIR
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iter: Any, config: dict, *, force: bool = False) -> bool:
        """Start saving ``state`` (a TrainState) at ``step``; returns whether a save was started."""
        save_iter, _ = _grain_args()
        items = dict(
            lora=ocp.args.StandardSave(state.lora),
            opt_state=ocp.args.StandardSave(state.opt_state),
            ema=ocp.args.StandardSave({"a": state.ema_a, "step": state.step, "rng": state.rng}),
            config=ocp.args.JsonSave(config),
        )
        if data_iter is not None:
            items["data_iter"] = save_iter(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: Any, data_iter: Any) -> dict:
        """Restore into the shapes/shardings of ``abstract_state``; ``data_iter`` is restored in place."""
        _, restore_iter = _grain_args()
        items = dict(
            lora=ocp.args.StandardRestore(abstract_state.lora),
            opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
            ema=ocp.args.StandardRestore({"a": abstract_state.ema_a, "step": abstract_state.step, "rng": abstract_state.rng}),
        )
        if data_iter is not None:
            items["data_iter"] = restore_iter(data_iter)
        return self.manager.restore(step, args=ocp.args.Composite(**items))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def resolve(path: str | Path) -> tuple[Path, int]:
    """``WORKDIR``, ``WORKDIR/checkpoints`` or ``WORKDIR/checkpoints/STEP`` (or ``WORKDIR/STEP``)
    -> (checkpoints folder, step); the latest step when none is named."""
    path = Path(path).absolute()
    if path.name.isdigit() and path.is_dir():
        return path.parent, int(path.name)
    folder = path if path.name == CKPT_DIR else path / CKPT_DIR
    if not folder.is_dir():
        raise FileNotFoundError(f"No checkpoints under {str(path)!r} (looked for {str(folder)!r}).")
    steps = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / "lora").exists())
    if not steps:
        raise FileNotFoundError(f"{str(folder)!r} holds no finished checkpoint.")
    return folder, steps[-1]


def restore_lora(path: str | Path) -> tuple[dict, dict, int]:
    """The LoRA (numpy) and config of a checkpoint, without the base model or the run's mesh.

    Works for checkpoints from any topology: arrays come back as host numpy arrays.
    Returns (lora tree, config dict, step).
    """
    folder, step = resolve(path)
    step_dir = folder / str(step)
    config = json.loads((step_dir / "config" / "metadata").read_text()) if (step_dir / "config" / "metadata").exists() else None
    if config is None:
        with ocp.CheckpointManager(folder) as mngr:
            config = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    checkpointer = ocp.PyTreeCheckpointer()
    # Reading one item of a step directly: orbax warns that the step-level metadata is not in
    # the item's folder, which is expected here.
    logging.getLogger("absl").setLevel(logging.ERROR)
    meta = checkpointer.metadata(step_dir / "lora")
    tree_meta = meta.item_metadata if hasattr(meta, "item_metadata") else meta
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree_meta.tree if hasattr(tree_meta, "tree") else tree_meta)
    lora = checkpointer.restore(step_dir / "lora", args=ocp.args.PyTreeRestore(restore_args=restore_args))
    return jax.tree_util.tree_map(np.asarray, lora), config, step
