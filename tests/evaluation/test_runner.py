"""biomedgpt-eval / biomedgpt-generate on a tiny random model and the sample corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from model_configs import save_small_model

from biomedgpt.cli.evaluate import main as eval_main
from biomedgpt.cli.generate import main as generate_main
from biomedgpt.data.finetune_tasks import NLI_ANSWERS
from biomedgpt.demo import prepare_demo_data
from biomedgpt.evaluation.runner import EvaluationError, evaluate, load_answer_list

IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_small_model(tmp_path_factory.mktemp("model"), d_model=64, heads=4)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    prepare_demo_data(root, rows=8, image_size=IMAGE_SIZE)
    return root


def _data(demo: Path, task: str) -> Path:
    return demo / "converted" / f"{task}_val"


def _predictions(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def _vqa_score(record: dict) -> float:
    """The recorded prediction's VQA score: its reference confidence (0 when it is not a reference answer)."""
    references = record["references"]
    confidences = references if isinstance(references, dict) else {answer: 1.0 for answer in references}
    return float({k.strip().lower(): v for k, v in confidences.items()}.get(record["prediction"].strip().lower(), 0.0))


def test_vqa_constrained_with_answer_types(model_dir: Path, demo: Path, tmp_path: Path) -> None:
    answers = load_answer_list(demo / "corpus" / "vqa_ans2label.json")
    types = json.loads((demo / "corpus" / "vqa_answer_types.json").read_text())
    metrics = evaluate(
        model_dir, "vqa", _data(demo, "vqa"), tmp_path, answers=answers, answer_types=types,
        image_size=IMAGE_SIZE, limit=2, progress=False,
    )  # fmt: skip
    assert metrics["count"] == 2 and metrics["answer_type_source"] == "given"
    predictions = _predictions(tmp_path)
    assert len(predictions) == 2
    assert all(p["prediction"] in answers for p in predictions)
    # The reported metrics, recomputed from the recorded predictions and the given answer types.
    scores = [_vqa_score(p) for p in predictions]
    assert metrics["accuracy"] == pytest.approx(sum(scores) / 2)
    for kind in ("closed", "open"):
        mine = [score for p, score in zip(predictions, scores) if types[str(p["id"])].upper() == kind.upper()]
        assert metrics[f"{kind}_count"] == len(mine)
        assert metrics[f"{kind}_accuracy"] == (pytest.approx(sum(mine) / len(mine)) if mine else None)
    assert json.loads((tmp_path / "metrics.json").read_text())["accuracy"] == metrics["accuracy"]


