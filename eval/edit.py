#!/usr/bin/env python
"""`smooth-jax eval edit` as a script: `python eval/edit.py --help` (same options, same code)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # works from a checkout without installing

from smooth_jax.evaluation import edit  # noqa: E402

if __name__ == "__main__":
    sys.exit(edit.main())
