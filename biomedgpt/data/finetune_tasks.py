"""Fine-tuning examples for the five downstream tasks, with the original prompts and target layouts.

The originals: BiomedGPT data/mm_data/vqa_gen_dataset.py, caption_dataset.py, data/nlg_data/summary_dataset.py,
data/nlu_data/mnli_dataset.py and data/cv_data/image_classify_dataset.py.

VQA and NLI put a prompt on the decoder side (``prompt_type`` ``prev_output`` / ``src``): the decoder reads the
question (or the whole source) first and only the answer positions carry loss; the answer positions also carry the
trie's allowed tokens for constrained training and decoding.
"""

from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from biomedgpt.data.examples import Example, make_example, normalize_text
from biomedgpt.data.images import DEFAULT_MEAN, DEFAULT_STD, decode_image
from biomedgpt.data.noising import replace_with_random
from biomedgpt.data.transforms import finetune_transform
from biomedgpt.model_dir_files import TASK_FILE
from biomedgpt.tasks import finetune_task
from biomedgpt.tokenizer import BiomedGPTTokenizer
from biomedgpt.trie import Trie

NLI_ANSWERS = {0: "maybe", 1: "yes", 2: "no"}  # MedNLI labels: 0 neutral, 1 entailment, 2 contradiction
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_PUNCTUATION = str.maketrans("", "", string.punctuation)

PROMPT_CAPTION = " what does the image describe?"
PROMPT_SUMMARY_LEFT, PROMPT_SUMMARY_RIGHT = ' what is the summary of article "', ' "?'
PROMPT_NLI = ' can text1 " {} " imply text2 " {} "?'
PROMPT_OBJECTS = " object: {}"


@dataclass
class FinetuneTaskConfig:
    """Per-task settings of the original fine-tuning scripts (BiomedGPT scripts/*/train_*.sh)."""

    task: str
    patch_image_size: int = 256
    max_src_words: int = 80
    max_tgt_words: int = 30
    max_src_tokens: int = 512  # summarization source, in BPE tokens
    add_object: bool = False  # VQA: append " object: ..." from the objects column
    max_objects: int = 30
    noise_ratio: float = 0.0  # summarization: decoder-input tokens replaced by random ones while training
    imagenet_normalization: bool = False  # classification (MedMNIST) uses ImageNet mean/std

    def __post_init__(self) -> None:
        finetune_task(self.task)  # a ValueError naming the tasks when it is none
        if self.patch_image_size <= 0 or self.patch_image_size % 16:
            raise ValueError(f"patch_image_size={self.patch_image_size} must be a positive multiple of 16")
        if not 0.0 <= self.noise_ratio < 1.0:
            raise ValueError(f"noise_ratio={self.noise_ratio} must lie in [0, 1)")


def write_task_file(directory: str | os.PathLike, task_config: FinetuneTaskConfig, answers: list[str] | None) -> Path:
    """Record in a model directory how it was fine-tuned, so evaluation prepares inputs the same way."""
    record = {
        "task": task_config.task,
        "patch_image_size": task_config.patch_image_size,
        "add_object": task_config.add_object,
        "imagenet_normalization": task_config.imagenet_normalization,
        "answers": list(answers) if answers else None,
    }
    path = Path(directory) / TASK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(record, indent=2) + "\n")
    staging.replace(path)  # a reader never sees half a file
    return path