def test_vqa_default_candidates_and_cli(model_dir: Path, demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    code = eval_main([
        "--model", str(model_dir), "--task", "vqa", "--data", str(_data(demo, "vqa")), "--out", str(out),
        "--image-size", str(IMAGE_SIZE), "--beam", "2", "--no-progress", "--device", "cpu",
    ])  # fmt: skip
    assert code == 0
    predictions = _predictions(out)
    candidates = {a for p in predictions for a in p["references"]}
    assert predictions and all(p["prediction"] in candidates for p in predictions)


@pytest.mark.parametrize("task", ["caption", "summarization"])
def test_generative_tasks(model_dir: Path, demo: Path, tmp_path: Path, task: str) -> None:
    metrics = evaluate(
        model_dir, task, _data(demo, task), tmp_path, beam=2, max_len_b=6, image_size=IMAGE_SIZE, progress=False
    )
    from biomedgpt.evaluation.metrics import caption_metrics, summary_metrics

    predictions = _predictions(tmp_path)
    assert len(predictions) == metrics["count"] == 2
    assert all(p["prediction"] and p["references"] for p in predictions)
    # The reported metrics are those of the recorded predictions against the recorded references.
    if task == "caption":
        expected = caption_metrics(
            {i: p["prediction"] for i, p in enumerate(predictions)},
            {i: p["references"] for i, p in enumerate(predictions)},
        )
    else:
        expected = summary_metrics([p["prediction"] for p in predictions], [p["references"][0] for p in predictions])
    keys = {"cider", "rouge_l"} if task == "caption" else {"rouge1", "rouge2", "rougeL"}
    assert keys <= set(metrics)
    for key in keys:
        assert metrics[key] == pytest.approx(expected[key]), key


def test_nli_and_classification(model_dir: Path, demo: Path, tmp_path: Path) -> None:
    nli = evaluate(model_dir, "nli", _data(demo, "nli"), tmp_path / "nli", image_size=IMAGE_SIZE, progress=False)
    recorded = _predictions(tmp_path / "nli")
    assert {p["prediction"] for p in recorded} <= set(NLI_ANSWERS.values())
    assert nli["accuracy"] == pytest.approx(sum(p["prediction"] == p["reference"] for p in recorded) / len(recorded))

    classes = load_answer_list(demo / "corpus" / "classification_class2label.json")
    cls = evaluate(
        model_dir, "classification", _data(demo, "classification"), tmp_path / "cls", answers=classes,
        image_size=IMAGE_SIZE, batch_size=1, progress=False,
    )  # fmt: skip
    predictions = _predictions(tmp_path / "cls")
    assert cls["count"] == len(predictions) == 2 and all(p["prediction"] in classes for p in predictions)
    assert cls["accuracy"] == pytest.approx(sum(p["prediction"] == p["reference"] for p in predictions) / 2)


def test_mlflow_logging(model_dir: Path, demo: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    metrics = evaluate(
        model_dir, "nli", _data(demo, "nli"), tmp_path / "out", image_size=IMAGE_SIZE, progress=False,
        tracking_uri=uri, experiment="eval-test",
    )  # fmt: skip
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("eval-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == metrics["mlflow_run_id"]
    assert runs[0].data.metrics["accuracy"] == pytest.approx(metrics["accuracy"])
    assert runs[0].data.params["task"] == "nli"
    names = {a.path for a in client.list_artifacts(runs[0].info.run_id, "evaluation")}
    assert {"evaluation/metrics.json", "evaluation/predictions.jsonl"} <= names


def test_eval_cli_bad_input(model_dir: Path, demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert eval_main(["--model", str(tmp_path), "--task", "nli", "--data", str(_data(demo, "nli"))]) == 2
    assert "not a model directory" in capsys.readouterr().err
    assert eval_main(["--model", str(model_dir), "--task", "nli", "--data", str(tmp_path)]) == 2
    assert "index.json" in capsys.readouterr().err
    bad = tmp_path / "answers.json"
    bad.write_text("{not json")
    args = ["--model", str(model_dir), "--task", "vqa", "--data", str(_data(demo, "vqa")), "--answers", str(bad)]
    assert eval_main(args) == 2
    with pytest.raises(EvaluationError):
        evaluate(model_dir, "nope", _data(demo, "nli"), tmp_path)
    with pytest.raises(SystemExit):
        eval_main(["--model", str(model_dir), "--task", "nope", "--data", str(tmp_path)])


def test_generate_cli_dicom(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import pydicom.data

    dicom = pydicom.data.get_testdata_file("CT_small.dcm")
    base = ["--model", str(model_dir), "--image-size", str(IMAGE_SIZE), "--device", "cpu"]
    assert generate_main([*base, "--image", dicom, "--prompt", "What does the image describe?", "--max-len-b", "4",
                          "--beam", "2"]) == 0  # fmt: skip
    assert isinstance(capsys.readouterr().out, str)

    assert generate_main([*base, "--image", dicom, "--prompt", "Is there a lesion?", "--answers", "yes,no"]) == 0
    assert capsys.readouterr().out.strip() in {"yes", "no"}

    batch = tmp_path / "batch.jsonl"
    batch.write_text(
        json.dumps({"image": dicom, "prompt": "is this ct?"}) + "\n" + json.dumps({"image": dicom, "prompt": "x?"})
    )
    out = tmp_path / "out.jsonl"
    args = [*base, "--batch", str(batch), "--answers", "yes,no", "--out", str(out)]
    assert generate_main(args) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 2 and all(line["output"] in {"yes", "no"} for line in lines)
    assert lines[0]["prompt"] == "is this ct?"

    assert generate_main([*base, "--batch", str(batch), "--answers", "yes,no"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2

    assert generate_main([*base, "--image", str(tmp_path / "missing.png"), "--prompt", "x"]) == 2
    assert "not found" in capsys.readouterr().err
    assert generate_main([*base, "--prompt", "x"]) == 2
