"""Answers of a vision-language chat model (a ``vision_chat`` run consolidated by ``biomedgpt-consolidate``, or merged
by ``biomedgpt-merge-lora``) to questions about images, and VQA-as-dialogue evaluation of them.

The prompt is the conversation so far rendered by the chat template the model was trained with (recorded in its
``config.json`` as ``chat``; ``--template`` overrides), ending with the assistant's header, with the image
placeholder repeated once per image feature as in training; transformers' ``generate`` decodes greedily or with
beam search until the template's end-of-reply marker.

Evaluation (``biomedgpt-eval --task vqa_dialogue``) reads conversation shards (``biomedgpt-convert --kind
conversations``: VQA sets rewritten as dialogues, one question per human turn). Every assistant turn is a question,
asked with the reference conversation before it; its id is the row's id (``id#k`` for the k-th reply of a longer
conversation). Scores as for BiomedGPT VQA (:func:`biomedgpt.evaluation.metrics.vqa_accuracy`: exact match after
``strip().lower()``, split into closed and open questions, by ``--answer-types`` or the yes/no rule) plus ROUGE-1/2/L
F-measures of the free-text answers (rouge-score), and the majority-answer baseline of the same questions.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from biomedgpt.data.chat_templates import IMAGE_PLACEHOLDER, REPLY_END, Turn, render_chat

__all__ = ["ChatAnswerer", "ChatQuestion", "chat_questions", "evaluate_vqa_dialogue"]


@dataclass
class ChatQuestion:
    id: str
    image: Any  # a PIL image, or None for a text-only conversation
    history: list[Turn]  # the conversation up to and including the question (a user turn last)
    answer: str  # the reference reply


class ChatAnswerer:
    """A loaded vision_chat model directory answering conversations (batched, left-padded)."""

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        template: str | None = None,
        system: str | None = None,
        beam: int = 1,
        max_new_tokens: int = 32,
        device: str | None = None,
    ) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer

        from biomedgpt.model.vision_chat import image_feature_count, load_vision_chat_model

        directory = Path(model_dir)
        config = json.loads((directory / "config.json").read_text())
        if config.get("model_type") != "llava":
            raise ValueError(f"{directory}: model_type {config.get('model_type')!r}, not a vision_chat model (llava)")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, info = load_vision_chat_model(directory)
        problems = [f"{kind}: {', '.join(keys[:5])}" for kind, keys in info.items() if keys]
        if problems:
            raise ValueError(f"{directory}: the weights do not fit the model ({'; '.join(problems)})")
        self.model = model.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.image_processor = AutoImageProcessor.from_pretrained(directory)
        recorded = config.get("chat") or {}
        self.template = template or recorded.get("template") or "plain"
        self.system = system if system is not None else recorded.get("system")
        self.beam, self.max_new_tokens = beam, max_new_tokens
        self.image_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        self.image_features = image_feature_count(self.model.config)
        marker = REPLY_END[self.template]
        if marker is None:
            self.end_ids = [self.tokenizer.eos_token_id]
        else:
            self.end_ids = self.tokenizer(marker, add_special_tokens=False)["input_ids"][-1:]
            self.end_ids.append(self.tokenizer.eos_token_id)

    def prompt_ids(self, history: Sequence[Turn]) -> list[int]:
        """The token ids of a generation prompt: the template's text up to the assistant's reply, the image
        placeholder repeated once per image feature."""
        rendered = render_chat(self.template, history, self.system, bos=self.tokenizer.bos_token or "",
                               eos=self.tokenizer.eos_token or "")  # fmt: skip
        ids: list[int] = []
        for token in self.tokenizer(rendered.text, add_special_tokens=False)["input_ids"]:
            ids += [token] * (self.image_features if token == self.image_id else 1)
        return ids

    def __call__(self, images: Sequence[Any], histories: Sequence[Sequence[Turn]]) -> list[str]:
        prompts = [self.prompt_ids(history) for history in histories]
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        input_ids = torch.full((len(prompts), width), int(pad), dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        inputs: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
        present = [image for image in images if image is not None]
        if present:
            pixels = self.image_processor(images=present, return_tensors="pt")["pixel_values"]
            inputs["pixel_values"] = pixels.to(next(self.model.parameters()).dtype)
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        with torch.no_grad():
            out = self.model.generate(
                **inputs, num_beams=self.beam, max_new_tokens=self.max_new_tokens, do_sample=False,
                eos_token_id=self.end_ids, pad_token_id=int(pad),
            )  # fmt: skip
        replies = self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        return [reply.strip() for reply in replies]

    def ask(self, image_path: str | os.PathLike[str], question: str) -> str:
        """The reply to one question about one image file (PNG, JPEG or DICOM), asked as the first user turn."""
        from biomedgpt.data.images import load_image

        text = question.strip()
        if IMAGE_PLACEHOLDER not in text:
            text = f"{IMAGE_PLACEHOLDER}\n{text}"
        return self([load_image(image_path)], [[Turn("user", text)]])[0]


def chat_questions(data_dir: str | os.PathLike[str], limit: int | None = None) -> Iterator[ChatQuestion]:
    """Every assistant turn of the conversation shards as a question (see the module docstring)."""
    from biomedgpt.data.images import decode_image
    from biomedgpt.data.parquet_shards import iter_rows

    for row in iter_rows(data_dir, limit):
        turns = [Turn(t["role"], t["text"]) for t in row["turns"]]
        image = None
        if row.get("image") is not None:
            image = decode_image(row["image"], str(row.get("image_source") or row.get("id")))
        replies = [index for index, turn in enumerate(turns) if turn.role == "assistant"]
        for number, index in enumerate(replies, 1):
            question_id = str(row["id"]) if len(replies) == 1 else f"{row['id']}#{number}"
            yield ChatQuestion(question_id, image, turns[:index], turns[index].text)


def evaluate_vqa_dialogue(
    model_dir: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    answer_types: Mapping[str, str] | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    progress: bool = True,
    **answerer: Any,
) -> dict[str, Any]:
    """Answer every question of ``data_dir`` with the model of ``model_dir``; write ``predictions.jsonl`` and
    ``metrics.json`` to ``out_dir`` and return the metrics."""
    from tqdm import tqdm

    from biomedgpt.evaluation.metrics import rouge_scores, vqa_accuracy

    questions = list(chat_questions(data_dir, limit))
    if not questions:
        raise ValueError(f"{data_dir}: no conversation with an assistant reply to evaluate")
    answer = ChatAnswerer(model_dir, **answerer)
    predictions: dict[str, str] = {}
    bar = tqdm(total=len(questions), desc="vqa_dialogue", unit="question", disable=not progress)
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        for question, reply in zip(chunk, answer([q.image for q in chunk], [q.history for q in chunk])):
            predictions[question.id] = reply
        bar.update(len(chunk))
    bar.close()
    references = {q.id: q.answer for q in questions}
    metrics: dict[str, Any] = vqa_accuracy(predictions, references, answer_types)
    metrics.update(rouge_scores([predictions[q.id] for q in questions], [q.answer for q in questions]))
    majority, _ = Counter(q.answer.strip().lower() for q in questions).most_common(1)[0]
    metrics["majority_answer"] = majority
    metrics["majority_accuracy"] = vqa_accuracy(dict.fromkeys(references, majority), references)["accuracy"]
    metrics.update(template=answer.template, beam=answer.beam, max_new_tokens=answer.max_new_tokens)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for q in questions:
            record = {"id": q.id, "question": q.history[-1].text, "answer": q.answer, "prediction": predictions[q.id]}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
