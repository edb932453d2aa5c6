"""Row parsing and validation (biomedgpt.data.schema): every reject reason, field parsers, layouts."""

from __future__ import annotations

import base64
import io
from typing import Any

import pyarrow as pa
import pytest

from biomedgpt.data.schema import (
    KINDS,
    REJECT_REASONS,
    RowError,
    RowOptions,
    decode_base64,
    get_kind,
    parse_answers,
    parse_box,
    parse_codes,
    parse_detection_label,
    parse_row,
    parse_selected_cols,
    verify_image,
)


def _row(kind: str, fields: list[str], cols: Any = None, num_cols: int | None = None, line: int = 7) -> dict:
    spec = get_kind(kind)
    selected = parse_selected_cols(spec, cols)
    return parse_row(spec, "\t".join(fields).encode(), selected, num_cols or len(fields), line)


def _reject(kind: str, line: bytes | list[str], cols: Any = None, num_cols: int | None = None) -> RowError:
    spec = get_kind(kind)
    selected = parse_selected_cols(spec, cols)
    raw = line if isinstance(line, bytes) else "\t".join(line).encode()
    with pytest.raises(RowError) as info:
        parse_row(spec, raw, selected, num_cols or len(spec.fields), 1)
    return info.value


# ------------------------------------------------------------------------------------------------ layouts


def test_every_kind_has_a_typed_schema_with_source_line() -> None:
    assert set(KINDS) == {
        "vision_language",
        "text",
        "image",
        "detection",
        "vqa",
        "caption",
        "summarization",
        "nli",
        "classification",
    }
    for spec in KINDS.values():
        names = spec.schema.names
        assert names[-1] == "source_line" and spec.schema.field("source_line").type == pa.int64()
        for f in spec.fields:  # every layout field is a column under its original name
            assert f.name in names
        if "image" in names:
            assert spec.schema.field("image").type == pa.binary()
    assert KINDS["image"].schema.field("code").type == pa.list_(pa.int16())
    assert KINDS["nli"].schema.field("label").type == pa.int8()
    assert KINDS["classification"].schema.field("label_index").type == pa.int32()


def test_get_kind_lists_choices() -> None:
    with pytest.raises(ValueError, match="unknown kind 'vq'.*vision_language.*classification"):
        get_kind("vq")


def test_selected_cols_parsing_and_errors() -> None:
    vqa = get_kind("vqa")
    assert parse_selected_cols(vqa, None) == (0, 1, 2, 3, 4, 5)
    assert parse_selected_cols(vqa, "0,-,2,3,4,5") == (0, None, 2, 3, 4, 5)
    assert parse_selected_cols(vqa, [5, 4, 3, 2, 1, 0]) == (5, 4, 3, 2, 1, 0)
    with pytest.raises(ValueError, match=r"has 5 entries; kind 'vqa' needs 6 .*0:question_id, 1:image_id"):
        parse_selected_cols(vqa, "0,5,2,3,4")
    with pytest.raises(ValueError, match="'question' is required"):
        parse_selected_cols(vqa, "0,1,-,3,4,5")
    with pytest.raises(ValueError, match="'x' is not a column number"):
        parse_selected_cols(vqa, "0,1,x,3,4,5")
    with pytest.raises(ValueError, match="negative"):
        parse_selected_cols(vqa, "0,1,-2,3,4,5")


# ------------------------------------------------------------------------------------------------ field parsers


def test_base64_accepts_both_alphabets_and_rejects_garbage() -> None:
    data = bytes(range(256)) * 3  # contains bytes that encode to + / and - _
    assert decode_base64(base64.b64encode(data).decode()) == data
    assert decode_base64(base64.urlsafe_b64encode(data).decode()) == data
    for bad in ("abc", "ab$=", "YWJj\nZA==", "Y W J j"):
        with pytest.raises(RowError) as info:
            decode_base64(bad)
        assert info.value.reason == "bad_base64"


def test_verify_image(tsvkit: Any) -> None:
    info = verify_image(tsvkit.image_bytes(3))
    assert info[:3] == ("PNG", 8, 8) and info.decoding == "PNG 8-bit RGB as stored"
    assert verify_image(tsvkit.image_bytes(3, size=32, fmt="JPEG"))[:3] == ("JPEG", 32, 32)
    assert verify_image(tsvkit.image_bytes(3, size=16, fmt="GIF")).format == "GIF"  # palette: an RGB copy decoded
    for bad in (b"", b"not an image at all", tsvkit.image_bytes(3, size=64, fmt="JPEG")[:300]):
        with pytest.raises(RowError) as info:
            verify_image(bad)
        assert info.value.reason == "undecodable_image"


