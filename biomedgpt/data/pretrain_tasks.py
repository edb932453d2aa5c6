"""Pretraining examples built from the four pretraining sources (BiomedGPT data/pretrain_data/unify_dataset.py),
with the original prompts.

Every builder takes an explicit ``numpy.random.Generator`` derived from (seed, epoch, sample id), so the same
row builds the same examples whichever rank, worker or resumed run reads it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from biomedgpt.data.examples import Example, make_example, normalize_text
from biomedgpt.data.images import decode_image
from biomedgpt.data.noising import whole_word_mask
from biomedgpt.data.transforms import (
    VL_MAX_SHORTER_SIDE,
    box_to_bins,
    detection_transform,
    image_center_block,
    pretrain_vl_transform,
    pure_image_transform,
    visual_grounding_transform,
)
from biomedgpt.tokenizer import BiomedGPTTokenizer

# Tasks whose examples go to the image-text sub-batch (v1); the others form v2 (UnifyDataset.collater).
IMAGE_TEXT_TASKS = ("caption", "image_text_matching", "vqa", "answer_matching", "visual_grounding", "grounded_caption")
AUXILIARY_TASKS = ("text_infilling", "image_infilling", "detection")

PROMPT_CAPTION = " what does the image describe?"
PROMPT_ITM = ' does the image describe " {} "?'
PROMPT_ANSWER_MATCHING = ' what is the answer to question " {} ". is " {} "?'
PROMPT_GROUNDING = ' which region does the text " {} " describe?'
PROMPT_GROUNDED_CAPTION = "  what does the region describe? region:"
PROMPT_TEXT_INFILLING = (' what is the complete text of "', ' "?')
PROMPT_IMAGE_INFILLING = " what is the image in the middle part?"
PROMPT_DETECTION = " what are the objects in the image?"


@dataclass
class PretrainTaskConfig:
    """Settings of the original pretraining task (BiomedGPT tasks/pretrain_tasks/unify_task.py defaults and
    scripts/pretrain/pretrain_tiny.sh)."""

    patch_image_size: int = 256
    sample_patch_num: int | None = 196  # image-text examples keep this many random patches (None: all)
    max_image_size: int = 512  # box coordinates are divided by this, not by the image size (utils/transforms.py)
    auxiliary_image_size: int = 256
    code_image_size: int = 128
    max_src_words: int = 80
    max_tgt_words: int = 30
    text_max_tokens: int = 256
    num_bins: int = 1000
    mask_ratio: float = 0.3
    poisson_lambda: float = 3.0
    auxiliary_weight: float = 2.0
    negative_object_probability: float = 0.4  # the original swaps an object when rand > 0.6

    def __post_init__(self) -> None:
        for name in ("patch_image_size", "auxiliary_image_size", "max_image_size", "code_image_size"):
            if getattr(self, name) <= 0 or getattr(self, name) % 16 and name != "max_image_size":
                raise ValueError(f"{name}={getattr(self, name)} must be a positive multiple of 16")
        if self.sample_patch_num is not None and self.sample_patch_num < 1:
            raise ValueError(f"sample_patch_num={self.sample_patch_num} must be >= 1 (or None to keep all)")
        if not 0.0 <= self.mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio={self.mask_ratio} must lie in [0, 1]")


@dataclass
class NegativeSamples:
    """Side files for image-text matching and answer matching negatives (``--neg-sample-dir`` of BiomedGPT
    tasks/pretrain_tasks/unify_task.py)."""

    type2ans: dict[str, list[str]]
    objects: list[str]
    captions: list[str]

    @classmethod
    def load(cls, directory: str | Path) -> NegativeSamples:
        directory = Path(directory)
        paths = {name: directory / name for name in ("type2ans.json", "object.txt", "all_captions.txt")}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"negative-sample files missing: {', '.join(missing)}; pass the folder holding type2ans.json, "
                "object.txt and all_captions.txt (biomedgpt-sample-data writes an example in negative_sample/)"
            )
        type2ans = json.loads(paths["type2ans.json"].read_text(encoding="utf-8"))
        objects = [line.strip() for line in paths["object.txt"].read_text(encoding="utf-8").splitlines()]
        captions = [line.strip() for line in paths["all_captions.txt"].read_text(encoding="utf-8").splitlines()]
        return cls(type2ans, [o for o in objects if o], [c for c in captions if c])

    def __post_init__(self) -> None:
        self.answer_types = {answer: kind for kind, answers in self.type2ans.items() for answer in answers}

    def negative_caption(self, caption: str, gt_objects: list[str], rng: np.random.Generator, swap_p: float) -> str:
        """Swap one mentioned object for another (hard negative) or take another caption of the corpus."""
        present = [obj for obj in gt_objects if obj and obj in caption]
        if present and self.objects and rng.random() < swap_p:
            chosen = present[int(rng.integers(len(present)))]
            others = [obj for obj in self.objects if obj != chosen]
            if others:
                return caption.replace(chosen, others[int(rng.integers(len(others)))], 1)
        others = [c for c in self.captions if c != caption] or ["nothing"]
        return others[int(rng.integers(len(others)))]

    def negative_answer(self, answer: str, rng: np.random.Generator) -> str:
        """An answer of the same type; counts move by one (``how many`` answers)."""
        kind = self.answer_types.get(answer, "other")
        if kind == "how many" and answer.isdigit():
            value = int(answer) + (1 if answer == "0" or rng.random() < 0.5 else -1)
            return str(value)
        pool = [a for a in self.type2ans.get(kind, []) if a != answer] or [
            a for a in self.type2ans.get("other", []) if a != answer
        ]
        return pool[int(rng.integers(len(pool)))] if pool else ("no" if answer == "yes" else "yes")


class PretrainExampleBuilder:
    """Turns rows of the four pretraining sources into examples with the original prompts and weights."""

    def __init__(self, tokenizer: BiomedGPTTokenizer, negatives: NegativeSamples, config: PretrainTaskConfig) -> None:
        self.tokenizer = tokenizer
        self.negatives = negatives
        self.config = config
        self.vl_transform = pretrain_vl_transform(config.patch_image_size)
        self.grounding_transform = visual_grounding_transform(config.patch_image_size)
        self.detection_transform = detection_transform(config.auxiliary_image_size)
        self.image_transform = pure_image_transform()
        self.yes, self.no = tokenizer.encode(" yes"), tokenizer.encode(" no")

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def _bins(self, box: np.ndarray) -> list[int]:
        bins = box_to_bins(box, self.config.max_image_size, self.config.num_bins)
        return [self.tokenizer.bin_id(int(b)) for b in bins]

    def from_vision_language(self, row: dict[str, Any], rng: np.random.Generator) -> list[Example]:
        """caption -> captioning + image-text matching; qa -> VQA + answer matching; visual_grounding ->
        grounding + grounded captioning. Both examples of a row see the same image and the same kept patches."""
        examples = self._vision_language_examples(row, rng)
        grid = (self.config.patch_image_size // 16) ** 2
        keep = self.config.sample_patch_num
        if keep is not None and keep < grid:
            indices = np.sort(rng.permutation(grid)[:keep])
            for example in examples:
                example.patch_indices = indices
        return examples

    def _vision_language_examples(self, row: dict[str, Any], rng: np.random.Generator) -> list[Example]:
        cfg, sample_id = self.config, str(row.get("uniq_id", ""))
        kind = row["type"]
        # Caption and VQA images carry no boxes, so a large JPEG may decode at a DCT-reduced size that still covers
        # the largest shorter side the draw can ask for (grounding boxes would have to follow the reduction).
        draft = max(VL_MAX_SHORTER_SIDE, cfg.patch_image_size) if kind in ("caption", "qa") else None
        image = decode_image(row["image"], f"vision_language row {sample_id}", keep_grey=True, draft_shorter_side=draft)
        if kind == "caption":
            tensor, _ = self.vl_transform(image, None, rng)
            caption = normalize_text(row["caption"], cfg.max_tgt_words)
            gt_objects = [o for o in (row.get("gt_objects") or "").split("&&") if o]
            positive = rng.random() < 0.5
            shown = (
                caption
                if positive
                else self.negatives.negative_caption(caption, gt_objects, rng, cfg.negative_object_probability)
            )
            shown = normalize_text(shown, cfg.max_src_words)
            return [
                make_example(
                    self.tokenizer,
                    "caption",
                    self._encode(PROMPT_CAPTION),
                    self._encode(" " + caption),
                    tensor,
                    sample_id=sample_id,
                ),
                make_example(
                    self.tokenizer,
                    "image_text_matching",
                    self._encode(PROMPT_ITM.format(shown)),
                    self.yes if positive else self.no,
                    tensor,
                    sample_id=sample_id,
                ),
            ]
        if kind == "qa":
            tensor, _ = self.vl_transform(image, None, rng)
            question = normalize_text(row["question"], cfg.max_src_words)
            answers, confs = list(row["answers"]), [float(c) for c in row["answer_confs"]]
            best = int(np.argmax(confs))
            answer, conf = answers[best], confs[best]
            positive = rng.random() < 0.5
            shown = answer if positive else self.negatives.negative_answer(answer, rng)
            return [
                make_example(
                    self.tokenizer,
                    "vqa",
                    self._encode(" " + question),
                    self._encode(" " + answer),
                    tensor,
                    weight=conf,
                    sample_id=sample_id,
                ),
                make_example(
                    self.tokenizer,
                    "answer_matching",
                    self._encode(PROMPT_ANSWER_MATCHING.format(question, shown)),
                    self.yes if positive else self.no,
                    tensor,
                    weight=conf,
                    sample_id=sample_id,
                ),
            ]
        if kind == "visual_grounding":
            box = np.asarray(row["box"], dtype=np.float32)[None]
            tensor, target = self.grounding_transform(image, {"boxes": box, "labels": ["region"]}, rng)
            region = self._bins(target["boxes"][0])
            caption = normalize_text(row["caption"], cfg.max_src_words)
            return [
                make_example(
                    self.tokenizer,
                    "visual_grounding",
                    self._encode(PROMPT_GROUNDING.format(caption)),
                    region,
                    tensor,
                    sample_id=sample_id,
                ),
                make_example(
                    self.tokenizer,
                    "grounded_caption",
                    self._encode(PROMPT_GROUNDED_CAPTION) + region,
                    self._encode(" " + normalize_text(row["caption"], cfg.max_tgt_words)),
                    tensor,
                    sample_id=sample_id,
                ),
            ]
        raise ValueError(f"vision_language row {sample_id}: unknown type {kind!r} (caption, qa, visual_grounding)")

    def from_text(self, row: dict[str, Any], rng: np.random.Generator) -> Example:
        """Text infilling: BART whole-word span masking of the lowercased text (the last 256 of 512 tokens)."""
        cfg = self.config
        tokens = self._encode(" " + row["text"].strip().lower())[:512][-cfg.text_max_tokens :]
        tokens_array = np.asarray(tokens, dtype=np.int64)
        masked = whole_word_mask(
            tokens_array,
            self.tokenizer.word_start_mask(tokens_array),
            rng,
            self.tokenizer.mask_id,
            mask_ratio=cfg.mask_ratio,
            poisson_lambda=cfg.poisson_lambda,
            has_bos_eos=False,
        )
        left, right = (self._encode(part) for part in PROMPT_TEXT_INFILLING)
        return make_example(
            self.tokenizer,
            "text_infilling",
            left + masked.tolist() + right,
            tokens,
            weight=cfg.auxiliary_weight,
            sample_id=str(row.get("uniq_id", "")),
        )

    def from_image(self, row: dict[str, Any], rng: np.random.Generator) -> Example:
        """Image infilling: centre of the 256 px image blanked, target its 256 VQ codes."""
        sample_id = str(row.get("uniq_id", ""))
        image = decode_image(row["image"], f"image row {sample_id}", keep_grey=True)
        tensor, _ = self.image_transform(image, None, rng)
        codes = [self.tokenizer.code_id(int(c)) for c in row["code"]]
        example = make_example(
            self.tokenizer,
            "image_infilling",
            self._encode(PROMPT_IMAGE_INFILLING),
            codes,
            tensor,
            weight=self.config.auxiliary_weight,
            code_mask=True,
            sample_id=sample_id,
        )
        low, high = image_center_block(self.config.code_image_size)
        example.image_blank = (low, high, low, high)  # zeroed after normalisation, on the device (mid-grey)
        return example

    def from_detection(self, row: dict[str, Any], rng: np.random.Generator) -> Example:
        """Object detection: per kept box four location bins then its category name."""
        sample_id = str(row.get("uniq_id", ""))
        image = decode_image(row["image"], f"detection row {sample_id}", keep_grey=True)
        boxes = np.asarray([[b["x0"], b["y0"], b["x1"], b["y1"]] for b in row["boxes"]], dtype=np.float32)
        labels = [b["category_name"] for b in row["boxes"]]
        tensor, target = self.detection_transform(image, {"boxes": boxes.reshape(-1, 4), "labels": labels}, rng)
        tokens: list[int] = []
        for box, label in zip(target["boxes"], target["labels"]):
            tokens += self._bins(box) + self._encode(" " + normalize_text(label))
        return make_example(
            self.tokenizer,
            "detection",
            self._encode(PROMPT_DETECTION),
            tokens,
            tensor,
            weight=self.config.auxiliary_weight,
            sample_id=sample_id,
        )
