"""Chat templates for vision-language chat training (LLaVA-style): a conversation -> token ids and labels, the loss on
the assistant's tokens only.

Templates (the text each one renders; ``{…}`` the turns, loss on the underlined parts):

- ``plain`` (LLaVA's feature-alignment stage, ``conv_llava_plain``): ``<image>{caption}\\n`` after the tokenizer's BOS;
  the human turn is only the image. Loss: ``{caption}\\n``.
- ``llama2`` (Llama-2-chat, LLaVA's ``conv_llava_llama_2``):
  ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant} </s><s>[INST] {user} [/INST] …``.
  Loss: `` {assistant} </s>``.
- ``llama3`` (Llama-3-Instruct, OpenBioLLM's): ``<|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n
  {system}<|eot_id|><|start_header_id|>user<|end_header_id|>\\n\\n{user}<|eot_id|><|start_header_id|>assistant
  <|end_header_id|>\\n\\n{assistant}<|eot_id|>…``. Loss: ``{assistant}<|eot_id|>``.
- ``chatml`` (Qwen, many others): ``<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{user}<|im_end|>\\n
  <|im_start|>assistant\\n{assistant}<|im_end|>\\n…``. Loss: ``{assistant}<|im_end|>``.

Why not ``tokenizer.apply_chat_template``: its assistant mask (``return_assistant_tokens_mask``) needs
``{% generation %}`` markers that the published Llama-2/3 and Qwen templates do not have, and a template stored in
a tokenizer is not pinned by the project. Here the text is rendered with the character span of every trained part,
tokenized once (so the tokens are those of the whole text, as at inference), and a token carries loss when its
characters lie in a trained span (the fast tokenizer's offsets). The special markers (``<|eot_id|>``,
``<|im_end|>``, ``<s>``, ``</s>``, the ``<image>`` placeholder) must be tokens of the tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CHAT_TEMPLATES",
    "IMAGE_PLACEHOLDER",
    "ChatTemplateError",
    "EncodedChat",
    "RenderedChat",
    "Turn",
    "encode_chat",
    "render_chat",
]

IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100
CHAT_TEMPLATES = ("plain", "llama2", "llama3", "chatml")


# Markers each template writes that must be single tokens of the tokenizer (llama2 and plain write only BOS/EOS).
TEMPLATE_MARKERS = {
    "plain": (),
    "llama2": (),
    "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "chatml": ("<|im_start|>", "<|im_end|>"),
}


# The text that ends an assistant reply, per template (generation stops there); None: the tokenizer's EOS.
REPLY_END = {"plain": "\n", "llama2": None, "llama3": "<|eot_id|>", "chatml": "<|im_end|>"}


class ChatTemplateError(ValueError):
    """A conversation or tokenizer the template cannot encode (the message says which and why)."""


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "assistant" (LLaVA's "human" / "gpt")
    text: str


@dataclass(frozen=True)
class RenderedChat:
    text: str
    targets: list[tuple[int, int]]  # character spans [start, end) that carry loss
    prompt_end: int  # where the text of a generation prompt ends (before the first assistant reply)


@dataclass(frozen=True)
class EncodedChat:
    input_ids: list[int]
    labels: list[int]  # the token where it carries loss, IGNORE_INDEX elsewhere


class _Builder:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.targets: list[tuple[int, int]] = []
        self.length = 0

    def add(self, text: str, target: bool = False) -> None:
        if target and text:
            self.targets.append((self.length, self.length + len(text)))
        self.parts.append(text)
        self.length += len(text)


def _check_turns(turns: Sequence[Turn]) -> None:
    if not turns:
        raise ChatTemplateError("an empty conversation")
    for index, turn in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if turn.role != expected:
            raise ChatTemplateError(f"turn {index + 1} is from {turn.role!r}; turns alternate user, assistant, ...")


def render_chat(
    template: str, turns: Sequence[Turn], system: str | None = None, bos: str = "<s>", eos: str = "</s>"
) -> RenderedChat:
    """The text of ``turns`` in ``template`` and the character spans that carry loss. A conversation ending with a
    user turn renders as a generation prompt (the assistant's header last, no target). ``bos``/``eos`` are the
    tokenizer's own (``llama2`` and ``plain`` write them as text)."""
    if template not in CHAT_TEMPLATES:
        raise ChatTemplateError(f"unknown chat template {template!r}; choose one of {', '.join(CHAT_TEMPLATES)}")
    _check_turns(turns)
    out = _Builder()
    prompt_end: int | None = None
    pairs = [(turns[i].text, turns[i + 1].text if i + 1 < len(turns) else None) for i in range(0, len(turns), 2)]
    if template == "plain":
        if len(pairs) != 1:
            raise ChatTemplateError("the plain template (alignment) takes one image and one caption")
        user, caption = pairs[0]
        out.add(bos + IMAGE_PLACEHOLDER if IMAGE_PLACEHOLDER in user else bos)
        prompt_end = out.length
        if caption is not None:
            out.add(caption + "\n", target=True)
    elif template == "llama2":
        for index, (user, reply) in enumerate(pairs):
            if index == 0 and system:
                user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
            out.add(f"{bos}[INST] {user} [/INST]")
            prompt_end = out.length if prompt_end is None else prompt_end
            if reply is not None:
                out.add(f" {reply} {eos}", target=True)
    elif template == "llama3":
        out.add("<|begin_of_text|>")
        if system:
            out.add(f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>")
        for user, reply in pairs:
            out.add(f"<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>")
            out.add("<|start_header_id|>assistant<|end_header_id|>\n\n")
            prompt_end = out.length if prompt_end is None else prompt_end
            if reply is not None:
                out.add(f"{reply}<|eot_id|>", target=True)
    else:  # chatml
        if system:
            out.add(f"<|im_start|>system\n{system}<|im_end|>\n")
        for user, reply in pairs:
            out.add(f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
            prompt_end = out.length if prompt_end is None else prompt_end
            if reply is not None:
                out.add(f"{reply}<|im_end|>", target=True)
                out.add("\n")
    assert prompt_end is not None
    return RenderedChat("".join(out.parts), out.targets, prompt_end)


def encode_chat(
    template: str, turns: Sequence[Turn], tokenizer: Any, system: str | None = None, max_length: int | None = None
) -> EncodedChat:
    """Token ids and labels of ``turns`` (see :func:`render_chat`): a token carries loss when its characters lie in a
    trained span. ``max_length`` cuts the end (the cut part carries no loss then)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ChatTemplateError(
            f"{type(tokenizer).__name__} is a slow tokenizer: chat encoding needs a fast one (character offsets); "
            "load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    rendered = render_chat(template, turns, system, bos=tokenizer.bos_token or "", eos=tokenizer.eos_token or "")
    markers = [*TEMPLATE_MARKERS[template], *([IMAGE_PLACEHOLDER] if IMAGE_PLACEHOLDER in rendered.text else [])]
    missing = [m for m in markers if len(tokenizer(m, add_special_tokens=False)["input_ids"]) != 1]
    if missing:
        raise ChatTemplateError(
            f"{', '.join(missing)} must each be one token of the tokenizer for the {template} template (add them "
            "with tokenizer.add_special_tokens and resize the model's embeddings)"
        )
    encoded = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    span = 0
    for index, (start, end) in enumerate(encoded["offset_mapping"]):
        while span < len(rendered.targets) and rendered.targets[span][1] <= start:
            span += 1
        if span < len(rendered.targets) and end > start:
            target_start, target_end = rendered.targets[span]
            if start >= target_start and end <= target_end:
                labels[index] = input_ids[index]
            elif start < target_end and end > target_start:
                raise ChatTemplateError(
                    f"token {index} ({rendered.text[start:end]!r}) straddles the edge of a trained span: the "
                    f"{template} template's markers are not tokens of this tokenizer"
                )
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return EncodedChat(input_ids, labels)