def test_parse_answers() -> None:
    assert parse_answers("1|!+yes") == (["yes"], [1.0])
    assert parse_answers("0.6|!+left lung&&0.3|!+lung") == (["left lung", "lung"], [0.6, 0.3])
    assert parse_answers("1|!+a|b") == (["a|b"], [1.0])
    for bad in ("yes", "x|!+yes", "1|!+", "nan|!+yes", "-1|!+yes", "1|!+yes&&"):
        with pytest.raises(RowError) as info:
            parse_answers(bad)
        assert info.value.reason == "malformed_answer", bad


def test_parse_box() -> None:
    assert parse_box(["1", "2", "3.5", "4"]) == [1.0, 2.0, 3.5, 4.0]
    for bad in ("1,2,3", "1,2,3,4,5", "a,2,3,4", "-1,2,3,4", "3,2,1,4", "1,4,3,4", "1,2,inf,4"):
        with pytest.raises(RowError) as info:
            parse_box(bad.split(","))
        assert info.value.reason == "malformed_box", bad


def test_parse_detection_label() -> None:
    boxes = parse_detection_label("1,2,10,12,3,liver&&0,0,5,6,-1,bone, left")
    assert boxes[1] == {"x0": 0.0, "y0": 0.0, "x1": 5.0, "y1": 6.0, "category_id": -1, "category_name": "bone, left"}
    assert len(boxes) == 2 and boxes[0]["category_name"] == "liver"
    assert pytest.raises(RowError, parse_detection_label, "1,2,10,12,3").value.reason == "malformed_detection_label"
    assert pytest.raises(RowError, parse_detection_label, "1,2,10,12,x,a").value.reason == "malformed_detection_label"
    assert pytest.raises(RowError, parse_detection_label, "1,2,10,12,3,").value.reason == "malformed_detection_label"
    assert pytest.raises(RowError, parse_detection_label, "9,2,1,12,3,a").value.reason == "malformed_box"


def test_parse_codes(tsvkit: Any) -> None:
    codes = parse_codes(tsvkit.CODES)
    assert len(codes) == 256 and codes[1] == 37
    for bad in (" ".join(["1"] * 255), " ".join(["1"] * 257), " ".join(["8192"] * 256), " ".join(["x"] * 256)):
        with pytest.raises(RowError) as info:
            parse_codes(bad)
        assert info.value.reason == "malformed_codes"


# ------------------------------------------------------------------------------------------------ rows


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_good_rows_parse_to_their_schema(kind: str, tsvkit: Any) -> None:
    spec = get_kind(kind)
    rows = [_row(kind, tsvkit.good_row(kind, i), line=i + 1) for i in range(3)]
    table = pa.Table.from_pylist(rows, schema=spec.schema)  # values fit the declared types
    assert table.column("source_line").to_pylist() == [1, 2, 3]
    if "image" in spec.schema.names:
        assert rows[1]["image"] == tsvkit.image_bytes(1)  # raw encoded bytes, not base64 text


def test_vision_language_refs_depend_on_type(tsvkit: Any) -> None:
    cap, qa, vg = (_row("vision_language", tsvkit.good_row("vision_language", i)) for i in range(3))
    assert cap["answers"] == [] and cap["box"] is None and cap["gt_objects"] == "lung&&heart"
    assert qa["answers"] == ["yes", "no"] and qa["answer_confs"] == [1.0, 0.5] and qa["refs"] == "1.0|!+yes&&0.5|!+no"
    assert vg["box"] == [1.0, 2.0, 6.5, 8.0] and vg["answers"] == []
    # Required fields depend on the type.
    bad_qa = tsvkit.good_row("vision_language", 1)
    bad_qa[4] = ""
    err = _reject("vision_language", bad_qa)
    assert (err.reason, err.tsv_column) == ("empty_required_field", 4)
    bad_vg = tsvkit.good_row("vision_language", 2)
    bad_vg[4] = "1,2,3"
    assert _reject("vision_language", bad_vg).reason == "malformed_box"
    bad_type = tsvkit.good_row("vision_language", 0)
    bad_type[7] = "captions"
    assert _reject("vision_language", bad_type).reason == "bad_type"


def test_selected_cols_reorder_and_absent_fields(tsvkit: Any) -> None:
    q = tsvkit.good_row("vqa", 4)
    # The file in OFA's VQA order with the image moved first; map it back into the layout.
    reordered = [q[5], q[0], q[1], q[2], q[3], q[4]]
    assert _row("vqa", reordered, cols="1,2,3,4,5,0") == _row("vqa", q)
    # A caption file without image_id/objects columns: uniq_id, image, caption.
    c = tsvkit.good_row("caption", 2)
    row = _row("caption", [c[0], c[4], c[2]], cols="0,-,2,-,1")
    assert row["image_id"] == "" and row["objects"] == "" and row["caption"] == c[2] and row["image"]


