"""Chat templates (biomedgpt/data/chat_templates.py): for each template, exactly which tokens carry loss (the
assistant replies and their end-of-turn marker, nothing of the user, system or headers), the image placeholder stays
one token without loss, a conversation ending with the user renders a generation prompt, and what cannot be encoded
is refused with the reason."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from biomedgpt.data.chat_templates import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    ChatTemplateError,
    Turn,
    encode_chat,
    render_chat,
)

ASSETS = Path(__file__).resolve().parents[2] / "biomedgpt" / "assets" / "tokenizer"
MARKERS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>"]
TURNS = [
    Turn("user", f"{IMAGE_PLACEHOLDER}\nwhat organ is shown?"),
    Turn("assistant", "the liver."),
    Turn("user", "is it normal?"),
    Turn("assistant", "yes"),
]


@pytest.fixture(scope="module")
def plain_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """The shipped SentencePiece model as a fast Llama tokenizer, with only the image placeholder added."""
    from transformers import AutoTokenizer, LlamaTokenizer

    directory = tmp_path_factory.mktemp("chat_tokenizer")
    LlamaTokenizer(vocab_file=str(ASSETS / "spm.model"), legacy=False).save_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]})
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer(plain_tokenizer):
    """With the Llama-3 and ChatML markers as tokens too."""
    import copy

    tokenizer = copy.deepcopy(plain_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER, *MARKERS]})
    return tokenizer


def loss_spans(tokenizer, encoded) -> list[str]:
    """The decoded runs of consecutive tokens that carry loss."""
    spans, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    if current:
        spans.append(tokenizer.decode(current))
    return spans


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("llama2", ["the liver. </s>", "yes </s>"]),
        ("llama3", ["the liver.<|eot_id|>", "yes<|eot_id|>"]),
        ("chatml", ["the liver.<|im_end|>", "yes<|im_end|>"]),
    ],
)
def test_exactly_the_assistant_replies_and_their_end_marker_carry_loss(tokenizer, template, expected) -> None:
    encoded = encode_chat(template, TURNS, tokenizer, system="answer briefly")
    assert loss_spans(tokenizer, encoded) == expected
    # The tokens are the whole rendered text's, once: decoding them gives the text back.
    text = render_chat(template, TURNS, "answer briefly", bos="<s>", eos="</s>").text
    assert tokenizer.decode(encoded.input_ids) == text
    image = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    assert encoded.input_ids.count(image) == 1 and encoded.labels[encoded.input_ids.index(image)] == IGNORE_INDEX
    assert "answer briefly" in text and "what organ is shown?" in text


def test_plain_alignment_trains_on_the_caption_after_the_image(tokenizer) -> None:
    encoded = encode_chat("plain", [Turn("user", f"{IMAGE_PLACEHOLDER}\n"), Turn("assistant", "ct of the liver")],
                          tokenizer)  # fmt: skip
    tokens = tokenizer.convert_ids_to_tokens(encoded.input_ids)
    assert tokens[:2] == ["<s>", IMAGE_PLACEHOLDER]
    assert loss_spans(tokenizer, encoded) == ["ct of the liver\n"]
    assert encoded.labels[:2] == [IGNORE_INDEX, IGNORE_INDEX]
    with pytest.raises(ChatTemplateError, match="one image and one caption"):
        encode_chat("plain", TURNS, tokenizer)


@pytest.mark.parametrize("template", ["llama2", "llama3", "chatml"])
def test_a_conversation_ending_with_the_user_is_a_generation_prompt(tokenizer, template) -> None:
    rendered = render_chat(template, TURNS[:3])
    assert rendered.text.endswith(("[/INST]", "<|start_header_id|>assistant<|end_header_id|>\n\n",
                                   "<|im_start|>assistant\n"))  # fmt: skip
    assert len(rendered.targets) == 1  # only the first reply
    assert rendered.text[: rendered.prompt_end] == render_chat(template, TURNS[:1]).text


def test_what_cannot_be_encoded_is_refused(plain_tokenizer, tokenizer) -> None:
    with pytest.raises(ChatTemplateError, match="turn 2 is from 'user'"):
        encode_chat("chatml", [Turn("user", "a"), Turn("user", "b")], tokenizer)
    with pytest.raises(ChatTemplateError, match="empty conversation"):
        encode_chat("chatml", [], tokenizer)
    with pytest.raises(ChatTemplateError, match="unknown chat template 'vicuna'"):
        encode_chat("vicuna", TURNS, tokenizer)
    # Llama-3's markers are no tokens of this tokenizer: as text pieces they would train as words.
    expected = re.escape(", ".join(MARKERS[:4]) + " must each be one token of the tokenizer for the llama3 template")
    with pytest.raises(ChatTemplateError, match=expected):
        encode_chat("llama3", TURNS, plain_tokenizer)
    encode_chat("llama2", TURNS, plain_tokenizer)  # its markers are text and the tokenizer's own BOS/EOS
    from transformers import LlamaTokenizer

    slow = LlamaTokenizer(vocab_file=str(ASSETS / "spm.model"), legacy=False)
    with pytest.raises(ChatTemplateError, match="slow tokenizer"):
        encode_chat("llama2", TURNS, slow)


def test_max_length_cuts_the_end(tokenizer) -> None:
    full = encode_chat("chatml", TURNS, tokenizer)
    cut = encode_chat("chatml", TURNS, tokenizer, max_length=len(full.input_ids) - 3)
    assert cut.input_ids == full.input_ids[:-3] and cut.labels == full.labels[:-3]
