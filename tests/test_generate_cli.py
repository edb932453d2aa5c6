"""``biomedgpt-generate --batch``: a line that cannot be answered is reported with its file:line and marked in the
output, and the other lines are still answered (a real tiny model, real PNG files)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from model_configs import save_small_model
from PIL import Image

from biomedgpt.cli.generate import Generator, main

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_small_model(tmp_path_factory.mktemp("model"), d_model=32, heads=2)


def _png(path: Path, seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_batch_keeps_going_past_a_missing_image(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--model", str(model_dir), "--image-size", str(IMAGE_SIZE), "--device", "cpu", "--answers", "yes,no"]
    scan, other = _png(tmp_path / "scan.png", 0), _png(tmp_path / "other.png", 1)
    missing = tmp_path / "gone.png"
    batch = tmp_path / "requests.jsonl"
    batch.write_text(
        json.dumps({"image": str(scan), "prompt": "is there a lesion?", "id": "a"}) + "\n"
        + json.dumps({"image": str(missing), "prompt": "is there a lesion?", "id": "b"}) + "\n"
        + "\n"  # blank lines are skipped, but still counted for the line numbers
        + "{not json\n"
        + json.dumps({"image": str(other), "prompt": "is it normal?", "id": "c"}) + "\n"
    )  # fmt: skip
    out = tmp_path / "answers.jsonl"
    assert main([*base, "--batch", str(batch), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{batch}:2: image file not found: {missing}" in err
    assert f"{batch}:4: not JSON" in err
    assert "2 of 4 batch lines failed" in err and str(out) in err

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("id") for r in records] == ["a", "b", None, "c"]  # one output line per request, in order
    assert [r.get("line") for r in records] == [None, 2, 4, None]
    assert "error" not in records[0] and "error" not in records[3]
    assert (
        records[1]["output"] is None
        and str(missing) in records[1]["error"]
        and "requests.jsonl:2" in records[1]["error"]
    )
    assert records[2]["output"] is None and "not JSON" in records[2]["error"]

    # The answered lines are what the model answers for those images alone.
    generator = Generator(str(model_dir), answers=["yes", "no"], image_size=IMAGE_SIZE, device="cpu")
    for record, image in ((records[0], scan), (records[3], other)):
        assert record["output"] == generator(image, record["prompt"]) and record["output"] in {"yes", "no"}

    # To stdout the same lines come out; a batch where nothing failed exits 0.
    assert main([*base, "--batch", str(batch)]) == 1
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == records
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"image": str(scan), "prompt": "is there a lesion?"}) + "\n")
    assert main([*base, "--batch", str(good), "--out", str(out)]) == 0
    assert [json.loads(line)["output"] for line in out.read_text().splitlines()] == [records[0]["output"]]


def test_batch_relative_path_and_empty_file(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    base = ["--model", str(model_dir), "--image-size", str(IMAGE_SIZE), "--device", "cpu", "--answers", "yes,no"]
    monkeypatch.chdir(tmp_path)
    batch = tmp_path / "rel.jsonl"
    batch.write_text(json.dumps({"image": "images/x.png", "prompt": "x?"}) + "\n" + json.dumps({"image": 3}) + "\n")
    assert main([*base, "--batch", str(batch)]) == 1
    captured = capsys.readouterr()
    assert f"relative to the working directory {tmp_path}" in captured.err
    assert f'{batch}:2: expected {{"image": path, "prompt": text}}' in captured.err
    second = json.loads(captured.out.splitlines()[1])
    assert second["image"] == 3 and second["line"] == 2 and second["output"] is None

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert main([*base, "--batch", str(empty)]) == 2
    assert f"{empty}: no requests" in capsys.readouterr().err