@pytest.mark.parametrize(
    ("kind", "mutate", "reason", "column"),
    [
        ("text", lambda r: b"", "blank_line", None),
        ("text", lambda r: b"   ", "blank_line", None),
        ("text", lambda r: "\t".join(r).encode() + b"\r", "carriage_return", 2),
        ("caption", lambda r: "\t".join(r[:2] + ["a\rb"] + r[3:]).encode(), "carriage_return", 3),
        ("caption", lambda r: "\t".join(r[:2] + ["a\tb"] + r[3:]).encode(), "wrong_column_count", None),
        ("caption", lambda r: "\t".join(r[:-1]).encode(), "wrong_column_count", None),
        ("text", lambda r: r[0].encode() + b"\t\xff\xfe", "bad_encoding", 2),
        ("caption", lambda r: "\t".join(r[:4] + ["@@@"]).encode(), "bad_base64", 5),
        (
            "caption",
            lambda r: "\t".join(r[:4] + [base64.b64encode(b"GIF89a-broken").decode()]).encode(),
            "undecodable_image",
            5,
        ),
        ("vqa", lambda r: "\t".join(r[:3] + ["yes"] + r[4:]).encode(), "malformed_answer", 4),
        ("vqa", lambda r: "\t".join(r[:3] + ["high|!+yes"] + r[4:]).encode(), "malformed_answer", 4),
        ("image", lambda r: "\t".join(r[:2] + ["1 2 3"]).encode(), "malformed_codes", 3),
        ("detection", lambda r: "\t".join(r[:2] + ["1,2,3,4,x,liver"]).encode(), "malformed_detection_label", 3),
        ("detection", lambda r: "\t".join(r[:2] + ["1,2,-3,4,1,liver"]).encode(), "malformed_box", 3),
        ("nli", lambda r: "\t".join(r[:2] + ["entailment", r[3]]).encode(), "bad_label", 3),
        ("nli", lambda r: "\t".join(r[:2] + ["3", r[3]]).encode(), "bad_label", 3),
        ("classification", lambda r: "\t".join([r[0], "one", r[2]]).encode(), "bad_label", 2),
        ("summarization", lambda r: ("\t" + r[1]).encode(), "empty_required_field", 1),
        ("vqa", lambda r: "\t".join(r[:2] + [" "] + r[3:]).encode(), "empty_required_field", 3),
    ],
)
def test_each_reject_reason(kind: str, mutate: Any, reason: str, column: int | None, tsvkit: Any) -> None:
    err = _reject(kind, mutate(tsvkit.good_row(kind, 1)))
    assert err.reason == reason
    assert (None if err.tsv_column is None else err.tsv_column + 1) == column
    assert err.detail


def test_stray_tab_detail_and_reason_list() -> None:
    err = _reject("summarization", b"a\tb\tc")
    assert err.reason == "wrong_column_count" and "stray tab" in err.detail
    assert len(set(REJECT_REASONS)) == len(REJECT_REASONS)
    with pytest.raises(AssertionError):
        RowError("no_such_reason", "x")


def test_optional_fields_may_be_empty(tsvkit: Any) -> None:
    q = tsvkit.good_row("vqa", 0)
    q[1] = q[4] = ""
    assert _row("vqa", q)["objects"] == ""
    n = tsvkit.good_row("nli", 2)
    n[3] = ""
    assert _row("nli", n)["label"] == 2


# ------------------------------------------------------------------------------------------------ what training reads


def _dicom_bytes() -> bytes:
    import pydicom.data

    with open(pydicom.data.get_testdata_file("CT_small.dcm"), "rb") as f:
        return f.read()


