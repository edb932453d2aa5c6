"""Images prepared at conversion (biomedgpt-convert --max-image-side/--max-shorter-side/--image-encoding): sizes,
exact boxes, 8-bit windowing of 16-bit and DICOM sources, grey as one channel, bytes kept where nothing changes."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from biomedgpt.cli.convert import main as cli_main
from biomedgpt.data.convert import ConversionError, convert
from biomedgpt.data.image_preparation import ORIGINAL_SIZE_COLUMNS, ImagePreparation
from biomedgpt.data.images import decode_image, describe_decoding


def _rows(out: Path) -> list[dict[str, Any]]:
    index = json.loads((out / "index.json").read_text())
    return [r for s in index["shards"] for r in pq.read_table(out / s["raw_data"]["basename"]).to_pylist()]


def _encoded(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _gradient(width: int, height: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = (x / width * 160 + y / height * 80)[..., None] + rng.normal(0, 6, (height, width, channels))
    return np.clip(base, 0, 255).astype(np.uint8)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_target_size_keeps_the_aspect_ratio_and_puts_the_limiting_side_at_its_limit() -> None:
    both = ImagePreparation(max_side=672, max_shorter_side=480)
    assert both.target_size(2000, 1500) == (640, 480)  # the shorter-side limit binds
    assert both.target_size(3000, 1000) == (672, 224)  # the longer-side limit binds
    assert both.target_size(400, 300) == (400, 300)  # inside both: unchanged, never enlarged
    assert ImagePreparation(max_shorter_side=480).target_size(1001, 2003) == (480, 960)
    assert not ImagePreparation().enabled and ImagePreparation(encoding="png").enabled
    with pytest.raises(ValueError, match="--max-image-side"):
        ImagePreparation(max_side=0)
    with pytest.raises(ValueError, match="--image-encoding"):
        ImagePreparation(encoding="gif")


def test_grounding_and_detection_boxes_scale_exactly_and_the_original_size_is_kept(
    tmp_path: Path, write_tsv: Any
) -> None:
    # 301 x 200 -> 181 x 120: the two axes scale by different ratios (181/301 and 0.6), as rounding makes them.
    image = _encoded(Image.fromarray(_gradient(301, 200)), "JPEG", quality=90)
    vl = [["g0", _b64(image), "the left lung", "", "30,20,150.5,199", "", "vg", "visual_grounding"]]
    prep = ImagePreparation(max_shorter_side=120)
    out = tmp_path / "vl"
    summary = convert(str(write_tsv(vl, "vl.tsv")), "vision_language", str(out), preparation=prep)
    (row,) = _rows(out)
    stored = Image.open(io.BytesIO(row["image"]))
    assert stored.size == (181, 120) and stored.format == "JPEG"
    assert (row[ORIGINAL_SIZE_COLUMNS[0]], row[ORIGINAL_SIZE_COLUMNS[1]]) == (301, 200)
    expected = np.asarray([30, 20, 150.5, 199]) * np.asarray([181 / 301, 120 / 200] * 2)
    np.testing.assert_allclose(row["box"], expected, rtol=1e-7)  # float32 storage of the exact product
    assert summary.image_preparation["max_shorter_side"] == 120
    assert summary.images_prepared["resized"] == 1 and summary.images_prepared["bytes out"] < len(image)
    config = json.loads((out / "index.json").read_text())["biomedgpt"]["config"]
    assert config["image_preparation"] == prep.to_json()

    detection = [["d0", _b64(image), "10,10,290,190,3,liver&&0,0,60,40.5,1,bone, left"]]
    out = tmp_path / "det"
    convert(str(write_tsv(detection, "det.tsv")), "detection", str(out), preparation=ImagePreparation(max_side=150))
    (row,) = _rows(out)
    assert Image.open(io.BytesIO(row["image"])).size == (150, 100)
    got = np.asarray([[b["x0"], b["y0"], b["x1"], b["y1"]] for b in row["boxes"]])
    scale = np.asarray([150 / 301, 100 / 200] * 2)
    np.testing.assert_allclose(got, np.asarray([[10, 10, 290, 190], [0, 0, 60, 40.5]]) * scale, rtol=1e-7)
    assert [b["category_name"] for b in row["boxes"]] == ["liver", "bone, left"]


def test_16_bit_png_and_dicom_are_windowed_once_into_8_bit_grey_by_the_training_rule(
    tmp_path: Path, write_tsv: Any
) -> None:
    from pydicom.data import get_testdata_file

    twelve_bit = (np.linspace(0, 4095, 64 * 48).reshape(48, 64)).astype(np.uint16)
    png16 = _encoded(Image.fromarray(twelve_bit), "PNG")
    dicom = Path(get_testdata_file("CT_small.dcm")).read_bytes()  # 16-bit CT with a window in the file
    rows = [[f"q{i}", f"img{i}", "what organ?", "1|!+liver", "", _b64(data)] for i, data in enumerate((png16, dicom))]
    out = tmp_path / "vqa"
    summary = convert(str(write_tsv(rows)), "vqa", str(out), preparation=ImagePreparation(encoding="png"))
    assert summary.images_prepared["grey, one channel"] == 2 and summary.images_prepared["resized"] == 0
    for row, source in zip(_rows(out), (png16, dicom)):
        stored = decode_image(row["image"], keep_grey=True)
        assert stored.mode == "L" and describe_decoding(stored) == "PNG 8-bit grey as stored"  # no 16-bit work
        # The very pixels the training decoder makes of the source, every step, without preparation.
        np.testing.assert_array_equal(np.asarray(stored), np.asarray(decode_image(source))[..., 0])
    assert "DICOM MONOCHROME2 CT" in " ".join(summary.image_decodings)


def test_small_8_bit_sources_keep_their_bytes_and_grey_rgb_png_becomes_one_channel(
    tmp_path: Path, write_tsv: Any
) -> None:
    colour_jpeg = _encoded(Image.fromarray(_gradient(40, 30)), "JPEG", quality=90)
    grey_rgb_jpeg = _encoded(Image.fromarray(_gradient(40, 30, 1)[..., 0]).convert("RGB"), "JPEG", quality=90)
    grey_rgb_png = _encoded(Image.fromarray(_gradient(40, 30, 1)[..., 0]).convert("RGB"), "PNG")
    sources = (colour_jpeg, grey_rgb_jpeg, grey_rgb_png)
    rows = [[f"c{i}", "", f"caption {i}", "", _b64(data)] for i, data in enumerate(sources)]
    out = tmp_path / "caption"
    convert(str(write_tsv(rows)), "caption", str(out), preparation=ImagePreparation(max_side=64))
    stored = [r["image"] for r in _rows(out)]
    assert stored[:2] == [colour_jpeg, grey_rgb_jpeg]  # re-encoding a JPEG would only add loss
    assert Image.open(io.BytesIO(stored[2])).mode == "L"
    np.testing.assert_array_equal(
        np.asarray(decode_image(stored[2])), np.asarray(decode_image(grey_rgb_png))
    )  # lossless: the same RGB pixels once expanded


def test_webp_and_jpeg_encodings_are_stored_as_asked(tmp_path: Path, write_tsv: Any) -> None:
    source = _encoded(Image.fromarray(_gradient(200, 100)), "PNG")
    rows = [["c0", "", "caption", "", _b64(source)]]
    for encoding, fmt in (("webp", "WEBP"), ("jpeg", "JPEG"), ("source", "PNG")):
        out = tmp_path / encoding
        convert(
            str(write_tsv(rows)), "caption", str(out), preparation=ImagePreparation(max_side=100, encoding=encoding)
        )
        (row,) = _rows(out)
        stored = Image.open(io.BytesIO(row["image"]))
        assert (stored.format, stored.size) == (fmt, (100, 50))
        if fmt != "JPEG":  # lossless: exactly the bicubic resize of the decoded source
            expected = decode_image(source).resize((100, 50), Image.Resampling.BICUBIC)
            np.testing.assert_array_equal(np.asarray(decode_image(row["image"])), np.asarray(expected))


def test_refusals_name_the_option(tmp_path: Path, write_tsv: Any, tsvkit: Any, capsys: Any) -> None:
    tsv = write_tsv([tsvkit.good_row("image", 0)])
    with pytest.raises(ConversionError, match="VQ-GAN codes"):
        convert(str(tsv), "image", str(tmp_path / "img"), preparation=ImagePreparation(max_side=128))
    with pytest.raises(SystemExit) as stop:
        cli_main([str(tsv), "--kind", "image", "--out", str(tmp_path / "cli"), "--max-shorter-side", "4"])
    assert stop.value.code == 2 and "--max-shorter-side" in capsys.readouterr().err


def test_training_resumes_mid_epoch_on_prepared_shards(tmp_path: Path, write_tsv: Any, single_process: None) -> None:
    """A StreamingDataLoader over prepared VQA shards, stopped after 2 batches and resumed from its state_dict in a
    new loader, yields the rest of the epoch exactly as the uninterrupted one (ids and uint8 images)."""
    import gc

    import torch

    from biomedgpt.data.finetune_tasks import FinetuneExampleBuilder, FinetuneTaskConfig
    from biomedgpt.data.pipeline import FinetuneCollator, FinetuneStream, make_loader
    from biomedgpt.tokenizer import BiomedGPTTokenizer

    rows = []
    for i in range(20):
        pixels = _gradient(120, 90, seed=i)
        image = Image.fromarray(pixels[..., 0] if i % 2 else pixels)  # grey and colour rows
        data = _encoded(image, "JPEG", quality=90)
        rows.append([f"q{i}", f"img{i}", f"what organ {i}?", "1|!+liver", "", _b64(data)])
    out = tmp_path / "prepared"
    convert(str(write_tsv(rows)), "vqa", str(out), rows_per_shard=6, preparation=ImagePreparation(max_shorter_side=48))
    tokenizer = BiomedGPTTokenizer.default()
    builder = FinetuneExampleBuilder(tokenizer, FinetuneTaskConfig("vqa", patch_image_size=32))

    def run(state: dict | None = None, stop_after: int | None = None) -> tuple[list, dict | None]:
        gc.collect()  # the previous dataset's shared memory goes before the directory is opened again
        stream = FinetuneStream(builder, str(out), shuffle=True, shuffle_seed=3, batch_size=4, num_canonical_nodes=1)
        loader = make_loader(stream, 4, FinetuneCollator(tokenizer.pad_id))
        if state is not None:
            loader.load_state_dict(state)
        seen, saved = [], None
        for step, batch in enumerate(loader):
            assert batch["patch_images"].dtype == torch.uint8
            seen += list(zip(batch["sample_ids"], batch["patch_images"]))
            if stop_after is not None and step + 1 == stop_after:
                saved = loader.state_dict()
                break
        return seen, saved

    whole, _ = run()
    first, state = run(stop_after=2)
    rest, _ = run(state)
    assert len(whole) == 20 and len(first) == 8
    resumed = first + rest
    assert [sid for sid, _ in resumed] == [sid for sid, _ in whole]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(resumed, whole))


def test_row_groups_also_end_at_row_group_bytes(tmp_path: Path, write_tsv: Any) -> None:
    """Radiograph-sized rows: a row group closes at row_group_bytes, so a random read decodes a few rows, not 128."""
    images = [_encoded(Image.fromarray(_gradient(64, 64, seed=i)), "PNG") for i in range(10)]
    rows = [[f"c{i}", "", f"caption {i}", "", _b64(data)] for i, data in enumerate(images)]
    cap = 3 * len(images[0])  # about three rows' bytes
    out = tmp_path / "capped"
    convert(str(write_tsv(rows)), "caption", str(out), row_group_bytes=cap)
    index = json.loads((out / "index.json").read_text())
    groups = index["shards"][0]["row_groups"]
    assert sum(groups) == 10 and max(groups) <= 4 and len(groups) >= 3
    assert index["biomedgpt"]["config"]["row_group_bytes"] == cap
    convert(str(write_tsv(rows)), "caption", str(tmp_path / "rows"), row_group_bytes=None)
    assert json.loads((tmp_path / "rows" / "index.json").read_text())["shards"][0]["row_groups"] == [10]


def test_examples_from_prepared_shards_equal_the_unprepared_ones_within_resampling_rounding(
    tmp_path: Path, write_tsv: Any
) -> None:
    """Grounding rows (no augmentation, so the difference is the extra resample alone) from a 960 x 720 source:
    prepared to shorter side 480, the crops differ by under 1 level on average (0.3-0.7 seen) and by at most 6 (5
    seen), the region's location bins by at most one (none seen); the prompt and the other tokens are the same."""
    from biomedgpt.data.pretrain_tasks import NegativeSamples, PretrainExampleBuilder, PretrainTaskConfig
    from biomedgpt.data.sample_corpus import write_sample_corpus
    from biomedgpt.data.transforms import rng_for
    from biomedgpt.tokenizer import BiomedGPTTokenizer

    rows = []
    for i in range(6):
        pixels = _gradient(960, 720, seed=i)
        image = Image.fromarray(pixels[..., 0] if i % 2 else pixels)
        box = f"{100 + 40 * i},{80 + 30 * i},{500 + 50 * i},{400 + 20 * i}"
        rows.append([f"g{i}", _b64(_encoded(image, "PNG")), f"region {i}", "", box, "", "vg", "visual_grounding"])
    tsv = write_tsv(rows)
    convert(str(tsv), "vision_language", str(tmp_path / "as_is"))
    convert(str(tsv), "vision_language", str(tmp_path / "prepared"), preparation=ImagePreparation(max_shorter_side=480))
    write_sample_corpus(tmp_path / "corpus", rows=1, seed=0, image_size=32)
    tokenizer = BiomedGPTTokenizer.default()
    builder = PretrainExampleBuilder(
        tokenizer, NegativeSamples.load(tmp_path / "corpus" / "negative_sample"), PretrainTaskConfig()
    )
    bins = (tokenizer.bin_id(0), tokenizer.bin_id(999))
    for index, (plain, prepared) in enumerate(zip(_rows(tmp_path / "as_is"), _rows(tmp_path / "prepared"))):
        assert Image.open(io.BytesIO(prepared["image"])).size == (640, 480)
        a, b = (builder.from_vision_language(row, rng_for(0, 0, index)) for row in (plain, prepared))
        for x, y in zip(a, b):
            tokens_x, tokens_y = np.concatenate([x.source, x.target]), np.concatenate([y.source, y.target])
            differ = tokens_x != tokens_y
            in_bins = (np.minimum(tokens_x, tokens_y) >= bins[0]) & (np.maximum(tokens_x, tokens_y) <= bins[1])
            assert not (differ & ~(in_bins & (np.abs(tokens_x - tokens_y) <= 1))).any(), x.task
            levels = (x.image.double() - y.image.double()).abs()
            assert x.image.shape == y.image.shape and levels.mean() < 1.0 and levels.max() <= 6, levels.max()
