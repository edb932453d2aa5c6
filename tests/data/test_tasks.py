"""Pretraining and fine-tuning example builders on rows of the sample corpus (parsed with the converter's schema)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from biomedgpt.data.examples import collate, images_on_device, normalize_text
from biomedgpt.data.finetune_tasks import FinetuneExampleBuilder, FinetuneTaskConfig
from biomedgpt.data.pretrain_tasks import NegativeSamples, PretrainExampleBuilder, PretrainTaskConfig
from biomedgpt.data.sample_corpus import write_sample_corpus
from biomedgpt.data.schema import get_kind, parse_row, parse_selected_cols
from biomedgpt.data.transforms import rng_for
from biomedgpt.tokenizer import BiomedGPTTokenizer


def read_rows(path: Path, kind_name: str) -> list[dict]:
    kind = get_kind(kind_name)
    selected = parse_selected_cols(kind, None)
    lines = path.read_bytes().split(b"\n")
    return [
        parse_row(kind, line, selected, len(kind.fields), number) for number, line in enumerate(lines, start=1) if line
    ]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    write_sample_corpus(out, rows=8, seed=0, image_size=64)
    return out


@pytest.fixture(scope="module")
def tokenizer() -> BiomedGPTTokenizer:
    return BiomedGPTTokenizer.default()


@pytest.fixture(scope="module")
def builder(corpus, tokenizer) -> PretrainExampleBuilder:
    config = PretrainTaskConfig(patch_image_size=64, sample_patch_num=10)
    return PretrainExampleBuilder(tokenizer, NegativeSamples.load(corpus / "negative_sample"), config)


def decode(tokenizer, ids) -> str:
    return tokenizer.decode([int(i) for i in ids if int(i) != tokenizer.pad_id], skip_special_tokens=True)


def test_vision_language_rows_give_two_examples_each_with_original_prompts(corpus, builder, tokenizer):
    rows = read_rows(corpus / "vision_language.tsv", "vision_language")
    seen = set()
    for index, row in enumerate(rows):
        examples = builder.from_vision_language(row, rng_for(0, 0, index))
        assert len(examples) == 2
        for ex in examples:
            seen.add(ex.task)
            assert ex.image.shape[-2:] == (64, 64) and ex.image.dtype == torch.uint8  # normalised on the device
            assert ex.image.shape[0] == (1 if row["image"].startswith(b"\x89PNG") else 3)  # grey PNGs: one channel
            assert ex.source[0] == tokenizer.bos_id and ex.source[-1] == tokenizer.eos_id
            assert ex.target[-1] == tokenizer.eos_id
            assert np.array_equal(ex.prev_output[1:], ex.target[:-1])
        first, second = examples
        if row["type"] == "caption":
            assert decode(tokenizer, first.source) == " what does the image describe?"
            assert decode(tokenizer, first.target).strip() == normalize_text(row["caption"], 30)
            assert decode(tokenizer, second.source).startswith(' does the image describe "')
            assert decode(tokenizer, second.target) in (" yes", " no")
        elif row["type"] == "qa":
            best = int(np.argmax(row["answer_confs"]))
            assert decode(tokenizer, first.target) == " " + row["answers"][best]
            assert first.weight == pytest.approx(row["answer_confs"][best]) == second.weight
            assert decode(tokenizer, second.source).startswith(' what is the answer to question "')
        else:
            bins = first.target[:-1]
            assert len(bins) == 4 and all(tokenizer.bin_offset <= b < tokenizer.bin_offset + 1000 for b in bins)
            x0, y0, x1, y1 = (int(b) - tokenizer.bin_offset for b in bins)
            assert x0 < x1 and y0 < y1 and x1 <= round(64 / 512 * 999) + 1  # 64 px crop, normalised by 512
            assert list(second.source[-5:-1]) == list(bins)  # grounded captioning reads the region
            assert decode(tokenizer, second.source).startswith("  what does the region describe? region:")
    assert seen == {
        "caption",
        "image_text_matching",
        "vqa",
        "answer_matching",
        "visual_grounding",
        "grounded_caption",
    }


def test_examples_are_a_function_of_seed_epoch_and_sample(corpus, builder):
    row = read_rows(corpus / "vision_language.tsv", "vision_language")[0]
    first = builder.from_vision_language(row, rng_for(7, 1, "a"))
    again = builder.from_vision_language(row, rng_for(7, 1, "a"))
    other_epoch = builder.from_vision_language(row, rng_for(7, 2, "a"))
    assert torch.equal(first[0].image, again[0].image)
    assert all(np.array_equal(a.source, b.source) for a, b in zip(first, again))
    assert not torch.equal(first[0].image, other_epoch[0].image)


def test_auxiliary_sources(corpus, builder, tokenizer):
    text_row = read_rows(corpus / "text.tsv", "text")[0]
    text = builder.from_text(text_row, rng_for(0, 0, 1))
    assert text.weight == 2.0 and text.image is None
    assert tokenizer.mask_id in text.source
    assert decode(tokenizer, text.source).startswith(' what is the complete text of "')
    assert decode(tokenizer, text.target) == " " + text_row["text"].strip().lower()

    image_row = read_rows(corpus / "image.tsv", "image")[0]
    image = builder.from_image(image_row, rng_for(0, 0, 2))
    assert image.code_mask and image.weight == 2.0
    assert image.image.shape[-2:] == (256, 256) and image.image_blank == (64, 192, 64, 192)
    on_device = images_on_device(collate([image, text], tokenizer.pad_id))["patch_images"]
    assert torch.count_nonzero(on_device[0, :, 64:192, 64:192]) == 0 and torch.count_nonzero(on_device[0]) > 0
    assert torch.count_nonzero(on_device[1]) == 0  # no image: the zero (mid-grey) image of normalised batches
    assert [int(t) - tokenizer.code_offset for t in image.target[:-1]] == list(image_row["code"])

    detection_row = read_rows(corpus / "detection.tsv", "detection")[0]
    detection = builder.from_detection(detection_row, rng_for(0, 0, 3))
    assert detection.image.shape[-2:] == (256, 256)
    target = detection.target[:-1].tolist()
    assert all(tokenizer.bin_offset <= t < tokenizer.bin_offset + 1000 for t in target[:4])
    names = {b["category_name"] for b in detection_row["boxes"]}
    assert any(name in decode(tokenizer, target) for name in names)


def test_pretraining_sub_batches_collate(corpus, builder, tokenizer):
    rows = read_rows(corpus / "vision_language.tsv", "vision_language")[:4]
    v1 = [ex for i, row in enumerate(rows) for ex in builder.from_vision_language(row, rng_for(0, 0, i))]
    v2 = [builder.from_text(read_rows(corpus / "text.tsv", "text")[0], rng_for(0, 0, 9))]
    v2.append(builder.from_image(read_rows(corpus / "image.tsv", "image")[0], rng_for(0, 0, 10)))
    batch1 = collate(v1, tokenizer.pad_id)
    batch2 = collate(v2, tokenizer.pad_id)
    assert batch1["patch_images"].shape == (8, 3, 64, 64) and bool(batch1["patch_masks"].all())
    assert batch1["patch_indices"].shape == (8, 10) and int(batch1["patch_indices"].max()) < 16
    assert torch.equal(batch1["patch_indices"][0], batch1["patch_indices"][1])  # one row, one patch choice
    assert "patch_indices" not in batch2
    assert batch2["patch_images"].shape == (2, 3, 256, 256)
    assert batch2["patch_masks"].tolist() == [False, True]  # text infilling has no image
    assert batch2["code_masks"].tolist() == [False, True]
    assert batch1["ntokens"] == sum(int((ex.target != tokenizer.pad_id).sum()) for ex in v1)


def test_finetune_vqa_puts_the_question_on_the_decoder_and_constrains_the_answer(corpus, tokenizer):
    rows = read_rows(corpus / "vqa_train.tsv", "vqa")
    answers = sorted({a for row in rows for a in row["answers"]})
    builder = FinetuneExampleBuilder(tokenizer, FinetuneTaskConfig("vqa", patch_image_size=64), answers)
    row = rows[0]
    ex = builder.build(row, rng_for(0, 0, 0))
    question = list(ex.extra["decoder_prefix"])
    assert list(ex.prev_output[1 : 1 + len(question)]) == question
    assert (ex.target[: len(question)] == tokenizer.pad_id).all()
    answer = ex.target[len(question) : -1].tolist()
    assert decode(tokenizer, answer) == " " + ex.extra["answer"]
    assert decode(tokenizer, ex.source).endswith("?")
    batch = collate([ex], tokenizer.pad_id, vocab_size=len(tokenizer))
    masks = batch["constraint_masks"][0]
    assert masks[: len(question)].all()  # the question positions are not constrained (and carry no loss)
    for position, token in enumerate([*answer, tokenizer.eos_id]):
        allowed = masks[len(question) + position]
        assert allowed[token] and int(allowed.sum()) < len(tokenizer)


@pytest.mark.parametrize("task", ["caption", "summarization", "nli", "classification"])
def test_finetune_tasks_build_and_collate(corpus, tokenizer, task):
    rows = read_rows(corpus / f"{task}_val.tsv", task)
    candidates = sorted({r["label_name"] for r in rows}) if task == "classification" else None
    config = FinetuneTaskConfig(task, patch_image_size=64, noise_ratio=0.2 if task == "summarization" else 0.0)
    builder = FinetuneExampleBuilder(tokenizer, config, candidates)
    examples = [builder.build(row, rng_for(0, 0, i)) for i, row in enumerate(rows[:4])]
    batch = collate(examples, tokenizer.pad_id, vocab_size=len(tokenizer))
    assert batch["input_ids"].shape[0] == len(examples) == min(4, len(rows))
    ex, row = examples[0], rows[0]
    if task == "caption":
        assert len(ex.extra["references"]) >= 2  # evaluation keeps every reference
    elif task == "summarization":
        assert decode(tokenizer, ex.source).startswith(' what is the summary of article "')
        assert batch["patch_images"] is None
    elif task == "nli":
        label = {0: "maybe", 1: "yes", 2: "no"}[int(row["label"])]
        label_tokens = tokenizer.encode(" " + label)
        start = len(ex.target) - len(label_tokens)
        assert ex.target[start:].tolist() == label_tokens and len(ex.target) == len(ex.prev_output)
        assert (ex.target[:start] == tokenizer.pad_id).all()
        first_tokens = {tokenizer.encode(" " + answer)[0] for answer in ("maybe", "yes", "no")}
        allowed = batch["constraint_masks"][0, start]
        assert set(torch.nonzero(allowed).flatten().tolist()) == first_tokens
    else:
        assert decode(tokenizer, ex.target) == " " + row["label_name"]
        assert ex.image.shape == (3, 64, 64)


def test_summarization_decoder_noise_only_in_training(corpus, tokenizer):
    rows = read_rows(corpus / "summarization_train.tsv", "summarization")
    builder = FinetuneExampleBuilder(tokenizer, FinetuneTaskConfig("summarization", noise_ratio=0.5))
    noisy = builder.build(rows[0], rng_for(0, 0, 0), train=True)
    clean = builder.build(rows[0], rng_for(0, 0, 0), train=False)
    assert np.array_equal(noisy.target, clean.target)
    assert not np.array_equal(noisy.prev_output, clean.prev_output)
    assert np.array_equal(clean.prev_output[1:], clean.target[:-1])


def test_pretrain_collator_batches_count_rows_for_streaming_resumption(corpus, builder, tokenizer):
    from streaming import StreamingDataLoader

    from biomedgpt.data.pipeline import PretrainCollator

    rows = read_rows(corpus / "vision_language.tsv", "vision_language")[:3]
    per_row = [builder.from_vision_language(row, rng_for(0, 0, i)) for i, row in enumerate(rows)]
    batch = PretrainCollator(tokenizer.pad_id)(per_row)
    # StreamingDataLoader.state_dict() counts what it yielded with this; it must be rows, not examples.
    assert StreamingDataLoader._get_batch_size(None, batch) == 3
    assert batch["v1"]["input_ids"].shape[0] == 6
    assert batch["v2"]["tasks"] == ["placeholder"] and batch["v2"]["ntokens"] == 0
