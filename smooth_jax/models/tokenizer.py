"""Stable Diffusion's CLIP tokenizer, built offline.

SD-1.x uses OpenAI CLIP's byte-level BPE (49,408 tokens, 77-token context). The BPE merges ship
inside the ``clip-anytorch`` wheel as ``clip/bpe_simple_vocab_16e6.txt.gz``; from that one file we
rebuild exactly the vocabulary OpenAI's ``SimpleTokenizer`` builds and write it in the layout that
``transformers.CLIPTokenizer``/``CLIPTokenizerFast`` read (the files of SD-1.5's ``tokenizer/``
folder), so no network or hub access is needed.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 49408
MODEL_MAX_LENGTH = 77
# OpenAI keeps the first 49152 - 256 - 2 merge lines: 256 byte tokens, 256 `</w>` byte tokens,
# the merges and 2 specials add up to 49408 (the gz file holds many more merges than that).
NUM_MERGES = 49152 - 256 - 2

_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
_INSTALL_HINT = (
    "pip install --no-deps clip-anytorch==2.6.0, or pass a diffusers model folder with a "
    "tokenizer/ subfolder to load_clip_tokenizer(path)"
)


def _special(content: str) -> dict:
    # Same AddedToken fields as SD-1.5's tokenizer files (normalized=True there too).
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def bytes_to_unicode() -> dict[int, str]:
    """The 256-char byte alphabet of GPT-2/CLIP: byte value -> printable unicode char.

    Printable Latin-1 bytes map to themselves; the rest are shifted to chr(256+n) so the BPE never
    sees whitespace or control characters.
    """
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def find_bpe_file() -> Path:
    """Path of ``bpe_simple_vocab_16e6.txt.gz`` from the installed clip-anytorch package.

    ``find_spec`` locates the package without importing it: clip-anytorch is installed with
    --no-deps, so ``import clip`` would fail on its torch/torchvision imports.
    """
    for pkg in ("clip", "open_clip"):  # open_clip ships the identical file; a harmless fallback
        try:
            spec = importlib.util.find_spec(pkg)
        except (ImportError, ValueError):
            spec = None
        for loc in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(loc) / _BPE_FILE
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"CLIP BPE vocabulary {_BPE_FILE!r} not found. Fix: {_INSTALL_HINT}.")


def build_vocab_and_merges(bpe_path: str | os.PathLike) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Rebuild CLIP's vocab exactly as ``SimpleTokenizer.__init__`` does.

    Returns ``(vocab: token -> id, 49408 entries; merges: 48894 pairs in rank order)``.
    """
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is a header
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{bpe_path} is not the CLIP BPE file (expected {NUM_MERGES} merge pairs)")
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:  # duplicates would silently shift ids
        raise ValueError(f"rebuilt CLIP vocab has {len(vocab)} unique tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def _write_files(out_dir: Path, bpe_path: Path) -> None:
    vocab, merges = build_vocab_and_merges(bpe_path)
    with open(out_dir / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(out_dir / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)
    special_map = {
        "bos_token": _special(BOS_TOKEN),
        "eos_token": _special(EOS_TOKEN),
        "pad_token": EOS_TOKEN,  # SD pads with <|endoftext|> (id 49407)
        "unk_token": _special(EOS_TOKEN),
    }
    with open(out_dir / "special_tokens_map.json", "w", encoding="utf-8") as f:
        json.dump(special_map, f, indent=2)
    config = {
        "add_prefix_space": False,
        "bos_token": {"__type": "AddedToken", **_special(BOS_TOKEN)},
        "do_lower_case": True,
        "eos_token": {"__type": "AddedToken", **_special(EOS_TOKEN)},
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": EOS_TOKEN,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": {"__type": "AddedToken", **_special(EOS_TOKEN)},
    }
    with open(out_dir / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def _is_complete(d: Path) -> bool:
    return all((d / name).is_file() and (d / name).stat().st_size > 0 for name in _FILES)


def default_cache_dir() -> Path:
    """``$SMOOTH_JAX_CACHE/clip_tokenizer``, else ``~/.cache/smooth_jax/clip_tokenizer``."""
    root = os.environ.get("SMOOTH_JAX_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "smooth_jax"
    return base / "clip_tokenizer"


def clip_tokenizer_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder holding vocab.json/merges.txt/tokenizer_config.json/special_tokens_map.json.

    Builds it on first use and reuses it afterwards. Files are written into a temp dir next to the
    target and renamed into place, so a crash or a concurrent builder never leaves a folder that
    looks complete but is not; a half-written folder (from elsewhere) is detected and rebuilt.
    """
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if _is_complete(target):
        return target
    bpe_path = find_bpe_file()  # fail with the install hint before touching the cache
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache may be shared between users
        _write_files(tmp, bpe_path)
        if target.exists() and not _is_complete(target):
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process won the race; its folder is as good as ours if it is complete.
            if not _is_complete(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_clip_tokenizer(path: str | os.PathLike | None = None):
    """A ``transformers.CLIPTokenizerFast``.

    ``path``: a tokenizer folder (e.g. a diffusers model's ``tokenizer/``) or a diffusers model
    root containing ``tokenizer/``; ``None`` uses the offline-built SD-1.5 tokenizer.
    """
    from transformers import CLIPTokenizerFast  # heavy import, only when a tokenizer is wanted

    if path is None:
        folder = clip_tokenizer_dir()
        if not (folder / "tokenizer.json").exists():
            # transformers converts vocab.json/merges.txt to its fast format on every load (~3 s);
            # keep the converted file so later loads (every CLI command) skip that.
            tok = CLIPTokenizerFast.from_pretrained(str(folder), local_files_only=True)
            tmp = folder / f".tokenizer.json.{os.getpid()}.tmp"
            tok.backend_tokenizer.save(str(tmp))
            os.replace(tmp, folder / "tokenizer.json")
            return tok
    else:
        folder = Path(path).expanduser()
        if (folder / "tokenizer").is_dir():
            folder = folder / "tokenizer"
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
    return CLIPTokenizerFast.from_pretrained(str(folder), local_files_only=True)


def tokenize(tokenizer, prompts: Sequence[str], max_length: int = MODEL_MAX_LENGTH) -> np.ndarray:
    """Prompts -> input ids ``int32 [B, max_length]``, as SD pipelines feed the text encoder.

    ``[BOS, tokens..., EOS]`` padded to ``max_length`` with the pad token (EOS for SD-1.5) and
    truncated to ``max_length`` keeping the final EOS.
    """
    if isinstance(prompts, str):  # list(str) would split one prompt into characters
        prompts = [prompts]
    enc = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="np")
    return np.asarray(enc["input_ids"], dtype=np.int32)
