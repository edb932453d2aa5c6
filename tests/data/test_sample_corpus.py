"""Tests for the sample corpus generator: exact TSV formats, determinism, and labels that follow from pixels."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from biomedgpt.cli.sample_data import main as cli_main
from biomedgpt.data.sample_corpus import (
    COLORS,
    IMAGE_TSV_SIZE,
    POSITION_ANCHORS,
    POSITION_PHRASES,
    POSITIONS,
    SHAPES,
    Scene,
    ShapeObject,
    image_codes,
    scene_captions,
    write_sample_corpus,
)

ROWS, SEED, SIZE = 64, 0, 96
SPLITS = ("train", "val", "test")
NCOLS = {
    "vision_language": 8,
    "text": 2,
    "image": 3,
    "detection": 3,
    **{f"{task}_{s}": n for s in SPLITS for task, n in (("vqa", 6), ("caption", 5), ("summarization", 2))},
    **{f"{task}_{s}": n for s in SPLITS for task, n in (("nli", 4), ("classification", 3))},
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_sample_corpus(tmp_path_factory.mktemp("corpus"), rows=ROWS, seed=SEED, image_size=SIZE)


def read_tsv(path: Path) -> list[list[str]]:
    data = path.read_bytes()
    assert data.endswith(b"\n") and b"\r" not in data, f"{path.name}: needs plain \\n line endings"
    return [line.split("\t") for line in data.decode("utf-8").split("\n")[:-1]]


def decode(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.urlsafe_b64decode(b64)))
    img.load()
    return img


# ------------------------------------------------------------------ re-deriving labels from pixels


def detect_objects(img: Image.Image) -> list[ShapeObject]:
    """Find the bright shapes of a synthetic scene: colour by chroma, shape by fill ratio, position by centroid.

    Scenes from make_scene have one shape per colour, so grouping pixels by colour separates them.
    """
    arr = np.asarray(img.convert("RGB"), dtype=np.float64)
    h, w = arr.shape[:2]
    found = []
    for colour, rgb in COLORS.items():
        # A pixel belongs to a colour if it is that palette colour scaled by ~0.7-1.15 (shapes are shaded
        # 0.85-1.0) with a small residual; JPEG fringes (darker, desaturated) fail the test.
        c = np.asarray(rgb, dtype=np.float64)
        t = arr @ c / (c @ c)
        resid = np.linalg.norm(arr - t[..., None] * c, axis=2)
        ys, xs = np.nonzero((t > 0.7) & (t < 1.15) & (resid < 45))
        if len(xs) < 40:  # stray pixels, not a shape
            continue
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        fill = len(xs) / float((x1 - x0) * (y1 - y0))
        # fill of the box: triangle 0.5, circle pi/4, square 1 (measured on JPEG: <=0.61, 0.71-0.79, >=0.90)
        shape = "triangle" if fill < 0.66 else "circle" if fill < 0.85 else "square"
        cx, cy = (x0 + x1) / 2 / w, (y0 + y1) / 2 / h
        position = min(POSITIONS, key=lambda p: (cx - POSITION_ANCHORS[p][0]) ** 2 + (cy - POSITION_ANCHORS[p][1]) ** 2)
        found.append(ShapeObject(shape, colour, position, (int(x0), int(y0), int(x1), int(y1))))
    return found


def answer_from_pixels(question: str, objs: list[ShapeObject]) -> str | None:
    """Answer a synthetic-scene question from detected objects (None for questions this does not know)."""
    by_shape = {o.shape: o for o in objs}
    by_pos = {POSITION_PHRASES[o.position]: o for o in objs}
    if question in ("what shape is shown?", "what color is the shape?", "where is the shape?"):
        assert len(objs) == 1
        return {"what": objs[0].shape, "color": objs[0].color, "where": objs[0].position}[
            "color" if "color" in question else question.split()[0]
        ]
    if question.startswith("how many shapes"):
        return str(len(objs))
    if m := re.fullmatch(r"is there an? (\w+)\?", question):
        return "yes" if m.group(1) in by_shape else "no"
    if m := re.fullmatch(r"is the shape (\w+)\?", question):
        return "yes" if objs[0].color == m.group(1) else "no"
    if m := re.fullmatch(r"is the (\w+) (\w+)\?", question):
        return "yes" if by_shape[m.group(1)].color == m.group(2) else "no"
    if m := re.fullmatch(r"what shape is (.+)\?", question):
        return by_pos[m.group(1)].shape
    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        return by_shape[m.group(1)].color
    if m := re.fullmatch(r"where is the (\w+)\?", question):
        return by_shape[m.group(1)].position
    return None


def parse_refs(refs: str) -> list[tuple[float, str]]:
    out = []
    for part in refs.split("&&"):
        conf, ans = part.split("|!+")
        assert 0.0 < float(conf) <= 1.0 and ans and ans == ans.strip()
        out.append((float(conf), ans))
    return out


# ------------------------------------------------------------------ file formats


def test_files_and_line_format(corpus: dict[str, Path]) -> None:
    root = corpus["manifest"].parent
    manifest = json.loads(corpus["manifest"].read_text())
    assert manifest["seed"] == SEED and manifest["rows"] == ROWS
    for name, ncols in NCOLS.items():
        rows = read_tsv(corpus[name])
        assert rows, name
        assert all(len(r) == ncols for r in rows), f"{name}: every row must have {ncols} columns"
        assert manifest["files"][name]["rows"] == len(rows)
    for name in ("type2ans", "object", "all_captions"):
        assert corpus[name].parent == root / "negative_sample"
    total = sum(p.stat().st_size for p in corpus.values())
    assert total < 5 * 1024 * 1024, f"default corpus is {total} bytes"


def test_pretraining_row_counts(corpus: dict[str, Path]) -> None:
    types = Counter(r[7] for r in read_tsv(corpus["vision_language"]))
    assert types == {"caption": ROWS, "qa": ROWS, "visual_grounding": ROWS}
    assert len(read_tsv(corpus["text"])) == ROWS // 2
    assert len(read_tsv(corpus["image"])) == ROWS // 4
    assert len(read_tsv(corpus["detection"])) == ROWS // 4
    for task in ("vqa", "caption", "summarization", "nli", "classification"):
        assert [len(read_tsv(corpus[f"{task}_{s}"])) for s in SPLITS] == [ROWS, ROWS // 4, ROWS // 4]


def test_vision_language_fields(corpus: dict[str, Path]) -> None:
    objects = set(corpus["object"].read_text().split("\n")[:-1])
    rows = read_tsv(corpus["vision_language"])
    assert len({r[0] for r in rows}) == len(rows), "uniq_id must be unique"
    assert [r[7] for r in rows[:12]] != sorted(r[7] for r in rows[:12]), "rows should be shuffled across types"
    for uid, b64, caption, question, refs, gt_objects, dataset, kind in rows:
        img = decode(b64)
        assert img.size == (SIZE, SIZE) and img.format in ("PNG", "JPEG")
        assert dataset in ("synthetic_shapes", "dicom_ct", "dicom_mr")
        for obj in filter(None, gt_objects.split("&&")):
            assert obj in objects and obj in (caption + " " + question), (uid, obj)
        if kind == "caption":
            assert caption and not question and not refs
        elif kind == "qa":
            assert question.endswith("?") and not caption
            answers = parse_refs(refs)
            assert answers[0][0] == max(c for c, _ in answers), "first answer carries the max confidence"
        else:
            assert kind == "visual_grounding" and caption and not question
            x0, y0, x1, y1 = map(int, refs.split(","))
            assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE


def test_text_rows(corpus: dict[str, Path]) -> None:
    rows = read_tsv(corpus["text"])
    assert len({r[0] for r in rows}) == len(rows)
    texts = [r[1] for r in rows]
    assert all(len(t.split()) >= 6 and t[0].isupper() and t.endswith(".") for t in texts)
    assert len(set(texts)) == len(texts), "text rows should be varied"


def test_image_rows_and_codes(corpus: dict[str, Path]) -> None:
    rows = read_tsv(corpus["image"])
    code_sets = []
    for _, b64, code_str in rows:
        img = decode(b64)
        assert img.size == (IMAGE_TSV_SIZE, IMAGE_TSV_SIZE)
        codes = [int(c) for c in code_str.split(" ")]
        assert len(codes) == 256 and all(0 <= c < 8192 for c in codes)
        # The codes are a deterministic function of the stored pixels (what makes infilling learnable).
        assert codes == image_codes(img)
        code_sets.append(frozenset(codes))
    assert len(set(code_sets)) > len(rows) // 2, "code maps should differ between images"


def test_image_codes_function() -> None:
    flat = Image.new("RGB", (256, 256), (255, 0, 0))
    assert image_codes(flat) == [15 * 256] * 256
    half = np.zeros((256, 256, 3), np.uint8)
    half[:, 128:] = 255
    codes = np.array(image_codes(Image.fromarray(half))).reshape(16, 16)
    assert (codes[:, :8] == 0).all() and (codes[:, 8:] == 4095).all()
    with pytest.raises(ValueError):
        image_codes(Image.new("RGB", (128, 128)))


def test_detection_rows_match_pixels(corpus: dict[str, Path]) -> None:
    sizes = set()
    for _, b64, label in read_tsv(corpus["detection"]):
        img = decode(b64)
        w, h = img.size
        sizes.add(img.size)
        arr = np.asarray(img.convert("RGB"), dtype=np.int32)
        bright = arr.max(axis=2) > 110
        covered = np.zeros_like(bright)
        for box in label.split("&&"):
            x0, y0, x1, y1, cat_id, name = box.split(",", 5)
            x0, y0, x1, y1 = int(x0), int(y0), int(x1), int(y1)
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert SHAPES[int(cat_id)] == name
            inside = bright[y0:y1, x0:x1]
            fill = inside.mean()
            expected = {"triangle": 0.5, "circle": np.pi / 4, "square": 1.0}[name]
            assert abs(fill - expected) < 0.12, (name, fill)
            covered[max(0, y0 - 1) : y1 + 1, max(0, x0 - 1) : x1 + 1] = True
        # Every bright pixel lies in (or within 1 px of) some box: no unlabelled objects.
        assert not (bright & ~covered).any()
    assert len(sizes) > 1 and any(w != h for w, h in sizes), "detection images should vary in size/aspect"


def test_negative_sample_files(corpus: dict[str, Path]) -> None:
    type2ans = json.loads(corpus["type2ans"].read_text())
    assert "other" in type2ans and all(isinstance(v, list) and v for v in type2ans.values())
    assert {"yes", "no"} <= set(type2ans["yes/no"])
    assert all(a.isdigit() or a in ("one", "two") for a in type2ans["how many"])
    objects = corpus["object"].read_text().split("\n")[:-1]
    assert set(SHAPES) <= set(objects) and len(objects) == len(set(objects))
    captions = corpus["all_captions"].read_text().split("\n")[:-1]
    assert len(captions) == len(set(captions))
    vl = read_tsv(corpus["vision_language"])
    assert {r[2] for r in vl if r[7] == "caption"} == set(captions)
    qa_answers = {a for r in vl if r[7] == "qa" for _, a in parse_refs(r[4])}
    assert qa_answers <= set(type2ans["other"])


# ------------------------------------------------------------------ labels agree with image content


def test_synthetic_captions_match_pixels(corpus: dict[str, Path]) -> None:
    rows = [r for r in read_tsv(corpus["vision_language"]) if r[7] == "caption" and r[6] == "synthetic_shapes"]
    rows += [["", r[4], r[2].split("&&")[0]] + [""] * 3 + ["synthetic_shapes"] for r in read_tsv(corpus["caption_val"])]
    checked = 0
    for r in rows:
        if r[6] != "synthetic_shapes" or not r[2].startswith(("a ", "there is")):
            continue  # DICOM captions
        img = decode(r[1])
        objs = detect_objects(img)
        assert r[2] in scene_captions(Scene(img, objs)), (r[2], objs)
        checked += 1
    assert checked > ROWS // 2


def test_vqa_answers_match_pixels(corpus: dict[str, Path]) -> None:
    checked = 0
    vl = [(r[1], r[3], parse_refs(r[4])[0][1]) for r in read_tsv(corpus["vision_language"]) if r[7] == "qa"]
    ft = [(r[5], r[2], r[3].split("|!+")[1]) for s in SPLITS for r in read_tsv(corpus[f"vqa_{s}"])]
    for b64, question, answer in vl + ft:
        img = decode(b64)
        if img.mode == "L":
            continue  # DICOM-derived row
        expected = answer_from_pixels(question, detect_objects(img))
        assert expected is not None, question
        assert expected == answer, (question, answer, expected)
        checked += 1
    assert checked > ROWS


def test_visual_grounding_boxes_match_pixels(corpus: dict[str, Path]) -> None:
    for r in read_tsv(corpus["vision_language"]):
        if r[7] != "visual_grounding":
            continue
        objs = detect_objects(decode(r[1]))
        desc = r[2]
        if desc == "the shape":
            (target,) = objs
        else:
            matches = [
                o for o in objs if desc in (f"the {o.color} {o.shape}", f"the {o.shape} {POSITION_PHRASES[o.position]}")
            ]
            assert len(matches) == 1, (desc, objs)
            target = matches[0]
        x0, y0, x1, y1 = (int(v) for v in r[4].split(","))
        d0, e0, d1, e1 = target.box  # box of the target's colour pixels (may miss a thin JPEG-blurred apex)
        assert x0 - 1 <= d0 and y0 - 1 <= e0 and d1 <= x1 + 1 and e1 <= y1 + 1, (desc, r[4], target.box)
        iou = (d1 - d0) * (e1 - e0) / ((x1 - x0) * (y1 - y0))
        assert iou > 0.7, (desc, r[4], target.box)


def test_classification_labels_match_pixels(corpus: dict[str, Path]) -> None:
    class2label = json.loads(corpus["classification_class2label"].read_text())
    assert class2label == {s: i for i, s in enumerate(SHAPES)}
    for s in SPLITS:
        rows = read_tsv(corpus[f"classification_{s}"])
        counts = Counter(r[2] for r in rows)
        assert set(counts) == set(SHAPES) and max(counts.values()) - min(counts.values()) <= 1
        for b64, idx, name in rows:
            assert class2label[name] == int(idx)
            img = decode(b64)
            assert img.size == (SIZE, SIZE)
            (obj,) = detect_objects(img)
            assert obj.shape == name


# ------------------------------------------------------------------ fine-tuning files


def test_vqa_finetune_files_and_majority_baseline(corpus: dict[str, Path]) -> None:
    answer_types = json.loads(corpus["vqa_answer_types"].read_text())
    ans2label = json.loads(corpus["vqa_ans2label"].read_text())
    split_rows = {s: read_tsv(corpus[f"vqa_{s}"]) for s in SPLITS}
    qids = [r[0] for s in SPLITS for r in split_rows[s]]
    assert len(set(qids)) == len(qids) and set(answer_types) == set(qids)
    answers = {s: [r[3].split("|!+")[1] for r in split_rows[s]] for s in SPLITS}
    assert sorted(ans2label.values()) == list(range(len(ans2label)))
    assert set(ans2label) == set(answers["train"]) | set(answers["val"])
    for s in SPLITS:
        for qid, _image_id, question, ref, objects, b64 in split_rows[s]:
            assert ref.startswith("1|!+") and question.endswith("?")
            assert answer_types[qid] == ("CLOSED" if ref[4:] in ("yes", "no") else "OPEN")
            img = decode(b64)
            assert img.size == (SIZE, SIZE)
            assert (objects != "") <= (img.mode == "L"), "only DICOM rows carry an organ in the objects column"
        yn = Counter(a for a in answers[s] if a in ("yes", "no"))
        assert abs(yn["yes"] - yn["no"]) <= 1, f"{s}: yes/no answers must be balanced, got {yn}"

    # Majority baselines: the most frequent train answer (overall, and per answer type) predicted on test.
    def majority_acc(kind: str | None) -> tuple[str, float, int]:
        def keep(r: list[str]) -> bool:
            return kind is None or answer_types[r[0]] == kind

        train = [a for a, r in zip(answers["train"], split_rows["train"]) if keep(r)]
        test = [a for a, r in zip(answers["test"], split_rows["test"]) if keep(r)]
        guess = Counter(train).most_common(1)[0][0]
        return guess, sum(a == guess for a in test) / len(test), len(test)

    results = {kind or "ALL": majority_acc(kind) for kind in (None, "CLOSED", "OPEN")}
    best_constant = Counter(answers["test"]).most_common(1)[0][1] / len(answers["test"])
    print(
        "\nVQA majority baseline on test: "
        + ", ".join(f"{k} {acc:.3f} (guess {g!r}, n={n})" for k, (g, acc, n) in results.items())
        + f"; best constant answer {best_constant:.3f}"
    )
    assert results["ALL"][1] < 0.5 and best_constant < 0.5
    assert results["CLOSED"][1] <= 0.6 and results["OPEN"][1] < 0.5


def test_caption_finetune(corpus: dict[str, Path]) -> None:
    for s in SPLITS:
        rows = read_tsv(corpus[f"caption_{s}"])
        assert len({r[1] for r in rows}) == len(rows), "image_id is the eval id and must be unique"
        for uid, _image_id, caption, objects, b64 in rows:
            assert uid.startswith("200_") and objects == "" and caption
            refs = caption.split("&&")
            assert (len(refs) == 1) if s == "train" else (len(refs) >= 2)
            assert decode(b64).size == (SIZE, SIZE)


def test_summarization_and_nli(corpus: dict[str, Path]) -> None:
    for s in SPLITS:
        for source, summary in read_tsv(corpus[f"summarization_{s}"]):
            assert summary.endswith("?") and len(summary) < len(source)
            # templated summaries reuse the key phrase of the question
            key = re.sub(r"^(What causes|How can|Can \w+ make you feel|What tests diagnose) ", "", summary)
            key = re.sub(r" be treated\?$|\?$", "", key)
            assert key.lower() in source.lower(), (summary, source)
        rows = read_tsv(corpus[f"nli_{s}"])
        labels = Counter(r[2] for r in rows)
        assert set(labels) == {"0", "1", "2"} and max(labels.values()) - min(labels.values()) <= 1
        for s1, s2, label, genre in rows:
            assert s1.startswith("The patient is") and s2.endswith(".") and genre == "clinical"
            if label == "2" and "has no " in s2:
                assert s2.removeprefix("The patient has no ").rstrip(".") in s1  # negates a stated symptom


def test_dicom_rows_present(corpus: dict[str, Path]) -> None:
    manifest = json.loads(corpus["manifest"].read_text())
    assert {"CT_small.dcm", "MR_small.dcm"} <= set(manifest["dicom_sources"])
    vl = read_tsv(corpus["vision_language"])
    datasets = Counter(r[6] for r in vl)
    assert datasets["dicom_ct"] > 0 and datasets["dicom_mr"] > 0
    for r in vl:
        if r[6].startswith("dicom"):
            img = decode(r[1])
            assert img.format == "PNG" and img.mode == "L"
            arr = np.asarray(img)
            assert arr.std() > 10, "windowed DICOM slice should have contrast"
            if r[7] == "caption":
                # the caption names the modality
                assert r[6].removeprefix("dicom_") in r[2].split(), r[2]
    dicom_vqa = [r for s in SPLITS for r in read_tsv(corpus[f"vqa_{s}"]) if decode(r[5]).mode == "L"]
    assert dicom_vqa
    caption_images = [decode(r[4]).mode for s in SPLITS for r in read_tsv(corpus[f"caption_{s}"])]
    assert "L" in caption_images
    assert any(decode(r[1]).getextrema() and np.asarray(decode(r[1])).std() > 10 for r in read_tsv(corpus["image"]))


# ------------------------------------------------------------------ determinism, scaling, CLI


def _digests(paths: dict[str, Path]) -> dict[str, str]:
    return {name: hashlib.sha256(p.read_bytes()).hexdigest() for name, p in paths.items()}


def test_deterministic_per_seed(corpus: dict[str, Path], tmp_path: Path) -> None:
    again = write_sample_corpus(tmp_path / "same", rows=ROWS, seed=SEED, image_size=SIZE)
    assert _digests(again) == _digests(corpus)
    other = _digests(write_sample_corpus(tmp_path / "other", rows=ROWS, seed=SEED + 1, image_size=SIZE))
    base = _digests(corpus)
    differing = {name for name in NCOLS if other[name] != base[name]}
    assert differing == set(NCOLS), f"every TSV should change with the seed; unchanged: {set(NCOLS) - differing}"


def test_rows_and_image_size_scale(tmp_path: Path) -> None:
    paths = write_sample_corpus(tmp_path, rows=8, seed=5, image_size=48)
    vl = read_tsv(paths["vision_language"])
    assert len(vl) == 24 and decode(vl[0][1]).size == (48, 48)
    assert len(read_tsv(paths["vqa_train"])) == 8 and len(read_tsv(paths["vqa_test"])) == 2
    assert decode(read_tsv(paths["image"])[0][1]).size == (256, 256)  # pure-image rows stay 256x256
    with pytest.raises(ValueError):
        write_sample_corpus(tmp_path, rows=0)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert cli_main([str(out), "--rows", "4", "--seed", "2", "--image-size", "48"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 2 and manifest["image_size"] == 48
    for name in NCOLS:
        assert (out / f"{name}.tsv").is_file()
    assert (out / "negative_sample" / "type2ans.json").is_file()
    err = capsys.readouterr().err
    assert "vision_language.tsv" in err and "files" in err
    assert cli_main([str(tmp_path / "bad"), "--rows", "0", "-q"]) == 2