def test_verify_image_reads_dicom_and_reports_the_size(tsvkit: Any) -> None:
    import pydicom

    data = _dicom_bytes()
    dataset = pydicom.dcmread(io.BytesIO(data))
    info = verify_image(data)
    assert (info.format, info.width, info.height) == ("DICOM", dataset.Columns, dataset.Rows)
    png = verify_image(tsvkit.image_bytes(3, size=12))
    assert (png.format, png.width, png.height) == ("PNG", 12, 12)
    # A DICOM whose pixel data is cut off is rejected like any undecodable image.
    with pytest.raises(RowError) as info_err:
        verify_image(data[: len(data) // 2])
    assert info_err.value.reason == "undecodable_image"


def test_dicom_row_parses(tsvkit: Any) -> None:
    data = _dicom_bytes()
    row = _row("caption", ["c1", "", "a ct slice", "", base64.b64encode(data).decode()])
    assert row["image"] == data


def test_nul_byte_is_rejected_with_its_column(tsvkit: Any) -> None:
    fields = tsvkit.good_row("caption", 1)
    fields[2] = "a\x00caption"
    err = _reject("caption", fields)
    assert (err.reason, err.tsv_column) == ("nul_byte", 2)


def test_field_length_bounds(tsvkit: Any) -> None:
    spec = get_kind("caption")
    fields = tsvkit.good_row("caption", 1)
    image = tsvkit.image_bytes(1)
    fields[2] = "é" * 10  # 10 characters, 20 bytes: the bound counts characters
    line = "\t".join(fields).encode()
    cols = spec.default_selected_cols
    assert parse_row(spec, line, cols, 5, 1, options=RowOptions(max_field_chars=10))["caption"] == fields[2]
    with pytest.raises(RowError) as info:
        parse_row(spec, line, cols, 5, 1, options=RowOptions(max_field_chars=9))
    assert info.value.reason == "field_too_long" and info.value.tsv_column == 2 and "9" in info.value.detail
    # Images have their own bound, on the decoded bytes.
    assert parse_row(spec, line, cols, 5, 1, options=RowOptions(max_image_bytes=len(image)))["image"] == image
    with pytest.raises(RowError) as info:
        parse_row(spec, line, cols, 5, 1, options=RowOptions(max_image_bytes=len(image) - 1))
    assert info.value.reason == "field_too_long" and info.value.tsv_column == 4
    with pytest.raises(RowError) as info:  # far too long: refused before decoding the base64
        parse_row(spec, line, cols, 5, 1, options=RowOptions(max_image_bytes=len(image) // 2))
    assert info.value.reason == "field_too_long" and info.value.tsv_column == 4 and "about" in info.value.detail


def _detection(tsvkit: Any, label: str) -> list[str]:
    return ["d1", tsvkit.b64(tsvkit.image_bytes(1, size=8)), label]


def test_detection_boxes_must_lie_inside_the_image(tsvkit: Any) -> None:
    # 8x8 image: a box that ends exactly on the border is inside (x1/y1 are exclusive pixel edges).
    row = _row("detection", _detection(tsvkit, "0,0,8,8,1,liver&&2,2,4,4,2,bone"))
    assert [b["x1"] for b in row["boxes"]] == [8.0, 4.0]
    for label, what in (("0,0,8.5,8,1,liver", "8.5"), ("2,2,4,4,2,bone&&1,1,7,9,1,liver", "entry 1")):
        err = _reject("detection", _detection(tsvkit, label))
        assert err.reason == "box_outside_image" and err.tsv_column == 2
        assert what in err.detail and "8x8" in err.detail


def test_clip_boxes_option_clips_and_notes_the_row(tsvkit: Any) -> None:
    spec = get_kind("detection")
    cols = spec.default_selected_cols
    line = "\t".join(_detection(tsvkit, "1,2,20,6,1,liver&&0,0,3,3,2,bone")).encode()
    notes: list[str] = []
    row = parse_row(spec, line, cols, 3, 1, options=RowOptions(clip_boxes=True), notes=notes)
    assert [(b["x0"], b["y0"], b["x1"], b["y1"]) for b in row["boxes"]] == [(1, 2, 8, 6), (0, 0, 3, 3)]
    assert row["label"] == "1,2,20,6,1,liver&&0,0,3,3,2,bone"  # the text is kept verbatim
    assert notes == ["box_clipped", "image: PNG 8-bit RGB as stored"]
    # Nothing of the box is inside the image: rejected even when clipping.
    for label in ("8,0,12,4,1,liver", "0,9,4,12,1,liver"):
        outside = "\t".join(_detection(tsvkit, label)).encode()
        with pytest.raises(RowError) as info:
            parse_row(spec, outside, cols, 3, 1, options=RowOptions(clip_boxes=True))
        assert info.value.reason == "box_outside_image" and "outside" in info.value.detail


def test_visual_grounding_region_must_lie_inside_the_image(tsvkit: Any) -> None:
    vg = tsvkit.good_row("vision_language", 2)
    vg[4] = "1,2,8,8"
    assert _row("vision_language", vg)["box"] == [1.0, 2.0, 8.0, 8.0]
    vg[4] = "1,2,8,8.25"
    err = _reject("vision_language", vg)
    assert (err.reason, err.tsv_column) == ("box_outside_image", 4) and "8x8" in err.detail
    spec = get_kind("vision_language")
    notes: list[str] = []
    row = parse_row(
        spec, "\t".join(vg).encode(), spec.default_selected_cols, 8, 1, options=RowOptions(clip_boxes=True), notes=notes
    )
    assert row["box"] == [1.0, 2.0, 8.0, 8.0] and notes == ["box_clipped", "image: PNG 8-bit RGB as stored"]
    # Caption and qa rows carry no box, so the image size does not matter to them.
    assert _row("vision_language", tsvkit.good_row("vision_language", 1))["answers"] == ["yes", "no"]
