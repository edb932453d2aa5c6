"""TSV -> Parquet conversion (biomedgpt.data.convert and the biomedgpt-convert CLI)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from biomedgpt.cli.convert import main as cli_main
from biomedgpt.data import convert as convert_mod
from biomedgpt.data.convert import ConversionError, StrictModeError, TooManyRejectsError, convert, plan_shards
from biomedgpt.data.schema import KINDS


def _read_rows(out: Path) -> list[dict[str, Any]]:
    index = json.loads((out / "index.json").read_text())
    rows = []
    for shard in index["shards"]:
        rows.extend(pq.read_table(out / shard["raw_data"]["basename"]).to_pylist())
    return rows


def _rejects(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ good input


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_round_trips(kind: str, tmp_path: Path, write_tsv: Any, tsvkit: Any) -> None:
    src = [tsvkit.good_row(kind, i) for i in range(7)]
    tsv = write_tsv(src)
    out = tmp_path / "out"
    summary = convert(str(tsv), kind, str(out), rows_per_shard=3, row_group_rows=2)
    assert (summary.rows_read, summary.rows_written, summary.rows_rejected) == (7, 7, 0)
    assert summary.shards_with_rows == 3
    rows = _read_rows(out)
    assert [r["source_line"] for r in rows] == list(range(1, 8))
    names = [f.name for f in KINDS[kind].fields]
    for row, fields in zip(rows, src):
        for name, text in zip(names, fields):
            if name == "image":
                assert row["image"] == base64.b64decode(text)  # the encoded image file itself
            elif name == "code":
                assert row["code"] == [int(c) for c in text.split()]
            elif name in ("label", "label_index") and kind != "detection":
                assert row[name] == int(text)
            else:
                assert row[name] == text
    index = json.loads((out / "index.json").read_text())
    assert index["version"] == 2 and index["biomedgpt"]["config"]["kind"] == kind
    assert [s["samples"] for s in index["shards"]] == [3, 3, 1]
    assert [s["row_groups"] for s in index["shards"]] == [[2, 1], [2, 1], [1]]
    first = index["shards"][0]
    assert first["format"] == "parquet" and first["zip_data"] is None and first["compression"] is None
    assert first["raw_data"]["bytes"] == (out / "shard.00000.parquet").stat().st_size
    assert first["source_lines"] == [1, 3]
    meta = pq.ParquetFile(out / "shard.00000.parquet").metadata
    assert meta.num_row_groups == 2 and meta.row_group(0).column(0).compression == "ZSTD"


def test_jpeg_urlsafe_base64_and_missing_final_newline(tmp_path: Path, write_tsv: Any, tsvkit: Any) -> None:
    jpeg = tsvkit.image_bytes(5, size=16, fmt="JPEG")
    rows = [[f"c{i}", "", f"cap {i}", "", tsvkit.b64(jpeg, urlsafe=True)] for i in range(3)]
    tsv = write_tsv(rows, trailing_newline=False)
    summary = convert(str(tsv), "caption", str(tmp_path / "out"))
    assert summary.rows_written == 3
    assert [r["image"] for r in _read_rows(tmp_path / "out")] == [jpeg] * 3


def test_selected_cols_and_num_cols(tmp_path: Path, write_tsv: Any, tsvkit: Any) -> None:
    # A caption file with an extra trailing column and only (uniq_id, image, caption, extra).
    good = [tsvkit.good_row("caption", i) for i in range(4)]
    tsv = write_tsv([[r[0], r[4], r[2], "extra"] for r in good])
    convert(str(tsv), "caption", str(tmp_path / "out"), selected_cols="0,-,2,-,1", num_cols=4)
    rows = _read_rows(tmp_path / "out")
    assert [r["caption"] for r in rows] == [r[2] for r in good] and rows[0]["image_id"] == ""
    with pytest.raises(ConversionError, match="needs 5 comma-separated columns.*0:uniq_id"):
        convert(str(tsv), "caption", str(tmp_path / "o2"), selected_cols="0,4,2")
    with pytest.raises(ConversionError, match="--num-cols 2 is too small"):
        convert(str(tsv), "caption", str(tmp_path / "o3"), selected_cols="0,-,2,-,1", num_cols=2)


def test_plan_shards_matches_a_naive_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = [f"{i}\t" + "x" * (i % 13) for i in range(103)]
    for trailing in (True, False):
        path = tmp_path / f"t{trailing}.tsv"
        data = ("\n".join(lines) + ("\n" if trailing else "")).encode()
        path.write_bytes(data)
        monkeypatch.setattr(convert_mod, "_SCAN_CHUNK", 7)  # shard boundaries fall inside and across chunks
        for per_shard in (1, 10, 103, 500):
            plans = plan_shards(str(path), per_shard)
            assert sum(p.num_lines for p in plans) == 103
            for p in plans:
                chunk = data[p.start : p.end].decode()
                got = chunk.split("\n")
                got = got[:-1] if chunk.endswith("\n") else got
                assert got == lines[p.first_line - 1 : p.first_line - 1 + p.num_lines]
            assert plans[-1].end == len(data)


# ------------------------------------------------------------------------------------------------ corrupted copy


def _corrupted_vqa(tsvkit: Any) -> tuple[list[Any], dict[int, tuple[str, int | None]]]:
    """25 VQA rows with defects on known lines: line -> (reason, 1-based column or None)."""
    rows: list[Any] = [tsvkit.good_row("vqa", i) for i in range(25)]

    def mutate(i: int, col: int, value: str) -> None:
        rows[i] = list(rows[i])
        rows[i][col] = value

    expected: dict[int, tuple[str, int | None]] = {}
    rows[1] = "\t".join(rows[1][:5]).encode()  # a missing column
    expected[2] = ("wrong_column_count", None)
    mutate(3, 2, "what\tis this?")  # a stray tab inside the question
    expected[4] = ("wrong_column_count", None)
    rows[5] = "\t".join(rows[5]).encode() + b"\r\r"  # \r\r\n: one \r more than a CRLF line ending
    expected[6] = ("carriage_return", 6)
    rows[6] = "\t".join(rows[6]).encode() + b"\r"  # no longer a reject: line 7 ends in CRLF
    mutate(7, 2, "what\ris this?")  # stray \r
    expected[8] = ("carriage_return", 3)
    mutate(9, 5, rows[9][5][:-7] + "!!!")  # bad base64
    expected[10] = ("bad_base64", 6)
    mutate(11, 5, base64.b64encode(b"\x89PNG\r\n\x1a\n truncated").decode())  # decodes, but not an image
    expected[12] = ("undecodable_image", 6)
    mutate(13, 3, "yes")  # answer without conf
    expected[14] = ("malformed_answer", 4)
    mutate(15, 3, "one|!+yes")
    expected[16] = ("malformed_answer", 4)
    mutate(17, 2, "")  # empty question
    expected[18] = ("empty_required_field", 3)
    rows[19] = b""  # blank line
    expected[20] = ("blank_line", None)
    rows[21] = "\t".join(rows[21]).encode().replace(b"organ", b"\xffrgan")
    expected[22] = ("bad_encoding", 3)
    return rows, expected


def _check_rejects(out: Path, tsv: Path, expected: dict[int, tuple[str, int | None]], total: int) -> None:
    rejects = _rejects(out)
    assert [(r["line"], r["reason"], r["column"]) for r in rejects] == [
        (line, reason, col) for line, (reason, col) in sorted(expected.items())
    ]
    assert all(r["file"] == str(tsv) and r["detail"] and len(r["raw"]) < 260 for r in rejects)
    stray_tab = next(r for r in rejects if r["line"] == 4)
    assert stray_tab["detail"].endswith("(a stray tab inside a field shows up this way)")
    summary = json.loads((out / "conversion_summary.json").read_text())
    counts: dict[str, int] = {}
    for reason, _ in expected.values():
        counts[reason] = counts.get(reason, 0) + 1
    assert summary["rejects_by_reason"] == dict(sorted(counts.items()))
    assert summary["rows_read"] == total == summary["rows_written"] + summary["rows_rejected"]
    kept = [r["source_line"] for r in _read_rows(out)]
    assert kept == [line for line in range(1, total + 1) if line not in expected]  # no row lost unreported


def test_corrupted_copy_reports_every_bad_row(tmp_path: Path, write_tsv: Any, tsvkit: Any) -> None:
    rows, expected = _corrupted_vqa(tsvkit)
    tsv = write_tsv(rows)
    out = tmp_path / "out"
    summary = convert(str(tsv), "vqa", str(out), rows_per_shard=8, row_group_rows=3)
    assert summary.rows_rejected == len(expected)
    _check_rejects(out, tsv, expected, 25)


def test_corrupted_copy_with_workers_gives_identical_output(tmp_path: Path, write_tsv: Any, tsvkit: Any) -> None:
    rows, expected = _corrupted_vqa(tsvkit)
    tsv = write_tsv(rows)
    convert(str(tsv), "vqa", str(tmp_path / "one"), rows_per_shard=4, row_group_rows=3)
    convert(str(tsv), "vqa", str(tmp_path / "two"), rows_per_shard=4, row_group_rows=3, workers=2)
    _check_rejects(tmp_path / "two", tsv, expected, 25)
    one = json.loads((tmp_path / "one" / "index.json").read_text())["shards"]
    two = json.loads((tmp_path / "two" / "index.json").read_text())["shards"]
    assert one == two  # same files, byte for byte (sha1 in the index)


def test_other_kinds_corruptions(tmp_path: Path, write_tsv: Any, tsvkit: Any) -> None:
    cases = {
        "image": ([*tsvkit.good_row("image", 0)[:2], "1 2 3"], "malformed_codes", 3),
        "detection": ([*tsvkit.good_row("detection", 0)[:2], "1,2,3,4,liver"], "malformed_detection_label", 3),
        "nli": (["a", "b", "yes", "g"], "bad_label", 3),
        "classification": ([tsvkit.good_row("classification", 0)[0], "1.5", "x"], "bad_label", 2),
        "vision_language": (
            [*tsvkit.good_row("vision_language", 2)[:4], "1,2,0,4", "", "vg", "visual_grounding"],
            "malformed_box",
            5,
        ),
    }
    for kind, (bad, reason, column) in cases.items():
        tsv = write_tsv([tsvkit.good_row(kind, 1), bad, tsvkit.good_row(kind, 2)], name=f"{kind}.tsv")
        summary = convert(str(tsv), kind, str(tmp_path / kind))
        assert summary.rejects_by_reason == {reason: 1}, kind
        (record,) = _rejects(tmp_path / kind)
        assert (record["line"], record["column"]) == (2, column)


# ------------------------------------------------------------------------------------------------ strict mode


def test_strict_stops_at_first_bad_row(tmp_path: Path, write_tsv: Any, tsvkit: Any) -> None:
    rows, _ = _corrupted_vqa(tsvkit)
    tsv = write_tsv(rows)
    with pytest.raises(StrictModeError) as info:
        convert(str(tsv), "vqa", str(tmp_path / "out"), strict=True, rows_per_shard=8)
    assert str(info.value) == f"{tsv}:2: wrong_column_count: expected 6 tab-separated columns, found 5"
    assert not (tmp_path / "out" / "index.json").exists()
    # A precise column in the message, and the first bad row in file order even with parallel workers.
    good = [tsvkit.good_row("vqa", i) for i in range(20)]
    good[14] = [*good[14][:3], "1|!+"] + good[14][4:]  # shard 3 of 4
    good[6] = [*good[6][:3], "x|!+no"] + good[6][4:]  # shard 2 of 4
    tsv2 = write_tsv(good, name="strict2.tsv")
    with pytest.raises(StrictModeError) as info:
        convert(str(tsv2), "vqa", str(tmp_path / "out2"), strict=True, rows_per_shard=5, workers=2)
    assert str(info.value).startswith(f"{tsv2}:7: column 4 (refs): malformed_answer: confidence 'x'")
    assert info.value.record["line"] == 7


def test_strict_cli_message_and_exit_status(tmp_path: Path, write_tsv: Any, tsvkit: Any, capsys: Any) -> None:
    rows = [tsvkit.good_row("nli", i) for i in range(3)]
    rows[2] = ["a", "b", "7", "g"]
    tsv = write_tsv(rows)
    code = cli_main([str(tsv), "--kind", "nli", "--out", str(tmp_path / "out"), "--strict", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"{tsv}:3: column 3 (label): bad_label: nli label '7'" in err


# ------------------------------------------------------------------------------------------------ re-runs


def test_rerun_skips_finished_shards_and_redoes_changed_ones(tmp_path: Path, write_tsv: Any, tsvkit: Any) -> None:
    rows: list[Any] = [tsvkit.good_row("caption", i) for i in range(20)]
    rows[12] = ["c12", "", "", "", tsvkit.good_row("caption", 12)[4]]  # empty caption, in shard 2 of 4
    tsv = write_tsv(rows)
    out = tmp_path / "out"
    first = convert(str(tsv), "caption", str(out), rows_per_shard=5)
    assert (first.shards_converted, first.shards_reused, first.rows_rejected) == (4, 0, 1)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard.*.parquet")}

    again = convert(str(tsv), "caption", str(out), rows_per_shard=5)
    assert (again.shards_converted, again.shards_reused, again.rows_rejected) == (0, 4, 1)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard.*.parquet")} == mtimes
    assert len(_rejects(out)) == 1  # rejects of skipped shards are still reported

    # An interrupted run: shard 1 has no completion mark (and a half-written temp file).
    (out / "_convert" / "shard.00001.json").unlink()
    (out / "shard.00001.parquet.tmp").write_bytes(b"partial")
    resumed = convert(str(tsv), "caption", str(out), rows_per_shard=5)
    assert (resumed.shards_converted, resumed.shards_reused) == (1, 3)
    assert not (out / "shard.00001.parquet.tmp").exists()

    # Fix the bad line in place: only its shard is converted again, and the reject disappears.
    rows[12] = tsvkit.good_row("caption", 12)
    write_tsv(rows)
    fixed = convert(str(tsv), "caption", str(out), rows_per_shard=5)
    assert (fixed.shards_converted, fixed.shards_reused, fixed.rows_rejected, fixed.rows_written) == (1, 3, 0, 20)
    assert _rejects(out) == []

    # The input shrinks: shards past its end are removed.
    write_tsv(rows[:7])
    short = convert(str(tsv), "caption", str(out), rows_per_shard=5)
    assert short.rows_written == 7 and sorted(p.name for p in out.glob("shard.*")) == [
        "shard.00000.parquet",
        "shard.00001.parquet",
    ]
    assert [r["source_line"] for r in _read_rows(out)] == list(range(1, 8))


def test_shard_with_only_bad_rows_is_left_out(tmp_path: Path, write_tsv: Any, tsvkit: Any) -> None:
    rows: list[Any] = [tsvkit.good_row("text", i) for i in range(9)]
    rows[3:6] = [b"no tabs here"] * 3  # all of shard 1
    tsv = write_tsv(rows)
    out = tmp_path / "out"
    summary = convert(str(tsv), "text", str(out), rows_per_shard=3)
    assert (summary.shards_planned, summary.shards_with_rows, summary.rows_rejected) == (3, 2, 3)
    assert sorted(p.name for p in out.glob("shard.*")) == ["shard.00000.parquet", "shard.00002.parquet"]
    index = json.loads((out / "index.json").read_text())
    assert [s["raw_data"]["basename"] for s in index["shards"]] == ["shard.00000.parquet", "shard.00002.parquet"]
    assert [r["line"] for r in _rejects(out)] == [4, 5, 6]
    assert convert(str(tsv), "text", str(out), rows_per_shard=3).shards_reused == 3


def test_output_dir_from_another_conversion(tmp_path: Path, write_tsv: Any, tsvkit: Any) -> None:
    tsv = write_tsv([tsvkit.good_row("text", i) for i in range(3)])
    out = tmp_path / "out"
    convert(str(tsv), "text", str(out))
    with pytest.raises(ConversionError, match=r"already holds a conversion of .* as kind 'text'.*--overwrite"):
        convert(str(tsv), "summarization", str(out))
    with pytest.raises(ConversionError, match="rows_per_shard=2048.*rows_per_shard=10"):
        convert(str(tsv), "text", str(out), rows_per_shard=10)
    summary = convert(str(tsv), "summarization", str(out), overwrite=True)
    assert summary.shards_reused == 0 and set(_read_rows(out)[0]) == {"source", "target", "source_line"}
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "index.json").write_text(json.dumps({"version": 2, "shards": []}))
    with pytest.raises(ConversionError, match="did not write"):
        convert(str(tsv), "text", str(foreign))


def test_argument_errors(tmp_path: Path, write_tsv: Any, tsvkit: Any, capsys: Any) -> None:
    with pytest.raises(ConversionError, match="does not exist"):
        convert(str(tmp_path / "missing.tsv"), "text", str(tmp_path / "o"))
    tsv = write_tsv([tsvkit.good_row("text", 0)])
    with pytest.raises(ConversionError, match="unknown kind 'txt'; choose one of: vision_language, text, image"):
        convert(str(tsv), "txt", str(tmp_path / "o"))
    with pytest.raises(SystemExit) as info:
        cli_main([str(tsv), "--kind", "txt", "--out", str(tmp_path / "o")])
    assert info.value.code == 2 and "invalid choice: 'txt'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli_main([str(tmp_path / "nope.tsv"), "--kind", "text", "--out", str(tmp_path / "o")])
    assert info.value.code == 2 and "nope.tsv does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main([str(tsv), "--kind", "vqa", "--selected-cols", "0,1", "--out", str(tmp_path / "o")])
    assert "kind 'vqa' needs 6 comma-separated columns" in capsys.readouterr().err


def test_console_script_end_to_end(tmp_path: Path, write_tsv: Any, tsvkit: Any) -> None:
    rows: list[Any] = [tsvkit.good_row("detection", i) for i in range(6)]
    rows[2] = [*rows[2][:2], "1,2,3"]
    tsv = write_tsv(rows)
    script = Path(sys.executable).with_name("biomedgpt-convert")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "biomedgpt.cli.convert"]
    out = tmp_path / "out"
    args = [str(tsv), "--kind", "detection", "--out", str(out), "--workers", "2", "--rows-per-shard", "2"]
    proc = subprocess.run(cmd + args, capture_output=True, text=True, timeout=120, env={**os.environ})
    assert proc.returncode == 0, proc.stderr
    assert "6 rows read, 5 written, 1 rejected" in proc.stdout
    assert "malformed_detection_label  1" in proc.stdout
    assert len(_read_rows(out)) == 5


# ---------------------------------------------------------------------------------------- rows that spoil training


def test_dicom_in_an_image_column_is_kept_as_raw_bytes(tmp_path: Path, write_tsv: Any, tsvkit: Any) -> None:
    import pydicom.data

    dicom = Path(pydicom.data.get_testdata_file("CT_small.dcm")).read_bytes()
    rows = [tsvkit.good_row("vqa", 0), tsvkit.good_row("vqa", 1)]
    rows[1][5] = tsvkit.b64(dicom)
    caption = [tsvkit.good_row("caption", 0)[:4] + [tsvkit.b64(dicom, urlsafe=True)]]
    summary = convert(str(write_tsv(rows)), "vqa", str(tmp_path / "vqa"))
    assert (summary.rows_written, summary.rows_rejected) == (2, 0)
    assert _read_rows(tmp_path / "vqa")[1]["image"] == dicom
    convert(str(write_tsv(caption, name="cap.tsv")), "caption", str(tmp_path / "cap"))
    assert _read_rows(tmp_path / "cap")[0]["image"] == dicom
    # The summary says how each image was decoded: the CT slice has no window, so the CT default applies.
    assert summary.image_decodings == {
        "PNG 8-bit RGB as stored": 1,
        "DICOM MONOCHROME2 CT: rescale, no window in the file: CT default C=40 W=400, LINEAR": 1,
    }


def test_boxes_outside_the_image_are_rejected_or_clipped(
    tmp_path: Path, write_tsv: Any, tsvkit: Any, capsys: Any
) -> None:
    rows: list[Any] = [tsvkit.good_row("detection", i) for i in range(4)]
    rows[1] = [*rows[1][:2], "1,1,8,8,1,liver&&4,4,9,6,2,bone"]  # 8x8 image: the second box sticks out
    rows[2] = [*rows[2][:2], "8,0,12,4,1,liver"]  # wholly outside
    tsv = write_tsv(rows)
    summary = convert(str(tsv), "detection", str(tmp_path / "strict"))
    assert summary.rejects_by_reason == {"box_outside_image": 2} and summary.rows_clipped == 0
    first = _rejects(tmp_path / "strict")[0]
    assert (first["line"], first["column"], first["field"]) == (2, 3, "label")
    assert "4,4,9,6" in first["detail"] and "8x8" in first["detail"]

    code = cli_main([str(tsv), "--kind", "detection", "--out", str(tmp_path / "clip"), "--clip-boxes", "--no-progress"])
    assert code == 0 and "1 row with boxes clipped" in capsys.readouterr().out
    summary_json = json.loads((tmp_path / "clip" / "conversion_summary.json").read_text())
    assert summary_json["rows_clipped"] == 1 and summary_json["rejects_by_reason"] == {"box_outside_image": 1}
    kept = {r["source_line"]: r for r in _read_rows(tmp_path / "clip")}
    assert sorted(kept) == [1, 2, 4]
    assert [(b["x0"], b["y0"], b["x1"], b["y1"]) for b in kept[2]["boxes"]] == [(1, 1, 8, 8), (4, 4, 8, 6)]


def test_utf8_bom_is_stripped_only_at_the_start(tmp_path: Path, write_tsv: Any, tsvkit: Any) -> None:
    rows = [tsvkit.good_row("text", i) for i in range(3)]
    tsv = tmp_path / "bom.tsv"
    data = tsvkit.tsv_bytes(rows)
    tsv.write_bytes(b"\xef\xbb\xbf" + data.replace(b"\nt2\t", b"\n\xef\xbb\xbft2\t"))
    summary = convert(str(tsv), "text", str(tmp_path / "out"), rows_per_shard=2)
    assert summary.utf8_bom and summary.rows_written == 3
    assert [r["uniq_id"] for r in _read_rows(tmp_path / "out")] == ["t0", "t1", "\ufefft2"]
    plain = write_tsv(rows, name="plain.tsv")
    assert not convert(str(plain), "text", str(tmp_path / "plain")).utf8_bom


def test_nul_bytes_and_overlong_fields_are_rejected(tmp_path: Path, write_tsv: Any, tsvkit: Any, capsys: Any) -> None:
    rows: list[Any] = [tsvkit.good_row("caption", i) for i in range(6)]
    rows[1][2] = "a caption\x00 with a NUL"
    rows[2][2] = "x" * 101
    rows[3][4] = tsvkit.b64(tsvkit.image_bytes(3, size=64, fmt="JPEG"))  # ~10x the bytes of the others
    tsv = write_tsv(rows)
    limit = len(tsvkit.image_bytes(0)) * 3
    out = tmp_path / "out"
    argv = [str(tsv), "--kind", "caption", "--out", str(out), "--no-progress"]
    assert cli_main([*argv, "--max-field-chars", "100", "--max-image-bytes", str(limit)]) == 0
    by_line = {r["line"]: r for r in _rejects(out)}
    assert {line: r["reason"] for line, r in by_line.items()} == {
        2: "nul_byte",
        3: "field_too_long",
        4: "field_too_long",
    }
    assert by_line[3]["field"] == "caption" and "100" in by_line[3]["detail"]
    assert by_line[4]["field"] == "image" and str(limit) in by_line[4]["detail"]
    assert "field_too_long  2" in capsys.readouterr().out
    # The defaults are generous: the same file keeps everything but the NUL row.
    assert convert(str(tsv), "caption", str(tmp_path / "defaults")).rejects_by_reason == {"nul_byte": 1}
    with pytest.raises(ConversionError, match="max_field_chars"):
        convert(str(tsv), "caption", str(tmp_path / "bad"), max_field_chars=0)


def test_crlf_line_endings_are_accepted_and_resume(tmp_path: Path, write_tsv: Any, tsvkit: Any) -> None:
    rows: list[Any] = [tsvkit.good_row("vqa", i) for i in range(7)]
    rows[4][2] = "what\ris this?"  # a \r inside a field is still bad
    lf = write_tsv(rows, name="lf.tsv")
    crlf = tmp_path / "crlf.tsv"
    crlf.write_bytes(lf.read_bytes().replace(b"\n", b"\r\n"))
    summary = convert(str(crlf), "vqa", str(tmp_path / "crlf"), rows_per_shard=3)
    assert (summary.rows_written, summary.rejects_by_reason, summary.crlf_lines) == (6, {"carriage_return": 1}, 7)
    (reject,) = _rejects(tmp_path / "crlf")
    assert (reject["line"], reject["column"], reject["field"]) == (5, 3, "question")
    convert(str(lf), "vqa", str(tmp_path / "lf"), rows_per_shard=3)
    assert _read_rows(tmp_path / "crlf") == _read_rows(tmp_path / "lf")
    # Resume: nothing changed, every shard is reused; a \r\r\n ending leaves a stray \r, which is rejected.
    assert convert(str(crlf), "vqa", str(tmp_path / "crlf"), rows_per_shard=3).shards_reused == 3
    crlf.write_bytes(crlf.read_bytes().replace(b"\r\n", b"\r\r\n", 1))
    again = convert(str(crlf), "vqa", str(tmp_path / "crlf"), rows_per_shard=3)
    assert (again.shards_reused, again.rejects_by_reason) == (2, {"carriage_return": 2})
    # The last line may end without a newline.
    crlf.write_bytes(crlf.read_bytes()[:-2])
    assert convert(str(crlf), "vqa", str(tmp_path / "crlf"), rows_per_shard=3).rows_written == 5


# ------------------------------------------------------------------------------------------------ failing conversions


def test_no_kept_row_fails_with_exit_status_1(tmp_path: Path, write_tsv: Any, tsvkit: Any, capsys: Any) -> None:
    empty = tmp_path / "empty.tsv"
    empty.write_bytes(b"")
    code = cli_main([str(empty), "--kind", "text", "--out", str(tmp_path / "empty"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and str(empty) in err and "'text'" in err and "no rows" in err

    # Wrong --kind: every text row has 2 columns, vqa needs 6.
    tsv = write_tsv([tsvkit.good_row("text", i) for i in range(4)])
    out = tmp_path / "wrong"
    code = cli_main([str(tsv), "--kind", "vqa", "--out", str(out), "--no-progress", "--max-reject-ratio", "1"])
    err = capsys.readouterr().err
    assert code == 1
    assert str(tsv) in err and "'vqa'" in err and "wrong_column_count" in err and f"{tsv}:1" in err
    assert str(out / "rejects.jsonl") in err
    # The evidence stays; no index that training would pick up.
    assert len(_rejects(out)) == 4 and not (out / "index.json").exists()
    saved = json.loads((out / "conversion_summary.json").read_text())
    assert saved["failed"] and "wrong_column_count" in saved["failure"]

    with pytest.raises(TooManyRejectsError) as info:
        convert(str(tsv), "vqa", str(out), max_reject_ratio=1.0)
    assert isinstance(info.value, ConversionError)
    assert info.value.summary.failed and info.value.summary.rows_written == 0
    assert info.value.summary.rows_rejected == 4


def test_max_reject_ratio(tmp_path: Path, write_tsv: Any, tsvkit: Any, capsys: Any) -> None:
    rows: list[Any] = [tsvkit.good_row("nli", i) for i in range(5)]
    for i in (0, 2, 4):
        rows[i][2] = "maybe"
    tsv = write_tsv(rows)
    out = tmp_path / "out"
    argv = [str(tsv), "--kind", "nli", "--out", str(out), "--no-progress"]
    assert cli_main(argv) == 1  # 3 of 5 rejected > 0.5
    captured = capsys.readouterr()
    assert "3 of 5 rows rejected (60%)" in captured.err and "--max-reject-ratio 0.5" in captured.err
    assert f"{tsv}:1" in captured.err and "bad_label" in captured.err
    assert "FAILED" in captured.out
    assert not (out / "index.json").exists() and len(_rejects(out)) == 3
    with pytest.raises(TooManyRejectsError):
        convert(str(tsv), "nli", str(out))
    # A looser limit accepts the same conversion, reusing the finished shards.
    summary = convert(str(tsv), "nli", str(out), max_reject_ratio=0.6)
    assert not summary.failed and summary.rows_written == 2 and summary.shards_reused == 1
    assert (out / "index.json").exists() and [r["source_line"] for r in _read_rows(out)] == [2, 4]
    assert cli_main([*argv, "--max-reject-ratio", "1"]) == 0
    assert not json.loads((out / "conversion_summary.json").read_text())["failed"]
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*argv, "--max-reject-ratio", "1.5"])
    assert exit_info.value.code == 2 and "--max-reject-ratio" in capsys.readouterr().err