def read_task_file(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The :data:`TASK_FILE` record of a model directory, or None when it has none (a pretrained or imported one)."""
    path = Path(model_dir) / TASK_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); delete it or fix it") from error
    if not isinstance(record, dict) or "task" not in record:
        raise ValueError(f"{path}: expected a JSON object with a 'task' key")
    return record


def load_answer_list(path: str | Path) -> list[str]:
    """Candidate answers from JSON: a list of strings, or {answer: index} (the original ans2label files)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read answers file {path}: {error}") from error
    if isinstance(data, dict):
        try:
            return [answer for answer, _ in sorted(data.items(), key=lambda item: int(item[1]))]
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: answer -> index values must be integers") from error
    if isinstance(data, list) and data and all(isinstance(answer, str) for answer in data):
        return list(data)
    raise ValueError(f"{path}: expected a non-empty JSON list of answers or a dict answer -> index")


def answer_trie(answers: list[str], tokenizer: BiomedGPTTokenizer) -> Trie:
    """Trie over ``[bos] + encode(" " + answer) + [eos]`` for every candidate answer.

    As BiomedGPT utils/trie.py, filled in ``build_model`` of tasks/mm_tasks/vqa_gen.py.
    """
    return Trie.from_answers(answers, tokenizer)


def _allowed_after(trie: Trie, answer: list[int], bos: int) -> list[list[int] | None]:
    """Allowed next tokens at each answer position and at the final eos."""
    return [trie.next_tokens([bos, *answer[:position]]) for position in range(len(answer) + 1)]


class FinetuneExampleBuilder:
    """Turns rows of a converted fine-tuning dataset into examples (training or evaluation)."""

    def __init__(
        self, tokenizer: BiomedGPTTokenizer, config: FinetuneTaskConfig, candidate_answers: list[str] | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.transform = finetune_transform(config.patch_image_size)
        # Applied on the device to the uint8 images (biomedgpt.data.examples.images_on_device).
        self.image_mean, self.image_std = (
            (IMAGENET_MEAN, IMAGENET_STD) if config.imagenet_normalization else (DEFAULT_MEAN, DEFAULT_STD)
        )
        self.trie = answer_trie(candidate_answers, tokenizer) if candidate_answers else None
        if config.task == "nli":
            self.trie = answer_trie(list(NLI_ANSWERS.values()), tokenizer)

    def _image(self, row: dict[str, Any], name: str, rng: np.random.Generator) -> torch.Tensor:
        image = decode_image(row["image"], f"{self.config.task} row {name}", keep_grey=True)
        tensor, _ = self.transform(image, None, rng)
        return tensor

    def build(self, row: dict[str, Any], rng: np.random.Generator, train: bool = True) -> Example:
        example: Example = getattr(self, f"_{self.config.task}")(row, rng, train)
        example.image_mean, example.image_std = self.image_mean, self.image_std
        return example

    def _vqa(self, row: dict[str, Any], rng: np.random.Generator, train: bool) -> Example:
        cfg, tok = self.config, self.tokenizer
        question = normalize_text(row["question"], cfg.max_src_words)
        question = question if question.endswith("?") else question + "?"
        source = tok.encode(" " + question)
        if cfg.add_object and row.get("objects"):
            objects = " ".join(row["objects"].strip().split("&&")[: cfg.max_objects])
            source += tok.encode(PROMPT_OBJECTS.format(objects))
        confs = [float(c) for c in row["answer_confs"]]
        best = int(np.argmax(confs))
        answer_text = row["answers"][best]
        answer = tok.encode(" " + answer_text)
        # prompt_type=prev_output: the decoder reads [bos] + question, then the answer; loss only on the answer.
        prev_output = np.asarray([tok.bos_id, *source, *answer], dtype=np.int64)
        target = np.asarray([*[tok.pad_id] * len(source), *answer, tok.eos_id], dtype=np.int64)
        example = make_example(
            tok,
            "vqa",
            source,
            answer,
            self._image(row, row["question_id"], rng),
            weight=confs[best],
            sample_id=str(row["question_id"]),
        )
        example.prev_output, example.target = prev_output, target
        example.extra.update(
            decoder_prefix=list(source),
            references=dict(zip(row["answers"], confs)),
            answer=answer_text,
        )
        if self.trie is not None:
            example.allowed_tokens = [None] * len(source) + _allowed_after(self.trie, answer, tok.bos_id)
        return example

    def _caption(self, row: dict[str, Any], rng: np.random.Generator, train: bool) -> Example:
        cfg, tok = self.config, self.tokenizer
        references = [r.strip() for r in row["caption"].split("&&") if r.strip()]
        target_text = normalize_text(references[0].translate(_PUNCTUATION), cfg.max_tgt_words)
        example = make_example(
            tok,
            "caption",
            tok.encode(PROMPT_CAPTION),
            tok.encode(" " + target_text),
            self._image(row, row["uniq_id"], rng),
            sample_id=str(row.get("image_id") or row["uniq_id"]),
        )
        example.extra["references"] = references
        return example

    def _summarization(self, row: dict[str, Any], rng: np.random.Generator, train: bool) -> Example:
        cfg, tok = self.config, self.tokenizer
        article = normalize_text(row["source"], cfg.max_src_tokens)
        body = tok.encode(" " + article)[: cfg.max_src_tokens]
        source = tok.encode(PROMPT_SUMMARY_LEFT) + body + tok.encode(PROMPT_SUMMARY_RIGHT)
        summary = normalize_text(row["target"], 128)
        example = make_example(
            tok, "summarization", source, tok.encode(summary), sample_id=str(row.get("source_line", ""))
        )
        if train and cfg.noise_ratio > 0:
            noised = replace_with_random(example.prev_output[1:], cfg.noise_ratio, rng, tok.random_replacement_range)
            example.prev_output = np.concatenate([example.prev_output[:1], noised])
        example.extra["references"] = [row["target"]]
        return example

    def _nli(self, row: dict[str, Any], rng: np.random.Generator, train: bool) -> Example:
        tok = self.tokenizer
        first = normalize_text(row["sentence1"], 512)
        second = normalize_text(row["sentence2"], 512)
        source = tok.encode(PROMPT_NLI.format(first, second))
        label_text = NLI_ANSWERS[int(row["label"])]
        label = tok.encode(" " + label_text)
        # prompt_type=src: the decoder reads [bos] + source, then predicts the label (one token with GPT-2 BPE;
        # a user-trained tokenizer may split it, so longer labels are allowed). No eos after the label.
        example = make_example(tok, "nli", source, label, sample_id=str(row.get("source_line", "")))
        example.prev_output = np.asarray([tok.bos_id, *source, *label[:-1]], dtype=np.int64)
        example.target = np.asarray([*[tok.pad_id] * len(source), *label], dtype=np.int64)
        example.extra.update(decoder_prefix=list(source), answer=label_text)
        assert self.trie is not None
        example.allowed_tokens = [None] * len(source) + _allowed_after(self.trie, label, tok.bos_id)[:-1]
        return example

    def _classification(self, row: dict[str, Any], rng: np.random.Generator, train: bool) -> Example:
        tok = self.tokenizer
        answer = tok.encode(" " + row["label_name"])
        example = make_example(
            tok,
            "classification",
            tok.encode(PROMPT_CAPTION),
            answer,
            self._image(row, str(row.get("source_line", "")), rng),
            sample_id=str(row.get("source_line", "")),
        )
        example.extra["answer"] = row["label_name"]
        if self.trie is not None:
            example.allowed_tokens = _allowed_after(self.trie, answer, tok.bos_id)
        return example
