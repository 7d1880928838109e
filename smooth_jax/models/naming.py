"""Module names in the two worlds: Flax param paths and PyTorch state-dict keys.

A Flax path is '/'-joined, e.g. ``down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_out_0``;
the PyTorch module name of the same layer is ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0``.
diffusers' Flax port turns every ``ModuleList`` index into a ``_N`` suffix, so the mapping is a
rule with one family of exceptions: attributes whose own name ends in ``_N`` (``linear_1``).
"""

from __future__ import annotations

import re

# PyTorch attribute names that really end in _<digit>; their suffix is not a ModuleList index.
_TORCH_NAMES_WITH_DIGIT_SUFFIX = re.compile(r"^(linear_\d+)$")
_INDEXED = re.compile(r"^(.*)_(\d+)$")


def flax_to_torch(path: str) -> str:
    """``'down_blocks_0/attn1/to_out_0'`` -> ``'down_blocks.0.attn1.to_out.0'``."""
    parts = []
    for part in path.split("/"):
        m = _INDEXED.match(part)
        if m and not _TORCH_NAMES_WITH_DIGIT_SUFFIX.match(part):
            parts.extend([m.group(1), m.group(2)])
        else:
            parts.append(part)
    return ".".join(parts)


def torch_to_flax(name: str) -> str:
    """``'down_blocks.0.attn1.to_out.0'`` -> ``'down_blocks_0/attn1/to_out_0'`` (diffusers Flax naming)."""
    out: list[str] = []
    for part in name.split("."):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return "/".join(out)
