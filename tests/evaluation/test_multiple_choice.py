"""Multiple-choice accuracy of a causal LM by candidate log-likelihood (biomedgpt/evaluation/multiple_choice.py):
the padded batch scores equal each sequence scored alone; a tiny Llama trained on a learnable synthetic MedMCQA-style
set beats chance on held-out questions while the untrained one does not; bad lines are counted with their line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from biomedgpt.evaluation.multiple_choice import (
    MultipleChoiceError,
    choice_log_likelihoods,
    evaluate_multiple_choice,
    read_questions,
)

ASSETS = Path(__file__).resolve().parents[2] / "biomedgpt" / "assets" / "tokenizer"
STEPS = 80
OPTION_KEYS = ("opa", "opb", "opc", "opd")
ORGANS = ["liver", "heart", "lung", "kidney"]  # the organ named in a question decides the answer letter
FILLERS = ["which finding is typical", "what is most likely seen", "name the usual sign", "what does imaging show"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer, LlamaTokenizer

    directory = tmp_path_factory.mktemp("llama_tokenizer")
    LlamaTokenizer(vocab_file=str(ASSETS / "spm.model"), legacy=False).save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    return LlamaForCausalLM(config)


def synthetic_questions(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        organ = rng.randrange(4)
        options = [f"{ORGANS[k]} sign {rng.randrange(100)}" for k in range(4)]
        question = f"{rng.choice(FILLERS)} in the {ORGANS[organ]}?"
        rows.append({"id": f"q{seed}-{i}", "question": question, "cop": organ, **dict(zip(OPTION_KEYS, options))})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_padded_batch_scores_equal_each_sequence_scored_alone(tokenizer, tmp_path: Path) -> None:
    model = tiny_llama(len(tokenizer)).eval()
    questions, _ = read_questions(write_jsonl(tmp_path / "q.jsonl", synthetic_questions(3, seed=1)), "medmcqa")
    batched = choice_log_likelihoods(model, tokenizer, questions)
    for question, scores in zip(questions, batched):
        prompt = tokenizer(question.prompt)["input_ids"]
        for choice, score in zip(question.choices, scores):
            continuation = tokenizer(choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + continuation])
            with torch.no_grad():
                log_probs = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)[0]
            alone = sum(float(log_probs[len(prompt) + k - 1, token]) for k, token in enumerate(continuation))
            assert score == pytest.approx(alone, abs=1e-4)


def test_a_trained_tiny_llama_beats_chance_on_held_out_questions(tokenizer, tmp_path: Path) -> None:
    train, _ = read_questions(write_jsonl(tmp_path / "train.jsonl", synthetic_questions(256, seed=2)), "medmcqa")
    held_out = write_jsonl(tmp_path / "test.jsonl", synthetic_questions(64, seed=3))
    model = tiny_llama(len(tokenizer))
    untrained = evaluate_multiple_choice("unused", "medmcqa", held_out, tmp_path / "before", model=model,
                                         tokenizer=tokenizer, device="cpu")  # fmt: skip
    # Next-token training on "prompt + correct letter", the loss on the letter (instruction-tuning style).
    examples = []
    for q in train:
        prompt = tokenizer(q.prompt)["input_ids"]
        letter = tokenizer(q.choices[q.answer], add_special_tokens=False)["input_ids"]
        examples.append((prompt + letter, [-100] * len(prompt) + letter))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    rng = random.Random(0)
    for _ in range(STEPS):
        batch = rng.sample(examples, 16)
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([s + [tokenizer.eos_token_id] * (width - len(s)) for s, _ in batch])
        labels = torch.tensor([t + [-100] * (width - len(t)) for _, t in batch])
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = evaluate_multiple_choice("unused", "medmcqa", held_out, tmp_path / "after", model=model,
                                       tokenizer=tokenizer, device="cpu")  # fmt: skip
    assert untrained["chance"] == 0.25 and untrained["accuracy"] < 0.45
    assert trained["accuracy"] >= 0.7, trained
    predictions = [json.loads(line) for line in (tmp_path / "after" / "predictions.jsonl").read_text().splitlines()]
    assert sum(p["correct"] for p in predictions) / len(predictions) == trained["accuracy"]


def test_layouts_and_rejected_lines(tmp_path: Path) -> None:
    pubmedqa = write_jsonl(tmp_path / "p.jsonl", [
        {"pubid": 7, "QUESTION": "Does it help?", "CONTEXTS": ["One.", "Two."], "final_decision": "maybe"},
        {"question": "Is it?", "context": "Text.", "final_decision": "perhaps"},  # line 2: not yes/no/maybe
        "not json",  # line 3
    ])  # fmt: skip
    questions, rejects = read_questions(pubmedqa, "pubmedqa")
    assert len(questions) == 1 and questions[0].id == "7" and questions[0].labels[questions[0].answer] == "maybe"
    assert questions[0].prompt == "Context: One. Two.\nQuestion: Does it help?\nAnswer:"
    assert [(r["line"], r["reason"]) for r in rejects] == [(2, "unknown_answer"), (3, "unreadable_json")]
    rows = synthetic_questions(2, seed=4)
    lettered = {k: v for k, v in rows[1].items() if k != "cop"} | {"answer": "b"}
    medmcqa = write_jsonl(tmp_path / "m.jsonl", [rows[0], {**rows[1], "cop": 4}, {**rows[1], "opc": ""}, lettered])
    questions, rejects = read_questions(medmcqa, "medmcqa")
    assert [q.answer for q in questions] == [rows[0]["cop"], 1]
    assert [(r["line"], r["reason"]) for r in rejects] == [(2, "unknown_answer"), (3, "missing_field")]
    with pytest.raises(MultipleChoiceError, match="unknown layout 'mmlu'"):
        read_questions(medmcqa, "mmlu")


def test_biomedgpt_eval_runs_a_causal_lm_directory(tokenizer, tmp_path: Path) -> None:
    from biomedgpt.cli.evaluate import main

    model_dir = tmp_path / "model"
    tiny_llama(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = write_jsonl(tmp_path / "m.jsonl", [*synthetic_questions(5, seed=5), "{broken"])
    out = tmp_path / "eval"
    assert main(["--model", str(model_dir), "--task", "medmcqa", "--data", str(data), "--out", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["count"] == 5 and metrics["rejected"] == {"unreadable_json": 1}
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 5
