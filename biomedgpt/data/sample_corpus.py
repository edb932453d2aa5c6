"""Small, deterministic sample corpus in the exact TSV formats of BiomedGPT (written by its scripts/preprocess/).

The corpus is meant for tests, demos and smoke runs of pretraining / fine-tuning, so it has two parts:

* **Real medical images** -- the few single-frame grayscale DICOM files that ship inside the pydicom wheel
  (CT/MR slices), windowed to 8 bit, randomly cropped/flipped and saved as PNG. They make the data look like
  the real thing (grayscale, odd intensity histograms) but their text is only loosely learnable.
* **A learnable synthetic part** -- one to three bright shapes (circle/square/triangle) of a colour
  (red/green/blue/white) at a position (left/right/top/bottom) on a dark, smoothly noisy background. Captions,
  VQA answers, grounding boxes, detection boxes, class labels and image-infilling codes all follow from the
  pixels, so a model that trains correctly on the corpus visibly improves on it.

Everything is drawn from ``numpy`` generators seeded from ``(seed, section name)``, so the same seed gives
byte-identical files (Pillow's PNG/JPEG encoders embed no timestamps) and one section's counts do not shift
another section's random stream.

Layout written by :func:`write_sample_corpus` (all TSVs: tab-separated, no header, ``\\n`` line endings)::

    OUT_DIR/vision_language.tsv   uniq_id, image, caption, question, refs, gt_objects, dataset_name, type
    OUT_DIR/text.tsv              uniq_id, text
    OUT_DIR/image.tsv             uniq_id, image (256x256 JPEG), 256 space-separated codes in [0, 8191]
    OUT_DIR/detection.tsv         uniq_id, image, x0,y0,x1,y1,cat_id,cat_name&&...
    OUT_DIR/negative_sample/{type2ans.json, object.txt, all_captions.txt}
    OUT_DIR/vqa_{train,val,test}.tsv             question_id, image_id, question, 1|!+answer, objects, image
    OUT_DIR/caption_{train,val,test}.tsv         uniq_id, image_id, caption (eval: refs joined by &&), "", image
    OUT_DIR/summarization_{train,val,test}.tsv   source, summary
    OUT_DIR/nli_{train,val,test}.tsv             sentence1, sentence2, label (0 neutral/1 entail/2 contra), genre
    OUT_DIR/classification_{train,val,test}.tsv  image, label_index, label_name
    OUT_DIR/classification_class2label.json      {label_name: index}
    OUT_DIR/vqa_ans2label.json                   {answer: index} over train+val answers
    OUT_DIR/vqa_answer_types.json                {question_id: "CLOSED" | "OPEN"} for every split
    OUT_DIR/manifest.json                        seed, sizes and row counts
"""

from __future__ import annotations

import base64
import io
import json
import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 45, 40),
    "green": (40, 200, 70),
    "blue": (55, 95, 240),
    "white": (235, 235, 235),
}
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
# Shape centre anchors as fractions of (width, height); kept near the border so that two shapes at different
# positions rarely touch and the position word is unambiguous from the shape centroid.
POSITION_ANCHORS: dict[str, tuple[float, float]] = {
    "left": (0.24, 0.5),
    "right": (0.76, 0.5),
    "top": (0.5, 0.24),
    "bottom": (0.5, 0.76),
}
IMAGE_TSV_SIZE = 256  # pure-image rows are pre-resized to 256x256 (preprocess/pretraining/mim_sample_chexpert_small.py)
NUM_CODES = 8192
CODE_GRID = 16  # 16x16 = 256 codes for the central 128x128 region
ORGANS: tuple[str, ...] = ("head", "chest", "abdomen", "liver", "kidney", "skull", "vertebra", "brain")
NLI_LABELS: dict[str, int] = {"neutral": 0, "entailment": 1, "contradiction": 2}

DEFAULT_ROWS = 64
DEFAULT_SEED = 0
DEFAULT_IMAGE_SIZE = 96

ProgressFn = Callable[[str, int], None]


# --------------------------------------------------------------------------------------------- helpers


def _rng(seed: int, section: str) -> np.random.Generator:
    # crc32 (not hash()) so the stream is stable across processes and Python versions.
    return np.random.default_rng([seed, zlib.crc32(section.encode())])


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _clean(text: str) -> str:
    """BiomedGPT's TSV reader has no quoting: a tab or newline inside a field would corrupt the row."""
    return " ".join(text.replace("\t", " ").replace("\r", " ").replace("\n", " ").split())


