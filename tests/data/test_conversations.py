"""LLaVA conversation JSON -> shards with the image bytes inside (biomedgpt/data/conversations.py,
``biomedgpt-convert --kind conversations``): kept records hold their turns and the image file's bytes exactly
(PNG, JPEG, DICOM, by path or embedded as base64, or no image); every kind of bad record is counted and written to
rejects.jsonl with its line; the shards stream; too many rejects fail without an index."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from biomedgpt.data.conversations import ConversationConversionError, convert_conversations
from biomedgpt.data.parquet_shards import iter_rows, read_index


def png_bytes(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 10), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def turns(question: str, answer: str, *more: str) -> list[dict]:
    values = [question, answer, *more]
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": value} for i, value in enumerate(values)]


@pytest.fixture
def images(tmp_path: Path) -> Path:
    import pydicom.data

    folder = tmp_path / "images"
    (folder / "ct").mkdir(parents=True)
    (folder / "a.png").write_bytes(png_bytes((200, 10, 10)))
    buffer = io.BytesIO()
    Image.new("L", (16, 16), 90).save(buffer, format="JPEG")
    (folder / "b.jpg").write_bytes(buffer.getvalue())
    (folder / "ct" / "slice.dcm").write_bytes(Path(pydicom.data.get_testdata_file("CT_small.dcm")).read_bytes())
    (folder / "broken.png").write_bytes(png_bytes((0, 0, 0))[:40])
    return folder


def records() -> list:
    """Kept records first (ids k*), then one of each reject reason (ids r*), in array order (line = position)."""
    embedded = "data:image/png;base64," + base64.b64encode(png_bytes((0, 200, 0))).decode()
    return [
        {"id": "k1", "image": "a.png", "conversations": turns("<image>\nwhat organ?", "the liver.", "normal?", "yes")},
        {"id": "k2", "image": "b.jpg", "conversations": turns("describe <image>", "a grey square.")},
        {"id": "k3", "image": "ct/slice.dcm", "conversations": turns("<image>\nmodality?", "ct")},
        {"id": "k4", "image": embedded, "conversations": turns("<image>\ncolour?", "green")},
        {"id": "k5", "conversations": turns("what is a ct scan?", "an x-ray tomography.")},  # text only
        {"id": "r1", "image": "nowhere.png", "conversations": turns("<image>\nq", "a")},
        {"id": "r2", "image": "broken.png", "conversations": turns("<image>\nq", "a")},
        {"id": "r3", "image": "a.png", "conversations": turns("no tag here", "a")},
        {"id": "r4", "image": "a.png", "conversations": turns("<image>\nq", "a <image>")},
        {"id": "r5", "conversations": turns("<image>\nq", "a")},
        {"id": "r6", "image": "a.png", "conversations": turns("<image>\nq", "   ")},
        {"id": "r7", "image": "a.png", "conversations": [{"from": "gpt", "value": "hi"},
                                                         {"from": "human", "value": "<image>"}]},
        {"id": "r8", "image": "a.png", "conversations": turns("<image>\nq", "a", "dangling question")},
        {"id": "r9", "image": "a.png", "conversations": [{"from": "human", "value": "<image>"},
                                                         {"from": "bot", "value": "a"}]},
        {"id": "r10", "image": "a.png", "conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]},
        {"id": "r11", "image": "a.png"},
        {"id": "r12", "image": "data:image/png;base64,@@not base64@@", "conversations": turns("<image>\nq", "a")},
        ["not", "an", "object"],
    ]  # fmt: skip


REASONS = {
    6: "missing_image", 7: "unreadable_image", 8: "missing_image_tag", 9: "extra_image_tag",
    10: "image_tag_without_image", 11: "empty_turn", 12: "out_of_order", 13: "out_of_order", 14: "unknown_speaker",
    15: "bad_turn", 16: "no_conversations", 17: "bad_base64", 18: "not_an_object",
}  # fmt: skip


def test_kept_records_hold_their_turns_and_image_bytes_and_every_reject_is_written(
    tmp_path: Path, images: Path
) -> None:
    source = tmp_path / "llava.json"
    source.write_text(json.dumps(records(), indent=1))
    summary = convert_conversations([source], tmp_path / "out", image_folder=images, rows_per_shard=2,
                                    max_reject_ratio=1.0)  # fmt: skip
    rows = list(iter_rows(tmp_path / "out"))
    assert [row["id"] for row in rows] == ["k1", "k2", "k3", "k4", "k5"]
    assert [row["source_line"] for row in rows] == [1, 2, 3, 4, 5]
    assert [(t["role"], t["text"]) for t in rows[0]["turns"]] == [
        ("user", "<image>\nwhat organ?"), ("assistant", "the liver."), ("user", "normal?"), ("assistant", "yes")
    ]  # fmt: skip
    for row, name in zip(rows[:3], ("a.png", "b.jpg", "ct/slice.dcm")):
        assert row["image"] == (images / name).read_bytes() and row["image_source"] == str(images / name)
    assert rows[3]["image"] == png_bytes((0, 200, 0)) and rows[3]["image_source"] == "embedded"
    assert rows[4]["image"] is None and rows[4]["image_source"] is None

    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert {r["line"]: r["reason"] for r in rejects} == REASONS
    assert all(r["file"] == str(source) for r in rejects)
    assert next(r for r in rejects if r["line"] == 6)["id"] == "r1" and "nowhere.png" in rejects[0]["detail"]
    assert summary.records_read == 18 and summary.records_kept == 5 and summary.with_image == 4
    assert summary.rejected["out_of_order"] == 2 and sum(summary.rejected.values()) == 13
    index = read_index(str(tmp_path / "out"))
    assert index["biomedgpt"]["kind"] == "conversations" and len(index["shards"]) == 3  # 2 + 2 + 1 rows
    assert pq.read_schema(tmp_path / "out" / index["shards"][0]["raw_data"]["basename"]).field("image").type == "binary"


def test_json_lines_too_many_rejects_and_the_console_script(
    tmp_path: Path, images: Path, single_process: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from streaming import StreamingDataset

    from biomedgpt.cli.convert import main
    from biomedgpt.data import register_parquet_reader

    lines = [json.dumps(r) for r in records()[:6]] + ["{not json", ""]
    source = tmp_path / "llava.jsonl"
    source.write_text("\n".join(lines) + "\n")
    argv = [str(source), "--kind", "conversations", "--image-folder", str(images), "--out", str(tmp_path / "out")]
    assert main([*argv, "--no-progress"]) == 0
    assert "7 records read, 5 kept (4 with an image" in capsys.readouterr().out  # the blank line is no record
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejects] == [(6, "missing_image"), (7, "unreadable_json")]
    register_parquet_reader()
    dataset = StreamingDataset(local=str(tmp_path / "out"), shuffle=False, batch_size=1)
    assert [sample["id"] for sample in dataset] == ["k1", "k2", "k3", "k4", "k5"]
    assert dataset[2]["image"] == (images / "ct" / "slice.dcm").read_bytes()

    # Mostly bad: the rejects and a failed summary are written, no index; exit 1.
    with pytest.raises(ConversationConversionError, match=r"13 of 14 conversations rejected") as failed:
        convert_conversations([_write(tmp_path / "bad.json", records()[4:])], tmp_path / "bad", image_folder=images)
    assert failed.value.summary is not None and failed.value.summary.failed
    assert (tmp_path / "bad" / "rejects.jsonl").is_file() and not (tmp_path / "bad" / "index.json").exists()
    # No image folder: relative paths cannot be found, and the message says what to give.
    convert_conversations([source], tmp_path / "nofolder", max_reject_ratio=1.0)
    detail = json.loads((tmp_path / "nofolder" / "rejects.jsonl").read_text().splitlines()[0])["detail"]
    assert "give --image-folder" in detail


def _write(path: Path, rows: list) -> Path:
    path.write_text(json.dumps(rows))
    return path
