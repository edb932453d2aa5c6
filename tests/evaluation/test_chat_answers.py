"""Answers of a vision-language chat model directory in process (a tiny random Llava saved as biomedgpt-consolidate
writes it): the generation prompt is exactly the start of what training encodes for the same conversation, for
every template; biomedgpt-eval --task vqa_dialogue scores every assistant turn and writes what it scored;
biomedgpt-generate answers about an image file, keeps going past a bad batch line and refuses options that belong to
the other kind of model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from biomedgpt.data.chat_templates import CHAT_TEMPLATES, IGNORE_INDEX, Turn
from biomedgpt.data.conversations import convert_conversations
from biomedgpt.evaluation.chat_answers import ChatAnswerer, chat_questions, evaluate_vqa_dialogue

ASSETS = Path(__file__).resolve().parents[2] / "biomedgpt" / "assets" / "tokenizer"
VISION = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "image_size": 32, "patch_size": 8}  # fmt: skip
LANGUAGE = {"model_type": "llama", "vocab_size": 3008, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
CHAT_MARKERS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>",
                "<|im_end|>"]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llava with a tokenizer holding <image> and every template's markers, trained with llama2."""
    from transformers import CLIPImageProcessor, LlamaTokenizerFast

    from biomedgpt.model.vision_chat import build_vision_chat_model, vision_chat_config

    directory = tmp_path_factory.mktemp("chat") / "model"
    tokenizer = LlamaTokenizerFast(vocab_file=str(ASSETS / "spm.model"), legacy=False)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", *CHAT_MARKERS]})
    assert len(tokenizer) <= LANGUAGE["vocab_size"]
    torch.manual_seed(0)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    model = build_vision_chat_model(vision_chat_config(VISION, LANGUAGE, image_token_id=image_token))
    model.config.chat = {"template": "llama2", "system": None}
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def square(path: Path, rgb: tuple[int, int, int]) -> Path:
    Image.new("RGB", (40, 40), rgb).save(path)
    return path


@pytest.mark.parametrize("template", CHAT_TEMPLATES)
def test_generation_prompt_is_what_training_encodes_before_the_reply(model_dir: Path, template: str) -> None:
    from transformers import AutoImageProcessor

    from biomedgpt.data.vision_chat import ChatExampleBuilder

    answerer = ChatAnswerer(model_dir, template=template, system=None if template == "plain" else "Be brief.")
    question = "<image>\n" if template == "plain" else "<image>\nWhat colour is the square?"
    turns = [Turn("user", question), Turn("assistant", "red")]
    builder = ChatExampleBuilder(answerer.tokenizer, AutoImageProcessor.from_pretrained(model_dir), template,
                                 answerer.image_features, max_length=256, system=answerer.system)  # fmt: skip
    example = builder({"id": "q", "turns": [{"role": t.role, "text": t.text} for t in turns], "image": None})
    first_target = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
    prompt = answerer.prompt_ids(turns[:1])
    assert prompt == example["input_ids"][:first_target]
    assert prompt.count(answerer.image_id) == answerer.image_features == 16


def test_vqa_dialogue_scores_every_assistant_turn(model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    square(tmp_path / "images" / "red.png", (220, 20, 20))
    records = [
        {"id": "a", "image": "red.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "Is it round?"}, {"from": "gpt", "value": "no"}]},
        {"id": "b", "image": "red.png", "conversations": [
            {"from": "human", "value": "<image>\nIs it red?"}, {"from": "gpt", "value": "yes"}]},
    ]  # fmt: skip
    (tmp_path / "vqa.json").write_text(json.dumps(records))
    convert_conversations([tmp_path / "vqa.json"], tmp_path / "vqa", image_folder=tmp_path / "images")
    questions = list(chat_questions(tmp_path / "vqa"))
    expected = [("a#1", "red", 1), ("a#2", "no", 3), ("b", "yes", 1)]  # id, reference, turns asked with
    assert [(q.id, q.answer, len(q.history)) for q in questions] == expected

    metrics = evaluate_vqa_dialogue(model_dir, tmp_path / "vqa", tmp_path / "out", batch_size=2, progress=False,
                                    max_new_tokens=3)  # fmt: skip
    predictions = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in predictions] == ["a#1", "a#2", "b"]
    # The batched, left-padded answers are those of each question asked alone.
    alone = ChatAnswerer(model_dir, max_new_tokens=3)
    for question, record in zip(questions, predictions):
        assert record["prediction"] == alone([question.image], [question.history])[0]
    hits = [p["prediction"].strip().lower() == p["answer"] for p in predictions]
    assert metrics["count"] == 3 and metrics["accuracy"] == pytest.approx(sum(hits) / 3)
    assert (metrics["closed_count"], metrics["open_count"]) == (2, 1)  # yes/no answers are closed questions
    assert metrics["majority_accuracy"] == pytest.approx(1 / 3) and metrics["template"] == "llama2"
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == metrics


def test_generate_answers_about_an_image_and_refuses_foreign_options(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from biomedgpt.cli.evaluate import main as evaluate
    from biomedgpt.cli.generate import main as generate

    image = square(tmp_path / "red.png", (220, 20, 20))
    expected = ChatAnswerer(model_dir, beam=2, max_new_tokens=3).ask(image, "What colour is it?")
    batch = tmp_path / "requests.jsonl"
    requests = [
        {"image": str(image), "prompt": "What colour is it?"},
        {"image": str(tmp_path / "gone.png"), "prompt": "What colour is it?"},
    ]
    batch.write_text("".join(json.dumps(request) + "\n" for request in requests))
    out = tmp_path / "answers.jsonl"
    argv = ["--model", str(model_dir), "--beam", "2", "--max-len-b", "3"]
    assert generate([*argv, "--batch", str(batch), "--out", str(out)]) == 1
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["output"] == expected and lines[1]["output"] is None and "gone.png" in lines[1]["error"]
    capsys.readouterr()

    assert generate([*argv, "--image", str(image), "--prompt", "What colour is it?", "--answers", "red"]) == 2
    assert "--answers and --image-size apply to BiomedGPT models" in capsys.readouterr().err
    data = ["--model", str(model_dir), "--task", "vqa_dialogue", "--data", str(tmp_path), "--no-progress"]
    assert evaluate([*data, "--answers", "a.json"]) == 2
    assert "do not apply to vqa_dialogue" in capsys.readouterr().err
    assert evaluate([*data, "--template", "alpaca"]) == 2
    assert "--template 'alpaca'" in capsys.readouterr().err
