"""Evaluation runs: ``smooth-jax eval istd | reconstruct | edit`` (and ``python eval/<run>.py``).

Each run compares several models (the base model and any number of LoRAs) on the same prompts,
noises and images, and writes ``results.json``, a paper-style ``results.md`` and PNG grids to
``--out``; it is resumable (see ``report.py``).

- ``istd.py``: Table 1, ISTD (+ FID, CLIP score with their weights);
- ``reconstruct.py``: Table 2, DDIM inversion / NTI reconstruction MSE, PSNR, SSIM (+ LPIPS);
- ``edit.py``: NTI + prompt-switch editing, with grids and preservation / CLIP metrics;
- ``inputs.py``: models, LoRAs, prompts, images, metric networks, and their options;
- ``report.py``: the output folder, resuming, summaries and tables.

Every run is also a function, ``<run>.run(config, out)``, with ``<run>.default_config()``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` command, with ``istd``, ``reconstruct`` and ``edit`` under it, to a
    ``smooth-jax`` subparsers object. Each sets ``fn(args) -> int``."""
    from smooth_jax.evaluation import edit, istd, reconstruct

    p = subparsers.add_parser("eval", help="evaluation runs: istd (Table 1), reconstruct (Table 2), edit",
                              description="Evaluation runs that compare the base model and LoRAs and write "
                                          "results.json, results.md and PNG grids to --out (resumable).")
    sub = p.add_subparsers(dest="eval_command", required=True)
    for module in (istd, reconstruct, edit):
        q = sub.add_parser(module.RUN, help=module.HELP, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(q)
        q.set_defaults(fn=module.command)
    return p


def run_main(name: str, add_arguments: Callable, command: Callable, argv: list[str] | None = None) -> int:
    """``python eval/<name>.py``: the same options and errors as ``smooth-jax eval <name>``."""
    parser = argparse.ArgumentParser(prog=f"eval/{name}.py", description=sys.modules[command.__module__].__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    from smooth_jax import runtime

    runtime.setup()
    try:
        return command(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"eval/{name}.py: error: {e}", file=sys.stderr)
        return 2