def encode_image(img: Image.Image, fmt: str = "PNG", quality: int = 90) -> str:
    """Base64 (standard alphabet) of the encoded image file bytes, as BiomedGPT stores images in TSVs."""
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=quality, subsampling=0)
    else:
        img.save(buf, format=fmt, optimize=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_image(b64: str) -> Image.Image:
    """Inverse of :func:`encode_image` (urlsafe decoding also accepts the standard alphabet, like OFA)."""
    img = Image.open(io.BytesIO(base64.urlsafe_b64decode(b64)))
    img.load()
    return img


def _b64(img: Image.Image) -> str:
    """Grayscale DICOM-derived images as lossless PNG, synthetic RGB scenes as JPEG (q90, ~6x smaller than PNG).

    JPEGs are written without chroma subsampling (4:4:4) so small shapes keep their colour up to the edges.
    """
    return encode_image(img, "PNG" if img.mode == "L" else "JPEG")


def _roundtrip(img: Image.Image, fmt: str) -> tuple[Image.Image, str]:
    """Encode once and decode again so derived labels (codes) are computed from the pixels actually stored."""
    b64 = encode_image(img, fmt)
    return decode_image(b64), b64


def image_codes(img: Image.Image) -> list[int]:
    """Deterministic stand-in for VQ-GAN codes: 256 ids in [0, 8191] of the central 128x128 of a 256x256 image.

    Each 8x8 cell of the centre maps to ``r*256 + g*16 + b`` (channel means quantised to 16 levels) plus 4096
    when the cell is textured (gray std > 20). The masked centre is thus predictable from colours visible
    around it, which is what makes the image-infilling task learnable on this corpus.
    """
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    if arr.shape[:2] != (IMAGE_TSV_SIZE, IMAGE_TSV_SIZE):
        raise ValueError(f"image_codes expects a {IMAGE_TSV_SIZE}x{IMAGE_TSV_SIZE} image, got {arr.shape[:2]}")
    lo, hi = IMAGE_TSV_SIZE // 4, 3 * IMAGE_TSV_SIZE // 4
    cell = (hi - lo) // CODE_GRID
    centre = arr[lo:hi, lo:hi].reshape(CODE_GRID, cell, CODE_GRID, cell, 3)
    means = centre.mean(axis=(1, 3))
    q = np.clip(means * 16.0 / 256.0, 0, 15).astype(np.int64)
    gray_std = centre.mean(axis=4).std(axis=(1, 3))
    codes = q[..., 0] * 256 + q[..., 1] * 16 + q[..., 2] + np.where(gray_std > 20.0, 4096, 0)
    return [int(c) for c in codes.reshape(-1)]


def _write_tsv(path: Path, rows: list[tuple[str, ...]], ncols: int) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            if len(row) != ncols:
                raise AssertionError(f"{path.name}: row has {len(row)} columns, expected {ncols}")
            for field in row:
                if "\t" in field or "\n" in field or "\r" in field:
                    raise AssertionError(f"{path.name}: field contains a tab/newline: {field[:60]!r}")
            f.write("\t".join(row) + "\n")


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    path.write_text("".join(_clean(s) + "\n" for s in lines), encoding="utf-8")


# --------------------------------------------------------------------------------------------- synthetic scenes


@dataclass(frozen=True)
class ShapeObject:
    """One drawn shape and its tight pixel box ``(x0, y0, x1, y1)`` (x1/y1 exclusive)."""

    shape: str
    color: str
    position: str
    box: tuple[int, int, int, int]


@dataclass
class Scene:
    image: Image.Image
    objects: list[ShapeObject]


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Dark, smooth 'tissue-like' noise: a coarse random grid upsampled bilinearly (compresses well)."""
    gw, gh = max(2, width // 12), max(2, height // 12)
    coarse = rng.uniform(8.0, 50.0, size=(gh, gw)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(coarse, mode="F").resize((width, height), Image.BILINEAR))
    return np.repeat(smooth[:, :, None], 3, axis=2)


def _shape_mask(shape: str, width: int, height: int, cx: float, cy: float, r: float) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def _boxes_overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int], margin: int = 2) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def _render(
    rng: np.random.Generator,
    width: int,
    height: int,
    specs: list[tuple[str, str, str, float, float, float]],
) -> Scene:
    """Draw ``(shape, color, position, cx, cy, r)`` specs on a fresh background, add fine noise."""
    arr = _background(rng, width, height)
    objects = []
    for shape, color, position, cx, cy, r in specs:
        mask = _shape_mask(shape, width, height, cx, cy, r)
        bbox = mask.getbbox()
        if bbox is None:  # cannot happen for r >= 2, but never emit an empty box
            raise AssertionError("empty shape mask")
        shade = rng.uniform(0.85, 1.0)
        m = np.asarray(mask, dtype=bool)
        arr[m] = np.asarray(COLORS[color], dtype=np.float32) * shade
        objects.append(ShapeObject(shape, color, position, tuple(int(v) for v in bbox)))
    arr = arr + rng.normal(0.0, 2.5, size=arr.shape).astype(np.float32)
    img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="RGB")
    return Scene(img, objects)


def make_scene(
    rng: np.random.Generator,
    size: int,
    num_shapes: int = 1,
    shapes: Sequence[str] | None = None,
    colors: Sequence[str] | None = None,
    positions: Sequence[str] | None = None,
) -> Scene:
    """A square ``size`` px scene with 1 or 2 shapes at distinct positions (distinct shape and colour).

    ``shapes``/``colors``/``positions`` force the attributes of the first shapes (e.g. for balanced labels).
    """
    if num_shapes not in (1, 2):
        raise ValueError("make_scene draws 1 or 2 shapes")
    for _ in range(100):
        shp = list(shapes) if shapes else []
        col = list(colors) if colors else []
        pos = list(positions) if positions else []
        while len(shp) < num_shapes:
            cand = _pick(rng, SHAPES)
            if cand not in shp:
                shp.append(cand)
        while len(col) < num_shapes:
            cand = _pick(rng, tuple(COLORS))
            if cand not in col:
                col.append(cand)
        while len(pos) < num_shapes:
            cand = _pick(rng, POSITIONS)
            if cand not in pos:
                pos.append(cand)
        specs = []
        for s, c, p in zip(shp[:num_shapes], col[:num_shapes], pos[:num_shapes]):
            ax, ay = POSITION_ANCHORS[p]
            r = size * rng.uniform(0.10, 0.15)
            jitter = size * 0.04
            specs.append(
                (s, c, p, ax * size + rng.uniform(-jitter, jitter), ay * size + rng.uniform(-jitter, jitter), r)
            )
        scene = _render(rng, size, size, specs)
        if num_shapes == 1 or not _boxes_overlap(scene.objects[0].box, scene.objects[1].box):
            return scene
    raise AssertionError("could not place non-overlapping shapes")  # practically unreachable


def make_detection_scene(rng: np.random.Generator, width: int, height: int, num_shapes: int) -> Scene:
    """Free placement of ``num_shapes`` non-overlapping shapes (any shape/colour, repeats allowed)."""
    specs: list[tuple[str, str, str, float, float, float]] = []
    boxes: list[tuple[int, int, int, int]] = []
    tries = 0
    while len(specs) < num_shapes and tries < 200:
        tries += 1
        r = min(width, height) * rng.uniform(0.08, 0.16)
        cx, cy = rng.uniform(r + 1, width - r - 1), rng.uniform(r + 1, height - r - 1)
        box = (int(cx - r), int(cy - r), int(cx + r) + 1, int(cy + r) + 1)
        if any(_boxes_overlap(box, b, margin=3) for b in boxes):
            continue
        boxes.append(box)
        specs.append((_pick(rng, SHAPES), _pick(rng, tuple(COLORS)), _position_of(cx, cy, width, height), cx, cy, r))
    return _render(rng, width, height, specs)


def _position_of(cx: float, cy: float, width: int, height: int) -> str:
    """Nearest of the four position anchors (detection scenes place shapes freely)."""
    best = min(
        POSITIONS,
        key=lambda p: (cx / width - POSITION_ANCHORS[p][0]) ** 2 + (cy / height - POSITION_ANCHORS[p][1]) ** 2,
    )
    return best


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _article_num(n: int) -> str:
    """'an 8', 'an 11', 'an 18', 'an 80..89' -- the numbers read with a vowel sound."""
    return "an" if n in (8, 11, 18) or 80 <= n <= 89 else "a"


def _ordered(objects: Sequence[ShapeObject]) -> list[ShapeObject]:
    # Canonical left/right/top/bottom order so a caption is a function of the image.
    return sorted(objects, key=lambda o: POSITIONS.index(o.position))


# Natural phrasing of each position in captions/questions, and the soft second answer of "where" questions.
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
POSITION_SOFT_ANSWERS: dict[str, str] = {
    "left": "left side",
    "right": "right side",
    "top": "upper part",
    "bottom": "lower part",
}

_SCENE_CAPTION_TEMPLATES = (
    "{a} {c} {s} {where}",
    "there is {a} {c} {s} {where}",
    "{a} {c} {s} in the {region} of the image",
)
POSITION_REGIONS: dict[str, str] = {
    "left": "left half",
    "right": "right half",
    "top": "upper part",
    "bottom": "lower part",
}


def scene_captions(scene: Scene) -> list[str]:
    """All reference captions of a scene; the first one is canonical."""
    refs = []
    for tpl in _SCENE_CAPTION_TEMPLATES:
        parts = [
            tpl.format(
                a=_article(o.color),
                c=o.color,
                s=o.shape,
                where=POSITION_PHRASES[o.position],
                region=POSITION_REGIONS[o.position],
            )
            for o in _ordered(scene.objects)
        ]
        refs.append(" and ".join(parts))
    return refs


# --------------------------------------------------------------------------------------------- DICOM images


@dataclass(frozen=True)
class DicomSource:
    filename: str
    modality: str  # "ct" | "mr"
    plane: str | None
    organ: str | None
    captions: tuple[str, ...]
    objects: tuple[str, ...]


_DICOM_CANDIDATES: tuple[DicomSource, ...] = (
    DicomSource(
        "CT_small.dcm",
        "ct",
        "axial",
        "chest",
        (
            "axial ct slice of the chest at the level of a thoracic vertebra",
            "ct image of the upper chest in the axial plane showing a vertebra",
            "axial chest ct through a thoracic vertebral body",
        ),
        ("chest", "vertebra"),
    ),
    DicomSource(
        "MR_small.dcm",
        "mr",
        None,
        None,
        ("mr image slice of soft tissue", "soft tissue on a small mr slice", "small mr slice"),
        (),
    ),
    DicomSource(
        "examples_overlay.dcm",
        "mr",
        "axial",
        "abdomen",
        (
            "axial mr slice of the abdomen showing the liver and both kidneys",
            "abdominal mr image in the axial plane showing the liver",
            "axial mr of the upper abdomen with liver and kidney",
        ),
        ("abdomen", "liver", "kidney"),
    ),
    DicomSource(
        "693_J2KI.dcm",
        "ct",
        "axial",
        "head",
        (
            "axial ct slice of the head showing the skull and brain",
            "non contrast axial ct of the head",
            "head ct in the axial plane showing the skull",
        ),
        ("head", "skull", "brain"),
    ),
    DicomSource(
        "J2K_pixelrep_mismatch.dcm",
        "ct",
        "axial",
        "head",
        (
            "axial ct slice of the head at the level of the skull base",
            "axial head ct through the skull base",
            "ct of the head in the axial plane at the skull base",
        ),
        ("head", "skull"),
    ),
)


@cache
def _load_dicom_uint8(filename: str) -> np.ndarray | None:
    """8-bit grayscale pixels of a pydicom test file, or None if missing/undecodable here."""
    try:
        import pydicom
        from pydicom.data import get_testdata_file

        path = get_testdata_file(filename)
        if path is None:
            return None
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array.astype(np.float64)
    except Exception as exc:  # any missing pixel handler/plugin just drops this source
        logger.info("skipping DICOM %s: %s", filename, exc)
        return None
    if arr.ndim != 2:  # only single-frame grayscale
        return None
    # Window to [min, max] after clipping 0.5% outliers (CT air/metal would otherwise crush the contrast).
    lo, hi = np.percentile(arr, [0.5, 99.5])
    if hi <= lo:
        return None
    return np.clip((arr - lo) * (255.0 / (hi - lo)), 0, 255).round().astype(np.uint8)


def available_dicom_sources() -> list[DicomSource]:
    """The candidate DICOM files that load (with a decoder) in this environment; CT_small/MR_small always do."""
    return [src for src in _DICOM_CANDIDATES if _load_dicom_uint8(src.filename) is not None]


def dicom_view(rng: np.random.Generator, src: DicomSource, size: int) -> Image.Image:
    """A random square crop (75-100% of the short side), optional flip, resized to ``size`` px, mode L."""
    arr = _load_dicom_uint8(src.filename)
    if arr is None:
        raise ValueError(f"DICOM {src.filename} not available")
    h, w = arr.shape
    side = int(min(h, w) * rng.uniform(0.75, 1.0))
    y0 = int(rng.integers(0, h - side + 1))
    x0 = int(rng.integers(0, w - side + 1))
    img = Image.fromarray(arr[y0 : y0 + side, x0 : x0 + side], mode="L").resize((size, size), Image.BILINEAR)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img


# --------------------------------------------------------------------------------------------- VQA items


@dataclass
class VQAItem:
    image: Image.Image
    question: str
    answers: list[tuple[float, str]]  # (confidence, answer); the first one has the max confidence
    answer_type: str  # "CLOSED" | "OPEN"
    objects: list[str]
    source: str  # dataset_name

    @property
    def answer(self) -> str:
        return self.answers[0][1]


_OPEN_SYN_KINDS = ("what_shape", "what_color", "where", "how_many")
_CLOSED_SYN_KINDS = ("is_there", "is_color")


def _synthetic_vqa(rng: np.random.Generator, size: int, closed: bool, want_yes: bool) -> VQAItem:
    num = 1 if rng.random() < 0.6 else 2
    scene = make_scene(rng, size, num)
    objs = scene.objects
    target = _pick(rng, objs)
    other_shapes = [s for s in SHAPES if s not in {o.shape for o in objs}]
    answers: list[tuple[float, str]]
    if closed:
        kind = _pick(rng, _CLOSED_SYN_KINDS)
        if kind == "is_there":
            shape = target.shape if want_yes else _pick(rng, other_shapes)
            question, mentioned = f"is there {_article(shape)} {shape}?", [shape]
        else:
            color = target.color if want_yes else _pick(rng, [c for c in COLORS if c != target.color])
            subject = "the shape" if num == 1 else f"the {target.shape}"
            question, mentioned = f"is {subject} {color}?", [target.shape] if num > 1 else []
        answers = [(1.0, "yes" if want_yes else "no")]
    else:
        kind = _pick(rng, _OPEN_SYN_KINDS)
        if kind == "what_shape":
            question = "what shape is shown?" if num == 1 else f"what shape is {POSITION_PHRASES[target.position]}?"
            answers, mentioned = [(1.0, target.shape)], [target.shape]
        elif kind == "what_color":
            question = "what color is the shape?" if num == 1 else f"what color is the {target.shape}?"
            answers, mentioned = [(1.0, target.color)], [target.shape] if num > 1 else []
        elif kind == "where":
            question = "where is the shape?" if num == 1 else f"where is the {target.shape}?"
            # Soft second answer like VQAv2-style refs; the max-confidence one is the target.
            answers = [(1.0, target.position), (0.3, POSITION_SOFT_ANSWERS[target.position])]
            mentioned = [target.shape] if num > 1 else []
        else:
            question = _pick(rng, ("how many shapes are there?", "how many shapes are shown?"))
            answers, mentioned = [(1.0, str(num)), (0.3, ("one", "two")[num - 1])], []
    return VQAItem(scene.image, question, answers, "CLOSED" if closed else "OPEN", mentioned, "synthetic_shapes")


def _dicom_vqa(rng: np.random.Generator, src: DicomSource, size: int, closed: bool, want_yes: bool) -> VQAItem:
    img = dicom_view(rng, src, size)
    if closed:
        modality = src.modality if want_yes else ("mr" if src.modality == "ct" else "ct")
        if rng.random() < 0.5:
            question = {"ct": "is this a ct scan?", "mr": "is this an mr image?"}[modality]
        else:
            question = f"was this image taken with {modality}?"
        answers = [(1.0, "yes" if want_yes else "no")]
    else:
        kinds = ["modality"] + (["organ"] if src.organ else []) + (["plane"] if src.plane else [])
        kind = _pick(rng, kinds)
        if kind == "modality":
            question = _pick(rng, ("what modality is this image?", "what imaging modality was used?"))
            answers = [(1.0, src.modality)]
        elif kind == "organ":
            question = _pick(rng, ("what organ is shown?", "which body region is shown?"))
            answers = [(1.0, str(src.organ))]
        else:
            question = "in which plane is this image taken?"
            answers = [(1.0, str(src.plane))]
    # objects = the image's organ, like VQA-RAD's image_organ column
    objects = [src.organ] if src.organ else []
    return VQAItem(img, question, answers, "CLOSED" if closed else "OPEN", objects, f"dicom_{src.modality}")


def _vqa_items(rng: np.random.Generator, n: int, size: int, dicoms: list[DicomSource]) -> list[VQAItem]:
    """``n`` items, ~40% closed; yes/no targets exactly balanced (±1) so a majority baseline stays ~50% on them."""
    closed = rng.random(n) < 0.4
    n_closed = int(closed.sum())
    yes = np.array([i % 2 == 0 for i in range(n_closed)])
    rng.shuffle(yes)
    yes_iter = iter(yes.tolist())
    items = []
    for i in range(n):
        want_yes = bool(next(yes_iter)) if closed[i] else False
        if dicoms and rng.random() < 0.2:
            items.append(_dicom_vqa(rng, _pick(rng, dicoms), size, bool(closed[i]), want_yes))
        else:
            items.append(_synthetic_vqa(rng, size, bool(closed[i]), want_yes))
    return items


def format_refs(answers: Sequence[tuple[float, str]]) -> str:
    """``conf|!+answer&&conf|!+answer`` (as preprocess/pretraining/vqa_sample_pathvqa.py writes it); confidences
    printed compactly (``1``, ``0.3``)."""
    return "&&".join(f"{conf:g}|!+{_clean(ans)}" for conf, ans in answers)


# --------------------------------------------------------------------------------------------- text generators

# drug -> a disease it is actually used for, so generated sentences stay medically plausible
_DRUG_FOR: dict[str, str] = {
    "metformin": "type 2 diabetes",
    "lisinopril": "hypertension",
    "atorvastatin": "high cholesterol",
    "amoxicillin": "pneumonia",
    "warfarin": "atrial fibrillation",
    "ibuprofen": "rheumatoid arthritis",
    "prednisone": "asthma",
    "furosemide": "heart failure",
}
_DRUGS = tuple(_DRUG_FOR)
_DISEASES = (*_DRUG_FOR.values(), "chronic kidney disease")
_SYMPTOMS = (
    "chest pain",
    "shortness of breath",
    "persistent cough",
    "headache",
    "abdominal pain",
    "fatigue",
    "dizziness",
    "back pain",
)
_SIDE_EFFECTS = ("nauseous", "dizzy", "very tired", "itchy", "short of breath")
_GENES = ("BRCA1", "TP53", "EGFR", "KRAS", "APOE", "CFTR")
_CANCERS = ("breast cancer", "lung cancer", "colorectal cancer", "ovarian cancer", "pancreatic cancer")
_FINDINGS = ("a small pleural effusion", "mild cardiomegaly", "a right lower lobe opacity", "no acute abnormality")
_MODALITIES = ("CT", "MRI", "ultrasound", "PET", "radiography")
_DURATIONS = ("two days", "a week", "three weeks", "a month", "several months")

_TEXT_TEMPLATES = (
    "{drug} is commonly prescribed for patients with {disease}.",
    "Patients with {disease} often present with {symptom} and {symptom2}.",
    "A {mm} mm nodule was identified in the {side} {lobe} lobe on {modality}.",
    "The {organ} appeared normal on {modality} without evidence of a focal lesion.",
    "In a cohort of {n} patients, {drug} reduced hospital admissions by {pct} percent.",
    "Mutations in {gene} are associated with an increased risk of {cancer}.",
    "Follow up imaging after {duration} showed {finding}.",
    "The patient was treated with {drug} and reported improvement of {symptom} within {duration}.",
    "Early diagnosis of {cancer} improves five year survival.",
    "{modality} is the preferred first test when {disease} is suspected in adults.",
)


def _fill(rng: np.random.Generator, template: str) -> str:
    drug = _pick(rng, _DRUGS)
    slots = {
        "drug": drug,
        "disease": _DRUG_FOR[drug] if "{drug}" in template else _pick(rng, _DISEASES),
        "symptom": _pick(rng, _SYMPTOMS),
        "symptom2": _pick(rng, _SYMPTOMS),
        "mm": str(int(rng.integers(3, 25))),
        "side": _pick(rng, ("left", "right")),
        "lobe": _pick(rng, ("upper", "middle", "lower")),
        "modality": _pick(rng, _MODALITIES),
        "organ": _pick(rng, ORGANS),
        "n": str(int(rng.integers(40, 2000))),
        "pct": str(int(rng.integers(5, 45))),
        "gene": _pick(rng, _GENES),
        "cancer": _pick(rng, _CANCERS),
        "duration": _pick(rng, _DURATIONS),
        "finding": _pick(rng, _FINDINGS),
    }
    text = template.format(**slots)
    return text[0].upper() + text[1:]


def _text_rows(rng: np.random.Generator, n: int) -> list[tuple[str, ...]]:
    rows = []
    for i in range(n):
        k = int(rng.integers(1, 4))  # 1-3 sentences, like PubMed sentences / short passages
        text = " ".join(_fill(rng, _pick(rng, _TEXT_TEMPLATES)) for _ in range(k))
        rows.append((f"2_{i}", _clean(text)))
    return rows


def _summarization_pair(rng: np.random.Generator) -> tuple[str, str]:
    age = int(rng.integers(18, 85))
    sex = _pick(rng, ("man", "woman"))
    symptom = _pick(rng, _SYMPTOMS)
    duration = _pick(rng, _DURATIONS)
    drug = _pick(rng, _DRUGS)
    disease = _DRUG_FOR[drug] if rng.random() < 0.5 else _pick(rng, _DISEASES)
    intro = _pick(rng, ("Hello doctor,", "Hi,", "Dear doctor,", "Good morning."))
    story = f"I am {_article_num(age)} {age} year old {sex} and I have had {symptom} for {duration}."
    kind = int(rng.integers(4))
    if kind == 0:
        ask = f"It gets worse at night. What could be causing {symptom} and should I be worried?"
        summary = f"What causes {symptom}?"
    elif kind == 1:
        ask = f"I tried resting but nothing helps. Is there any medicine or home remedy for {symptom}?"
        summary = f"How can {symptom} be treated?"
    elif kind == 2:
        effect = _pick(rng, _SIDE_EFFECTS)
        ask = f"I was prescribed {drug} for {disease} last month and since then I feel {effect}. Can {drug} do this?"
        summary = f"Can {drug} make you feel {effect}?"
    else:
        ask = f"My father had {disease}. Which tests should I ask for to find out whether I have {disease} too?"
        summary = f"What tests diagnose {disease}?"
    thanks = _pick(rng, ("Thank you.", "Thanks in advance.", "", "Please help."))
    return _clean(f"{intro} {story} {ask} {thanks}"), _clean(summary)


_NLI_DIAGNOSES = {
    "pneumonia": ("a lung infection", "lungs"),
    "myocardial infarction": ("a heart attack", "heart"),
    "acute kidney injury": ("a kidney problem", "kidneys"),
    "diabetic ketoacidosis": ("a complication of diabetes", "blood sugar"),
    "pulmonary embolism": ("a blood clot in the lungs", "lungs"),
}


def _nli_triple(rng: np.random.Generator, label: str) -> tuple[str, str, str]:
    age = int(rng.integers(20, 95))
    sex = _pick(rng, ("man", "woman"))
    symptom = _pick(rng, _SYMPTOMS)
    diagnosis = _pick(rng, tuple(_NLI_DIAGNOSES))
    category, organ = _NLI_DIAGNOSES[diagnosis]
    drug = _pick(rng, _DRUGS)
    premise = (
        f"The patient is {_article_num(age)} {age} year old {sex} who presented with {symptom}"
        f" and was diagnosed with {diagnosis}."
    )
    if rng.random() < 0.5:
        premise += f" {drug.capitalize()} was started on admission."
        has_drug = True
    else:
        has_drug = False
    older = age >= 65
    if label == "entailment":
        options = [
            f"The patient has {category}.",
            f"The patient has {symptom}.",
            f"The patient is {'an elderly' if older else 'an adult'} {sex}.",
        ]
        if has_drug:
            options.append(f"The patient received {drug}.")
    elif label == "contradiction":
        verb = "are" if organ.endswith("s") else "is"
        options = [f"The patient has no {symptom}.", f"The patient's {organ} {verb} normal.", "The patient is a child."]
        if has_drug:
            options.append("The patient received no medication.")
    else:
        options = [
            "The patient has a history of smoking.",
            f"The patient's mother also had {diagnosis}.",
            "The patient will be discharged within two days.",
            f"The patient is allergic to {_pick(rng, _DRUGS)}.",
        ]
    return _clean(premise), _clean(_pick(rng, options)), label


# --------------------------------------------------------------------------------------------- sections


def _counts(rows: int) -> dict[str, int]:
    """Row counts scaled from ``rows`` (the default 64 gives 64 VL rows per type, 64/16/16 fine-tuning)."""
    quarter = max(1, rows // 4)
    return {
        "vl_caption": rows,
        "vl_qa": rows,
        "vl_visual_grounding": rows,
        "text": max(1, rows // 2),
        "image": quarter,
        "detection": quarter,
        "train": rows,
        "val": quarter,
        "test": quarter,
    }


def _vision_language(
    seed: int, counts: dict[str, int], size: int, dicoms: list[DicomSource]
) -> tuple[list[tuple[str, ...]], list[str], dict[str, list[str]]]:
    rng = _rng(seed, "vision_language")
    rows: list[tuple[str, ...]] = []
    captions: list[str] = []
    answers_by_type: dict[str, set[str]] = {}

    for i in range(counts["vl_caption"]):
        if dicoms and rng.random() < 0.25:
            src = _pick(rng, dicoms)
            img, caption, objs, name = (
                dicom_view(rng, src, size),
                _pick(rng, src.captions),
                list(src.objects),
                f"dicom_{src.modality}",
            )
        else:
            scene = make_scene(rng, size, 1 if rng.random() < 0.5 else 2)
            refs = scene_captions(scene)
            # Mostly the canonical template, so the caption is (nearly) a function of the image.
            caption = refs[0] if rng.random() < 0.7 else _pick(rng, refs[1:])
            img, objs, name = scene.image, sorted({o.shape for o in scene.objects}), "synthetic_shapes"
        # gt_objects: the object names that appear in the caption (unify_dataset.py get_negative_caption swaps one)
        objs = [o for o in objs if o in caption]
        captions.append(caption)
        rows.append((f"7_{i}", _b64(img), caption, "", "", "&&".join(objs), name, "caption"))

    for i, item in enumerate(_vqa_items(rng, counts["vl_qa"], size, dicoms)):
        refs = item.answers
        if rng.random() < 0.2 and refs[0][0] == 1.0 and len(refs) == 1:
            refs = [(0.9, refs[0][1])]  # some rows with conf < 1 (the conf weights the loss)
        for _, ans in refs:
            answers_by_type.setdefault(_answer_category(item.question, ans), set()).add(ans)
        objs = "&&".join(o for o in item.objects if o in item.question)
        rows.append((f"8_{i}", _b64(item.image), "", item.question, format_refs(refs), objs, item.source, "qa"))

    for i in range(counts["vl_visual_grounding"]):
        scene = make_scene(rng, size, 2 if rng.random() < 0.7 else 1)
        target = _pick(rng, scene.objects)
        options = [f"the {target.color} {target.shape}", f"the {target.shape} {POSITION_PHRASES[target.position]}"]
        if len(scene.objects) == 1:
            options.append("the shape")
        desc = _pick(rng, options)
        x0, y0, x1, y1 = target.box
        objs = target.shape if target.shape in desc else ""
        rows.append(
            (
                f"9_{i}",
                _b64(scene.image),
                desc,
                "",
                f"{x0},{y0},{x1},{y1}",
                objs,
                "synthetic_shapes",
                "visual_grounding",
            )
        )

    order = rng.permutation(len(rows))  # the OFA reader is sequential: pre-shuffle like `shuf`
    type2ans = {k: sorted(v) for k, v in sorted(answers_by_type.items())}
    return [rows[j] for j in order], captions, type2ans


def _answer_category(question: str, answer: str) -> str:
    """Answer type keys for type2ans.json; 'how many' matches the numeral ±1 case of get_negative_answer."""
    if answer in ("yes", "no"):
        return "yes/no"
    if question.startswith("how many"):
        return "how many"
    if answer in SHAPES:
        return "what shape"
    if answer in COLORS:
        return "what color"
    if answer in POSITIONS or answer in POSITION_SOFT_ANSWERS.values():
        return "where"
    if answer in ("ct", "mr"):
        return "what modality"
    return "other"


def _image_rows(seed: int, n: int, dicoms: list[DicomSource]) -> list[tuple[str, ...]]:
    rng = _rng(seed, "image")
    rows = []
    for i in range(n):
        if dicoms and i % 4 == 3:  # every 4th row a real CT/MR slice
            img = dicom_view(rng, _pick(rng, dicoms), IMAGE_TSV_SIZE).convert("RGB")
        else:
            # One large shape around the centre: its colour shows outside the masked 128x128 centre,
            # so the centre's codes can be inferred from the visible border.
            c = IMAGE_TSV_SIZE / 2
            cx, cy = c + rng.uniform(-36, 36), c + rng.uniform(-36, 36)
            spec = (_pick(rng, SHAPES), _pick(rng, tuple(COLORS)), "center", cx, cy, rng.uniform(70, 100))
            img = _render(rng, IMAGE_TSV_SIZE, IMAGE_TSV_SIZE, [spec]).image
        decoded, b64 = _roundtrip(img, "JPEG")
        rows.append((f"1_{i}", b64, " ".join(map(str, image_codes(decoded)))))
    return rows


def _detection_rows(seed: int, n: int, size: int) -> list[tuple[str, ...]]:
    rng = _rng(seed, "detection")
    rows = []
    for i in range(n):
        # Non-square and of varying size: boxes are in each image's own pixel coordinates.
        w, h = int(rng.integers(size, size * 3 // 2 + 1)), int(rng.integers(size, size * 3 // 2 + 1))
        scene = make_detection_scene(rng, w, h, int(rng.integers(1, 4)))
        label = "&&".join(
            f"{o.box[0]},{o.box[1]},{o.box[2]},{o.box[3]},{SHAPES.index(o.shape)},{o.shape}" for o in scene.objects
        )
        rows.append((f"4_{i}", _b64(scene.image), label))
    return rows


def _finetune(seed: int, counts: dict[str, int], size: int, dicoms: list[DicomSource]) -> dict[str, object]:
    splits = ("train", "val", "test")
    out: dict[str, object] = {}

    # VQA (question ids are unique over all splits so one answer-type file covers them).
    rng = _rng(seed, "vqa")
    qid = 0
    answer_types: dict[str, str] = {}
    trainval_answers: set[str] = set()
    for split in splits:
        rows = []
        for j, item in enumerate(_vqa_items(rng, counts[split], size, dicoms)):
            qid += 1
            answer_types[str(qid)] = item.answer_type
            if split != "test":
                trainval_answers.add(item.answer)
            # objects column: the organ for DICOM rows (VQA-RAD style); empty for synthetic rows (PathVQA style),
            # since listing the drawn shapes would leak the answers of "is there a ...?" questions.
            objects = "&&".join(item.objects) if item.source.startswith("dicom") else ""
            rows.append((str(qid), f"vqa_{split}_{j}", item.question, f"1|!+{item.answer}", objects, _b64(item.image)))
        out[f"vqa_{split}"] = rows
    out["vqa_answer_types"] = answer_types
    out["vqa_ans2label"] = {a: k for k, a in enumerate(sorted(trainval_answers))}

    # Captioning: train rows carry one caption, eval rows all references joined by && (split in
    # BiomedGPT data/mm_data/caption_dataset.py).
    rng = _rng(seed, "caption")
    uid = 0
    for split in splits:
        rows = []
        for j in range(counts[split]):
            uid += 1
            if dicoms and rng.random() < 0.25:
                src = _pick(rng, dicoms)
                img, refs = dicom_view(rng, src, size), list(src.captions)
            else:
                scene = make_scene(rng, size, 1 if rng.random() < 0.5 else 2)
                img, refs = scene.image, scene_captions(scene)
            caption = _pick(rng, refs) if split == "train" else "&&".join(refs)
            rows.append((f"200_{uid}", f"cap_{split}_{j}", caption, "", _b64(img)))
        out[f"caption_{split}"] = rows

    rng = _rng(seed, "summarization")
    for split in splits:
        out[f"summarization_{split}"] = [_summarization_pair(rng) for _ in range(counts[split])]

    rng = _rng(seed, "nli")
    names = tuple(NLI_LABELS)
    for split in splits:
        labels = [names[k % 3] for k in range(counts[split])]  # balanced labels
        rng.shuffle(labels)
        rows = []
        for lab in labels:
            s1, s2, _ = _nli_triple(rng, lab)
            rows.append((s1, s2, str(NLI_LABELS[lab]), "clinical"))
        out[f"nli_{split}"] = rows

    rng = _rng(seed, "classification")
    class2label = {s: k for k, s in enumerate(SHAPES)}
    for split in splits:
        labels = [SHAPES[k % len(SHAPES)] for k in range(counts[split])]
        rng.shuffle(labels)
        rows = []
        for lab in labels:
            scene = make_scene(rng, size, 1, shapes=[lab])
            rows.append((_b64(scene.image), str(class2label[lab]), lab))
        out[f"classification_{split}"] = rows
    out["classification_class2label"] = class2label
    return out


# --------------------------------------------------------------------------------------------- entry point


def write_sample_corpus(
    out_dir: str | Path,
    rows: int = DEFAULT_ROWS,
    seed: int = DEFAULT_SEED,
    image_size: int = DEFAULT_IMAGE_SIZE,
    progress: ProgressFn | None = None,
) -> dict[str, Path]:
    """Write the sample corpus under ``out_dir`` and return ``{name: path}`` of every file written.

    ``rows`` scales all counts (default 64: 64 VL rows of each type, 32 text, 16 image, 16 detection rows,
    64/16/16 fine-tuning rows per task). ``image_size`` is the side of VL/fine-tuning images; pure-image rows
    are always 256x256. ``progress(name, n_rows)`` is called after each file.
    """
    if rows < 1:
        raise ValueError("rows must be >= 1")
    if not 16 <= image_size <= 1024:
        raise ValueError("image_size must be in [16, 1024]")
    out = Path(out_dir)
    (out / "negative_sample").mkdir(parents=True, exist_ok=True)
    counts = _counts(rows)
    dicoms = available_dicom_sources()
    paths: dict[str, Path] = {}
    n_rows: dict[str, int] = {}

    def emit(name: str, path: Path, n: int) -> None:
        paths[name], n_rows[name] = path, n
        if progress is not None:
            progress(name, n)

    vl_rows, captions, type2ans = _vision_language(seed, counts, image_size, dicoms)
    _write_tsv(out / "vision_language.tsv", vl_rows, 8)
    emit("vision_language", out / "vision_language.tsv", len(vl_rows))

    text_rows = _text_rows(_rng(seed, "text"), counts["text"])
    _write_tsv(out / "text.tsv", text_rows, 2)
    emit("text", out / "text.tsv", len(text_rows))

    img_rows = _image_rows(seed, counts["image"], dicoms)
    _write_tsv(out / "image.tsv", img_rows, 3)
    emit("image", out / "image.tsv", len(img_rows))

    det_rows = _detection_rows(seed, counts["detection"], image_size)
    _write_tsv(out / "detection.tsv", det_rows, 3)
    emit("detection", out / "detection.tsv", len(det_rows))

    # Negative-sample side files (read by BiomedGPT tasks/pretrain_tasks/unify_task.py): 'other' is the fallback list
    # of unify_dataset.py get_negative_answer and holds every answer.
    type2ans["other"] = sorted({a for v in type2ans.values() for a in v})
    neg = out / "negative_sample"
    _write_json(neg / "type2ans.json", type2ans)
    emit("type2ans", neg / "type2ans.json", len(type2ans))
    objects = list(SHAPES) + list(ORGANS)
    _write_lines(neg / "object.txt", objects)
    emit("object", neg / "object.txt", len(objects))
    uniq_captions = list(dict.fromkeys(captions))
    _write_lines(neg / "all_captions.txt", uniq_captions)
    emit("all_captions", neg / "all_captions.txt", len(uniq_captions))

    ncols = {"vqa": 6, "caption": 5, "summarization": 2, "nli": 4, "classification": 3}
    for name, data in _finetune(seed, counts, image_size, dicoms).items():
        if isinstance(data, list):
            path = out / f"{name}.tsv"
            _write_tsv(path, data, ncols[name.rsplit("_", 1)[0]])
        else:
            path = out / f"{name}.json"
            _write_json(path, data)
        emit(name, path, len(data))

    manifest = {
        "seed": seed,
        "rows": rows,
        "image_size": image_size,
        "dicom_sources": [d.filename for d in dicoms],
        "files": {name: {"path": str(p.relative_to(out)), "rows": n_rows[name]} for name, p in paths.items()},
    }
    _write_json(out / "manifest.json", manifest)
    paths["manifest"] = out / "manifest.json"
    return paths
