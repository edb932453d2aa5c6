"""uint8 images from the workers, normalised on the device: the same model input, bit for bit, as normalising float32
images in the workers did, for RGB and one-channel grey images, infilling's blanked centre, text-only examples and
the ImageNet statistics."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from biomedgpt.data.examples import Example, collate, images_on_device
from biomedgpt.data.finetune_tasks import IMAGENET_MEAN, IMAGENET_STD
from biomedgpt.data.images import decode_image
from biomedgpt.data.pretrain_tasks import NegativeSamples, PretrainExampleBuilder, PretrainTaskConfig
from biomedgpt.data.sample_corpus import write_sample_corpus
from biomedgpt.data.schema import get_kind, parse_row, parse_selected_cols
from biomedgpt.data.transforms import (
    RANDOM_AUGMENT_OPS,
    Compose,
    RandomAugment,
    ToTensorNormalize,
    detection_transform,
    mask_image_center,
    pretrain_vl_transform,
    rng_for,
)
from biomedgpt.tokenizer import BiomedGPTTokenizer


def _grey(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.clip(x * 200 / width + y * 40 / height + rng.normal(0, 12, (height, width)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def _old_style(transform: Compose) -> Compose:
    """The same transform ending as before: float32 normalisation in the worker."""
    return Compose([*transform.transforms[:-1], ToTensorNormalize()])


@pytest.mark.parametrize("op", RANDOM_AUGMENT_OPS)
def test_every_augment_op_gives_a_grey_image_the_levels_of_its_rgb_copy(op: str) -> None:
    grey = _grey(48, 40)
    for seed in range(4):
        one, _ = RandomAugment(1, 7, [op]).apply_op(op, grey, None, rng_for(seed, 0, op))
        three, _ = RandomAugment(1, 7, [op]).apply_op(op, grey.convert("RGB"), None, rng_for(seed, 0, op))
        assert one.mode == "L"
        np.testing.assert_array_equal(np.asarray(one.convert("RGB")), np.asarray(three))


def test_grey_pipelines_stay_one_channel_and_normalise_to_what_the_rgb_copy_gave() -> None:
    grey = _grey(300, 220, seed=1)
    for transform in (pretrain_vl_transform(64), detection_transform(64)):
        for seed in range(6):
            pixels, _ = transform(grey, None, rng_for(seed, 0, "g"))
            reference, _ = _old_style(transform)(grey.convert("RGB"), None, rng_for(seed, 0, "g"))
            assert pixels.dtype == torch.uint8 and pixels.shape == (1, 64, 64)
            example = Example("caption", np.zeros(2, np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64), pixels)
            assert torch.equal(images_on_device(collate([example], 1))["patch_images"][0], reference)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    write_sample_corpus(out, rows=6, seed=0, image_size=96)
    return out


def _rows(path: Path, kind_name: str) -> list[dict]:
    kind = get_kind(kind_name)
    lines = [line for line in path.read_bytes().split(b"\n") if line]
    return [parse_row(kind, line, parse_selected_cols(kind, None), len(kind.fields), n) for n, line in enumerate(lines)]


def test_pretraining_batches_equal_the_former_worker_normalisation_bit_for_bit(corpus: Path) -> None:
    """Caption/VQA/grounding rows (JPEG colour scenes and grey CT/MR PNGs), image infilling and a text example."""
    tokenizer = BiomedGPTTokenizer.default()
    builder = PretrainExampleBuilder(
        tokenizer, NegativeSamples.load(corpus / "negative_sample"), PretrainTaskConfig(patch_image_size=64)
    )
    rows = _rows(corpus / "vision_language.tsv", "vision_language")
    examples, references = [], []
    for index, row in enumerate(rows):
        built = builder.from_vision_language(row, rng_for(0, 0, index))
        examples += built
        transform = builder.grounding_transform if row["type"] == "visual_grounding" else builder.vl_transform
        target = {"boxes": np.asarray([row["box"]], np.float32), "labels": ["r"]} if row.get("box") else None
        reference, _ = _old_style(transform)(decode_image(row["image"]), target, rng_for(0, 0, index))
        references += [reference] * len(built)
    assert {ex.image.shape[0] for ex in examples} == {1, 3}  # grey PNG slices and colour JPEG scenes both present
    batch = images_on_device(collate(examples, tokenizer.pad_id))
    assert "image_mean" not in batch and batch["patch_images"].dtype == torch.float32
    assert torch.equal(batch["patch_images"], torch.stack(references))

    infill = builder.from_image(_rows(corpus / "image.tsv", "image")[0], rng_for(0, 0, 1))
    text = builder.from_text(_rows(corpus / "text.tsv", "text")[0], rng_for(0, 0, 2))
    raw = collate([infill, text], tokenizer.pad_id, image_size=256)
    assert raw["patch_images"].dtype == torch.uint8  # what crosses the DataLoader's shared memory
    images = images_on_device(raw, torch.bfloat16)["patch_images"]
    image_row = _rows(corpus / "image.tsv", "image")[0]
    expected = mask_image_center(ToTensorNormalize()(decode_image(image_row["image"]))[0])
    assert images.dtype == torch.bfloat16
    assert torch.equal(images[0], expected.to(torch.bfloat16)) and torch.count_nonzero(images[1]) == 0


def test_imagenet_statistics_are_applied_per_example() -> None:
    image = Image.open(io.BytesIO(_encoded_png())).convert("RGB")
    pixels = torch.from_numpy(np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1)))
    plain = Example("vqa", np.zeros(2, np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64), pixels)
    imagenet = Example("classification", plain.source, plain.target, plain.prev_output, pixels.clone())
    imagenet.image_mean, imagenet.image_std = IMAGENET_MEAN, IMAGENET_STD
    images = images_on_device(collate([plain, imagenet], 1))["patch_images"]
    assert torch.equal(images[0], ToTensorNormalize()(image)[0])
    assert torch.equal(images[1], ToTensorNormalize(IMAGENET_MEAN, IMAGENET_STD)(image)[0])


def _encoded_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_worker_batches_arrive_as_the_same_tensors_as_in_process(
    tmp_path: Path, tsvkit: object, single_process: None
) -> None:
    """Workers send batches as numpy arrays (cheaper than a shared-memory segment per tensor); the loader turns them
    back into tensors equal, in value and dtype, to the batches built in-process."""
    import gc

    from biomedgpt.data.convert import convert
    from biomedgpt.data.finetune_tasks import FinetuneExampleBuilder, FinetuneTaskConfig
    from biomedgpt.data.pipeline import FinetuneCollator, FinetuneStream, make_loader

    tsv = tmp_path / "vqa.tsv"
    tsv.write_bytes(tsvkit.tsv_bytes([tsvkit.good_row("vqa", i) for i in range(12)]))  # type: ignore[attr-defined]
    convert(str(tsv), "vqa", str(tmp_path / "vqa"))
    tokenizer = BiomedGPTTokenizer.default()
    builder = FinetuneExampleBuilder(tokenizer, FinetuneTaskConfig("vqa", patch_image_size=32))

    def batches(workers: int) -> list[dict]:
        gc.collect()
        stream = FinetuneStream(builder, str(tmp_path / "vqa"), shuffle=False, batch_size=4, num_canonical_nodes=1)
        return list(make_loader(stream, 4, FinetuneCollator(tokenizer.pad_id), num_workers=workers))

    local, remote = batches(0), batches(1)
    assert len(local) == len(remote) == 3
    for a, b in zip(local, remote):
        assert a.keys() == b.keys() and a["patch_images"].dtype == torch.uint8
        for key, value in a.items():
            if isinstance(value, torch.Tensor):
                assert isinstance(b[key], torch.Tensor) and b[key].dtype == value.dtype and torch.equal(b[key], value)
            else:
                assert b[key] == value


def _jpeg(width: int, height: int, grey: bool) -> bytes:
    rng = np.random.default_rng(width)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.clip(x * 180 / width + 60 * np.sin(y / 37.0) + rng.normal(0, 4, (height, width)) + 20, 0, 255)
    image = Image.fromarray(pixels.astype(np.uint8))
    buffer = io.BytesIO()
    (image if grey else image.convert("RGB")).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_jpeg_draft_decoding_keeps_the_asked_shorter_side_and_says_so() -> None:
    from biomedgpt.data.images import describe_decoding

    data = _jpeg(1200, 1000, grey=False)
    assert decode_image(data, draft_shorter_side=480).size == (600, 500)
    quarter = decode_image(data, draft_shorter_side=200, keep_grey=True)
    assert quarter.size == (300, 250) and describe_decoding(quarter).endswith(", drafted at 1/4")
    assert decode_image(data, draft_shorter_side=600).size == (1200, 1000)  # half would be too small
    grey = decode_image(_jpeg(1200, 1000, grey=True), keep_grey=True, draft_shorter_side=480)
    assert grey.mode == "L" and grey.size == (600, 500)
    png = io.BytesIO()
    Image.new("L", (1200, 1000)).save(png, "PNG")
    assert decode_image(png.getvalue(), draft_shorter_side=480).size == (1200, 1000)  # JPEG only


def test_caption_and_vqa_rows_decode_drafted_and_match_the_full_decode_closely(corpus: Path) -> None:
    """A 1,200 x 1,000 JPEG caption row decodes at half size (its shorter side 500 still covers the largest draw,
    480): the example's pixels are within 1 level on average (0.3 seen) and 4 at most (2 seen) of those built from
    the full-size decode."""
    tokenizer = BiomedGPTTokenizer.default()
    builder = PretrainExampleBuilder(tokenizer, NegativeSamples.load(corpus / "negative_sample"), PretrainTaskConfig())
    row = {"uniq_id": "c0", "image": _jpeg(1200, 1000, grey=True), "caption": "a chest film", "type": "caption"}
    for seed in range(3):
        drafted = builder.from_vision_language(row, rng_for(seed, 0, 0))[0].image
        full, _ = builder.vl_transform(decode_image(row["image"], keep_grey=True), None, rng_for(seed, 0, 0))
        levels = (drafted.double() - full.double()).abs()
        assert drafted.shape == full.shape and levels.mean() < 1.0 and levels.max() <= 4, float(levels.mean())
        assert levels.max() > 0  # it was decoded drafted: otherwise the two would be identical
