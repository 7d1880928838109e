"""Input pipeline: sources, preprocessing, bad records, sharding, checkpointing, caching.

Everything is numpy + PIL + grain; no JAX computation. Expected values come from independent
computations (PIL directly, scikit-learn's arrays, the tokenizer called directly).
"""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from smooth_jax.data import (
    BadRecordError,
    CachedSource,
    DigitsSource,
    ImageFolderSource,
    TfdsSource,
    cache_encodings,
    default_data_config,
    make_single_pass_iterator,
    make_source,
    make_train_iterator,
)
from smooth_jax.models.tokenizer import tokenize

RES = 16
BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def tok():
    from smooth_jax.models.tokenizer import load_clip_tokenizer

    return load_clip_tokenizer()


def _config(**overrides):
    c = default_data_config()
    c.update(overrides)
    return c


def _iterator(cfg, tok, batch=4, seed=0, index=0, count=1):
    return make_train_iterator(cfg, tok, global_batch_size=batch, seed=seed, process_index=index, process_count=count)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def _rng_image(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_metadata(folder, rows):
    """rows: dicts (json-dumped) or raw strings (written as they are)."""
    with open(folder / "metadata.jsonl", "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")


def _expected_rgb(path):
    """Independent reading: PIL convert('RGB'), except 16-bit grayscale scaled by 255/65535."""
    with Image.open(path) as img:
        if img.mode.startswith("I"):
            a = np.asarray(img).astype(np.float64)
            g = np.round(a * 255 / 65535).astype(np.uint8)
            return Image.fromarray(np.stack([g] * 3, -1))
        return img.convert("RGB")


def _expected_center(path, size):
    """PIL-only resize (shorter side -> size, bilinear) + center crop, as float32 CHW [-1,1]."""
    img = _expected_rgb(path)
    w, h = img.size
    nw, nh = (size, size * h // w) if w <= h else (size * w // h, size)
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = round((nw - size) / 2), round((nh - size) / 2)
    a = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32)
    return a.transpose(2, 0, 1) / 127.5 - 1


# ---------------------------------------------------------------------------------------------
# Fixtures: an image folder with assorted sizes and modes, and one with bad records


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    rng = np.random.default_rng(0)
    specs = [  # file_name, (h, w), mode, format
        ("a.png", (30, 40), "RGB", "PNG"),
        ("b.jpg", (50, 30), "RGB", "JPEG"),
        ("sub/c.png", (36, 36), "L", "PNG"),
        ("d.png", (40, 50), "RGBA", "PNG"),
        ("e.png", (45, 33), "P", "PNG"),
        ("f.png", (48, 32), "I;16", "PNG"),
        ("g.jpg", (40, 40), "CMYK", "JPEG"),
        ("h.png", (20, 26), "LA", "PNG"),
    ]
    rows = []
    for i, (name, (h, w), mode, fmt) in enumerate(specs):
        rgb = _rng_image(rng, h, w)
        if mode == "I;16":
            img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
        elif mode == "P":
            img = Image.fromarray(rgb).quantize(16)
        elif mode == "RGBA":
            img = Image.fromarray(np.concatenate([rgb, rng.integers(0, 256, (h, w, 1), dtype=np.uint8)], -1))
        else:
            img = Image.fromarray(rgb).convert(mode)
        img.save(root / name, format=fmt)
        key = "text" if i == 3 else "caption"  # both caption keys are accepted
        rows.append({"file_name": name, key: f"photo number {i}"})
    _write_metadata(root, rows)
    return root


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(_rng_image(rng, 20, 24)).save(root / f"good{i}.png")
    Image.fromarray(_rng_image(rng, 20, 24)).save(root / "nocap.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    buf = io.BytesIO()
    Image.fromarray(_rng_image(rng, 64, 64)).save(buf, format="JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    Image.fromarray(rng.standard_normal((20, 20)).astype(np.float32)).save(root / "float.tif")
    _write_metadata(
        root,
        [
            {"file_name": "good0.png", "caption": "good zero"},
            {"file_name": "corrupt.png", "caption": "corrupt"},
            '{"file_name": "good9.png", "caption": oops}',  # line 3: bad JSON
            {"file_name": "good1.png", "caption": "good one"},
            {"file_name": "missing.png", "caption": "no such file"},
            {"file_name": "nocap.png"},  # line 6: no caption
            {"file_name": "good2.png", "caption": "good two"},
            {"file_name": "truncated.jpg", "caption": "truncated"},
            {"file_name": "float.tif", "caption": "float image"},
            {"file_name": "good3.png", "caption": "good three"},
        ],
    )
    return root


BAD_PATHS = ("corrupt.png", "metadata.jsonl:3", "missing.png", "nocap.png", "truncated.jpg", "float.tif")


# ---------------------------------------------------------------------------------------------
# Digits


def test_digits_source_records():
    from sklearn.datasets import load_digits

    digits = load_digits()
    src = DigitsSource()
    assert len(src) == 1797
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for i in (0, 7, 17, 1796):
        rec = src[i]
        assert rec["caption"] == f"a handwritten digit {names[digits.target[i]]}"
        assert rec["image"].shape == (8, 8, 3) and rec["image"].dtype == np.uint8
        np.testing.assert_array_equal(rec["image"][..., 1], np.round(digits.images[i] * 255 / 16))
    assert src[7]["caption"] == "a handwritten digit seven"  # load_digits starts 0, 1, ..., 9
    all_px = src.images
    assert all_px.min() == 0 and all_px.max() == 255


def test_digits_batches_follow_the_contract(tok):
    cfg = _config(resolution=32)
    it = _iterator(cfg, tok, batch=8)
    for batch in _take(it, 2):
        assert set(batch) == {"images", "input_ids"}
        assert batch["images"].shape == (8, 3, 32, 32) and batch["images"].dtype == np.float32
        assert batch["input_ids"].shape == (8, 77) and batch["input_ids"].dtype == np.int32
        assert batch["images"].min() >= -1 and batch["images"].max() <= 1
        assert batch["images"].min() == -1 and batch["images"].max() == 1  # 0 and 255 present
        assert (batch["input_ids"][:, 0] == BOS).all() and (batch["input_ids"][:, -1] == EOS).all()


# ---------------------------------------------------------------------------------------------
# Image folders and preprocessing


def test_folder_center_crop_matches_pil(image_folder, tok):
    cfg = _config(source="folder", path=str(image_folder), resolution=RES, center_crop=True, shuffle=False)
    src = make_source(cfg)
    assert len(src) == 8
    batches = _take(_iterator(cfg, tok, batch=4), 2)
    images = np.concatenate([b["images"] for b in batches])
    ids = np.concatenate([b["input_ids"] for b in batches])
    for i, (path, caption) in enumerate(src.entries):
        np.testing.assert_allclose(images[i], _expected_center(path, RES), atol=1e-6, err_msg=path)
        assert caption == f"photo number {i}"
    np.testing.assert_array_equal(ids, tokenize(tok, [c for _, c in src.entries]))


def test_folder_modes_convert_to_rgb(image_folder):
    src = ImageFolderSource(image_folder, on_bad="raise")
    for i, (path, _) in enumerate(src.entries):
        rec = src[i]
        assert rec["path"] == path
        np.testing.assert_array_equal(rec["image"], np.asarray(_expected_rgb(path)), err_msg=path)
    sixteen = src[5]["image"]  # 16-bit PNG: scaled, not clipped to white
    assert sixteen.std() > 30 and sixteen.max() <= 255


def _resized(path, size):
    img = _expected_rgb(path)
    w, h = img.size
    nw, nh = (size, size * h // w) if w <= h else (size * w // h, size)
    return np.asarray(img.resize((nw, nh), Image.BILINEAR), dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1


def test_random_crop_is_seeded(image_folder, tok):
    cfg = _config(source="folder", path=str(image_folder), resolution=RES, shuffle=False)
    a = _take(_iterator(cfg, tok, seed=3), 4)  # two epochs
    b = _take(_iterator(cfg, tok, seed=3), 4)
    c = _take(_iterator(cfg, tok, seed=4), 4)
    _assert_same_batches(a, b)
    stack = lambda bs: np.concatenate([x["images"] for x in bs])  # noqa: E731
    assert not np.array_equal(stack(a), stack(c))
    assert not np.array_equal(stack(a)[:8], stack(a)[8:])  # new crops in the second epoch
    # Every output is a RES x RES window of the independently resized image.
    src = make_source(cfg)
    for i, out in enumerate(stack(a)[:8]):
        full = _resized(src.entries[i][0], RES)
        h, w = full.shape[1:]
        hits = [
            (top, left)
            for top in range(h - RES + 1)
            for left in range(w - RES + 1)
            if np.allclose(full[:, top : top + RES, left : left + RES], out, atol=1e-6)
        ]
        assert hits, src.entries[i][0]


def test_metadata_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        ImageFolderSource(tmp_path)


# ---------------------------------------------------------------------------------------------
# Bad records


@pytest.mark.parametrize(
    "rows, needle",
    [
        (['{"file_name": "x.png", "caption": oops}'], "metadata.jsonl:2"),
        ([{"file_name": "nocap.png"}], "nocap.png"),
        ([{"file_name": "x.png"}], "x.png"),
    ],
)
def test_raise_names_metadata_problems(tmp_path, rows, needle):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    _write_metadata(tmp_path, [{"file_name": "ok.png", "caption": "fine"}, *rows])
    with pytest.raises(BadRecordError, match=needle):
        ImageFolderSource(tmp_path, on_bad="raise")


@pytest.mark.parametrize(
    "name, reason",
    [
        ("corrupt.png", "unreadable"),
        ("missing.png", "not found"),
        ("truncated.jpg", "unreadable"),
        ("float.tif", "float"),
    ],
)
def test_raise_names_unreadable_files(bad_folder, tok, tmp_path, name, reason):
    _write_metadata(tmp_path, [{"file_name": str(bad_folder / name), "caption": "c"}])
    src = ImageFolderSource(tmp_path, on_bad="raise")
    with pytest.raises(BadRecordError, match=reason) as err:
        src[0]
    assert str(bad_folder / name) in str(err.value) and err.value.path == str(bad_folder / name)
    # Through the pipeline the error surfaces with the path too.
    cfg = _config(source="folder", path=str(tmp_path), on_bad="raise", resolution=RES)
    with pytest.raises(Exception, match=name.replace(".", r"\.")):
        next(_iterator(cfg, tok, batch=1))


def test_skip_drops_and_counts_bad_records(bad_folder, tok, caplog):
    cfg = _config(source="folder", path=str(bad_folder), resolution=RES, center_crop=True)
    with caplog.at_level(logging.WARNING, logger="smooth_jax.data.sources"):
        it = make_single_pass_iterator(cfg, tok, batch_size=3)
        batches = list(it)
    ids = np.concatenate([b["input_ids"] for b in batches])
    assert [len(b["images"]) for b in batches] == [3, 1]  # only the 4 good records
    np.testing.assert_array_equal(ids, tokenize(tok, ["good zero", "good one", "good two", "good three"]))
    assert it.bad_count == len(BAD_PATHS)
    assert sorted(p.split("/")[-1] for p in it.bad_records) == sorted(BAD_PATHS)
    for needle in BAD_PATHS:
        assert sum(needle in r.getMessage() for r in caplog.records) == 1, needle

    # The infinite iterator meets each bad record every epoch: counted once, warned once.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="smooth_jax.data.sources"):
        train = _iterator(cfg, tok, batch=2)
        _take(train, 8)  # four epochs of the four good records
    assert train.bad_count == len(BAD_PATHS)
    assert train.source.skipped_reads >= 4 * 4  # four unreadable files per epoch
    for needle in BAD_PATHS:
        assert sum(needle in r.getMessage() for r in caplog.records) == 1, needle


def test_all_bad_records_is_an_error(tmp_path, tok):
    (tmp_path / "x.png").write_bytes(b"junk")
    _write_metadata(tmp_path, [{"file_name": "x.png", "caption": "c"}, {"file_name": "y.png", "caption": "c"}])
    cfg = _config(source="folder", path=str(tmp_path), resolution=RES)
    with pytest.raises(Exception, match="every record"):
        next(_iterator(cfg, tok, batch=1))


# ---------------------------------------------------------------------------------------------
# TFDS, prepared on disk without TensorFlow


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    tfds = pytest.importorskip("tensorflow_datasets")

    class SmoothJaxTinyCaptions(tfds.core.GeneratorBasedBuilder):
        """6 images of assorted sizes, each with a list of captions; one with none."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            # DatasetInfo directly: dataset_info_from_configs() looks for a package folder.
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3)),
                        "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            rng = np.random.default_rng(2)
            for i in range(6):
                # A PIL image is PNG-encoded by PIL; a numpy array would need TensorFlow.
                img = Image.fromarray(_rng_image(rng, 10 + 3 * i, 24))
                captions = [] if i == 5 else [f"tfds caption {i}", "second caption"]
                yield i, {"image": img, "captions": {"text": captions}}

    data_dir = tmp_path_factory.mktemp("tfds")
    builder = SmoothJaxTinyCaptions(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return data_dir, builder.data_dir


def test_tfds_source_reads_without_tensorflow(tfds_dir):
    data_dir, version_dir = tfds_dir
    by_name = TfdsSource("smooth_jax_tiny_captions", "train", data_dir, caption_key="captions/text", on_bad="skip")
    by_dir = TfdsSource("", "train", version_dir, caption_key="captions/text")
    assert len(by_name) == len(by_dir) == 6
    rng = np.random.default_rng(2)
    expected = {f"tfds caption {i}": _rng_image(rng, 10 + 3 * i, 24) for i in range(6)}
    seen = set()
    for i in range(6):
        rec = by_name[i]
        if rec is None:  # the record without captions
            continue
        assert rec["path"].startswith("tfds:smooth_jax_tiny_captions/train[")
        np.testing.assert_array_equal(rec["image"], expected[rec["caption"]])
        np.testing.assert_array_equal(by_dir[i]["image"], rec["image"])
        seen.add(rec["caption"])
    assert seen == {f"tfds caption {i}" for i in range(5)}
    assert by_name.bad_count == 1 and "missing caption" in next(iter(by_name.bad_records.values()))
    with pytest.raises(KeyError, match="no feature 'caption'"):
        TfdsSource("smooth_jax_tiny_captions", "train", data_dir)


def test_tfds_pipeline(tfds_dir, tok):
    data_dir, _ = tfds_dir
    cfg = _config(
        source="tfds",
        tfds_name="smooth_jax_tiny_captions",
        path=str(data_dir),
        caption_key="captions/text",
        resolution=RES,
    )
    batch = next(_iterator(cfg, tok, batch=4))
    assert batch["images"].shape == (4, 3, RES, RES) and batch["input_ids"].shape == (4, 77)
    cfg.on_bad = "raise"
    with pytest.raises(Exception, match=r"tfds:smooth_jax_tiny_captions/train\[\d\]: missing caption"):
        _take(_iterator(cfg, tok, batch=1, seed=0), 6)


# ---------------------------------------------------------------------------------------------
# Sharding and checkpointing


@pytest.fixture(scope="module")
def unique_folder(tmp_path_factory):
    """8 small images, told apart by their captions."""
    root = tmp_path_factory.mktemp("unique")
    rng = np.random.default_rng(3)
    for i in range(8):
        Image.fromarray(_rng_image(rng, 20 + i, 20)).save(root / f"{i}.png")
    _write_metadata(root, [{"file_name": f"{i}.png", "caption": f"item {i}"} for i in range(8)])
    return root


def _ids(batches):
    return [tuple(row) for b in batches for row in b["input_ids"]]


def test_hosts_read_disjoint_shards(unique_folder, tok):
    cfg = _config(source="folder", path=str(unique_folder), resolution=RES)
    one = _take(_iterator(cfg, tok, batch=4, seed=5), 2)  # one epoch on one host
    hosts = [_take(_iterator(cfg, tok, batch=4, seed=5, index=i, count=2), 2) for i in range(2)]
    for batches in hosts:
        assert all(b["images"].shape[0] == 2 and b["input_ids"].shape[0] == 2 for b in batches)
    h0, h1 = set(_ids(hosts[0])), set(_ids(hosts[1]))
    assert len(h0) == len(h1) == 4 and not h0 & h1
    assert h0 | h1 == set(_ids(one)) and len(set(_ids(one))) == 8
    with pytest.raises(ValueError, match="divisible"):
        _iterator(cfg, tok, batch=5, count=2)


def test_restore_continues_with_the_same_batches(unique_folder, tok):
    cfg = _config(source="folder", path=str(unique_folder), resolution=RES)  # shuffled, random crops
    it = _iterator(cfg, tok, batch=3, seed=1)
    _take(it, 3)
    state = it.get_state()
    assert isinstance(state, bytes)
    after = _take(it, 5)  # crosses epoch boundaries (8 records, batches of 3)
    fresh = _iterator(cfg, tok, batch=3, seed=1)
    fresh.set_state(json.loads(state))  # as stored in a JSON file
    _assert_same_batches(after, _take(fresh, 5))
    not_restored = _take(_iterator(cfg, tok, batch=3, seed=1), 5)
    assert not np.array_equal(not_restored[0]["input_ids"], after[0]["input_ids"])


def test_orbax_checkpoint_of_the_iterator(unique_folder, tok, tmp_path):
    grain = pytest.importorskip("grain")
    ocp = pytest.importorskip("orbax.checkpoint")
    cfg = _config(source="folder", path=str(unique_folder), resolution=RES)
    it = _iterator(cfg, tok, batch=2, seed=2)
    _take(it, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data_iter",)) as mngr:
        mngr.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    after = _take(it, 4)
    fresh = _iterator(cfg, tok, batch=2, seed=2)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data_iter",)) as mngr:
        mngr.restore(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
    _assert_same_batches(after, _take(fresh, 4))


# ---------------------------------------------------------------------------------------------
# Cached encodings


def _fake_encode(images, input_ids):
    """latents [b,4,4,4]: 4x4 block means of RES=16 images + a channel from the ids; context [b,77,5]."""
    b = images.shape[0]
    blocks = images.reshape(b, 3, 4, RES // 4, 4, RES // 4).mean(axis=(3, 5))
    extra = np.broadcast_to(input_ids[:, 1, None, None, None] / 1000.0, (b, 1, 4, 4))
    latents = np.concatenate([blocks, extra], axis=1)
    context = input_ids[:, :, None].astype(np.float32) * np.arange(5, dtype=np.float32)
    return latents, context


def test_cached_pipeline(unique_folder, tok, tmp_path):
    cfg = _config(source="folder", path=str(unique_folder), resolution=RES, center_crop=True, shuffle=False)
    originals = list(make_single_pass_iterator(cfg, tok, batch_size=3))
    n = cache_encodings(make_single_pass_iterator(cfg, tok, batch_size=3), _fake_encode, tmp_path / "cache")
    assert n == 8
    expected_lat, expected_ctx = _fake_encode(
        np.concatenate([b["images"] for b in originals]), np.concatenate([b["input_ids"] for b in originals])
    )
    src = CachedSource(tmp_path / "cache")
    assert len(src) == 8
    np.testing.assert_allclose(src[5]["latents"], expected_lat[5], rtol=1e-6)

    cached_cfg = _config(cache_dir=str(tmp_path / "cache"), shuffle=False)
    batches = _take(_iterator(cached_cfg, None, batch=4), 3)  # wraps to a second epoch
    assert set(batches[0]) == {"latents", "context"}
    assert batches[0]["latents"].shape == (4, 4, 4, 4) and batches[0]["context"].shape == (4, 77, 5)
    got_lat = np.concatenate([b["latents"] for b in batches])
    got_ctx = np.concatenate([b["context"] for b in batches])
    order = [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]
    np.testing.assert_allclose(got_lat, expected_lat[order], rtol=1e-6)
    np.testing.assert_allclose(got_ctx, expected_ctx[order], rtol=1e-6)
    with pytest.raises(FileExistsError):
        cache_encodings(originals, _fake_encode, tmp_path / "cache")


@pytest.mark.slow  # ~10-20 s: every iterator spawns worker processes that import the stack
def test_worker_processes_restore_too(unique_folder, tok):
    """num_workers > 0: batches come from grain worker processes; the state still restores."""
    cfg = _config(source="folder", path=str(unique_folder), resolution=RES, num_workers=1)
    with _iterator(cfg, tok, batch=2, seed=4) as it:
        _take(it, 3)
        state = it.get_state()
        after = _take(it, 4)
    with _iterator(cfg, tok, batch=2, seed=4) as fresh:
        fresh.set_state(state)
        _assert_same_batches(after, _take(fresh, 4))
        assert after[0]["images"].shape == (2, 3, RES, RES)
