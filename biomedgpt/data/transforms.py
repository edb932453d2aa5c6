"""Image transforms of BiomedGPT/OFA pretraining and fine-tuning, with boxes carried along.

The originals: BiomedGPT utils/transforms.py, composed in UnifyDataset.__init__ (data/pretrain_data/unify_dataset.py)
for pretraining and in data/mm_data/vqa_gen_dataset.py / caption_dataset.py for fine-tuning.

Every transform is a callable ``(image, target, rng) -> (image, target)``:

- ``image`` is a PIL image, RGB or grey (mode L, one channel as decoded: every op gives a grey image the grey levels
  its RGB copy would get); the last step turns it into a tensor: :class:`ToUint8Tensor` ``[C, H, W]`` uint8 for the
  training pipelines (normalised later, on the training device), :class:`ToTensorNormalize` ``[3, H, W]`` float;
- ``target`` is ``None`` or a dict that may hold ``"boxes"`` (float ``np.ndarray`` ``[N, 4]``, ``x0, y0, x1, y1`` in
  pixels of the current image) and ``"labels"`` (one entry per box); other keys pass through untouched. Transforms
  never modify the dict they are given, they return a new one;
- ``rng`` is a ``numpy.random.Generator``. All randomness is drawn from it, never from ``random``, ``np.random`` or
  torch global state, so an example rebuilt from the same generator (see :func:`rng_for`) is bit-identical whatever
  the worker, process, shard layout or resume point. Transforms without randomness accept ``rng=None``; random ones
  raise instead of silently falling back to global state.

Boxes stay in pixels through the whole pipeline (also after :class:`ToTensorNormalize`); :func:`box_to_bins` turns
them into location bins, dividing by ``max_image_size`` (512), not by the image size, as the original does
(``Normalize`` of BiomedGPT utils/transforms.py).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from biomedgpt.data.images import DEFAULT_MEAN, DEFAULT_STD, normalize_image, to_uint8_tensor

__all__ = [
    "CenterCrop",
    "Compose",
    "LargeScaleJitter",
    "ObjectCenterCrop",
    "RANDOM_AUGMENT_OPS",
    "RandomAugment",
    "RandomHorizontalFlip",
    "RandomResize",
    "Resize",
    "ResizeCrop",
    "ToTensorNormalize",
    "ToUint8Tensor",
    "Transform",
    "bins_to_box",
    "box_to_bins",
    "detection_transform",
    "finetune_transform",
    "image_center_block",
    "mask_image_center",
    "pretrain_vl_transform",
    "pure_image_transform",
    "rng_for",
    "visual_grounding_transform",
]

Target = dict[str, Any] | None
Transform = Callable[[Any, Target, "np.random.Generator | None"], tuple[Any, Target]]

# Largest shorter side RandomResize draws for image-text pairs (OFA: np.arange(patch_image_size, 481)).
VL_MAX_SHORTER_SIDE = 480
# Cap on either side after RandomResize (OFA: RandomResize(scales, max_size=672)).
VL_MAX_SIDE = 672
# Half-width of PIL's bicubic filter in source pixels at scale 1 (PIL's bicubic_filter support).
_BICUBIC_SUPPORT = 2.0


# ----------------------------------------------------------------------------------------------------------------------
# Deterministic generators


def rng_for(seed: int, epoch: int, sample_id: int | str, purpose: str = "") -> np.random.Generator:
    """A generator that depends only on (seed, epoch, sample id, purpose).

    The key is hashed with SHA-256 (Python's ``hash()`` is salted per process, so it would differ between workers and
    runs). ``sample_id`` is keyed by its ``str()``, so the integer ``5`` and the TSV field ``"5"`` give the same stream.
    ``purpose`` separates independent streams of one example (e.g. ``"image"`` vs ``"text_mask"``), so adding draws to
    one of them does not shift the others.
    """
    key = "\x1f".join(("biomedgpt", str(int(seed)), str(int(epoch)), str(sample_id), purpose))
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    # SeedSequence takes the full 256-bit digest as entropy (eight 32-bit words).
    words = np.frombuffer(digest, dtype="<u4").tolist()
    return np.random.default_rng(np.random.SeedSequence(words))


def _require_rng(rng: np.random.Generator | None, name: str) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"{name} is random and needs an explicit numpy.random.Generator (got {type(rng).__name__})")
    return rng


# ----------------------------------------------------------------------------------------------------------------------
# Target (boxes / labels) helpers


def _copy_target(target: Target) -> Target:
    if target is None:
        return None
    out = dict(target)
    if "boxes" in out:
        out["boxes"] = np.asarray(out["boxes"], dtype=np.float64).reshape(-1, 4).copy()
    return out


def _filter_target(target: dict[str, Any], keep: np.ndarray) -> None:
    """Drop boxes (and their labels) where ``keep`` is False, in place on a target this module already copied."""
    target["boxes"] = target["boxes"][keep]
    if "labels" in target:
        labels = target["labels"]
        if isinstance(labels, np.ndarray):
            target["labels"] = labels[keep]
        else:
            target["labels"] = [label for label, kept in zip(labels, keep.tolist()) if kept]


def _scale_target(target: Target, sx: float, sy: float) -> Target:
    target = _copy_target(target)
    if target is not None and "boxes" in target:
        target["boxes"] = target["boxes"] * np.array([sx, sy, sx, sy])
    return target


def _crop(
    image: Image.Image, target: Target, left: int, top: int, width: int, height: int, drop_empty: bool = True
) -> tuple[Image.Image, Target]:
    """Crop the pixel window [left, left+width) x [top, top+height); parts outside the image come out black.

    Boxes are shifted and clipped to the window; with ``drop_empty`` boxes left without area go, labels with them.
    """
    # PIL fills the part of a crop box outside the image with zeros, which doubles as bottom/right padding.
    cropped = image.crop((left, top, left + width, top + height))
    return cropped, _crop_target(target, left, top, width, height, drop_empty)


def _crop_target(target: Target, left: int, top: int, width: int, height: int, drop_empty: bool = True) -> Target:
    """The box part of :func:`_crop`: shift to the window, clip, optionally drop boxes left without area."""
    target = _copy_target(target)
    if target is not None and "boxes" in target:
        boxes = target["boxes"] - np.array([left, top, left, top], dtype=np.float64)
        boxes = np.clip(boxes, 0.0, np.array([width, height, width, height], dtype=np.float64))
        target["boxes"] = boxes
        if drop_empty:
            _filter_target(target, (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))
    return target


def _resize_window(
    image: Image.Image, out_w: int, out_h: int, left: int, top: int, width: int, height: int
) -> Image.Image:
    """``image.resize((out_w, out_h), BICUBIC).crop(window)``, resampling only the window.

    Output pixel centres map to the same source coordinates as in the full resize (PIL's ``resize(box=...)``), and
    the two separable passes run in the same order as PIL's full resize, horizontal then vertical (a single
    ``resize(box=...)`` call may take the vertical pass first, whose 8-bit intermediate rounds differently: up to
    ~20 levels on noise when upscaling). So the pixels equal the resize-then-crop ones up to a level or two, while
    only the window is computed: a 256 px crop of a 480 px resize is ~3.5x fewer output pixels, and the source rows
    outside the window's filter support are never read. A window reaching outside the resized image needs PIL's zero
    padding, so that case resizes fully and crops.
    """
    src_w, src_h = image.size
    if (out_w, out_h) == (src_w, src_h):
        return image.crop((left, top, left + width, top + height))
    if left < 0 or top < 0 or left + width > out_w or top + height > out_h:
        return image.resize((out_w, out_h), Image.Resampling.BICUBIC).crop((left, top, left + width, top + height))
    sx, sy = src_w / out_w, src_h / out_h
    x0, x1 = left * sx, min((left + width) * sx, src_w)
    y0, y1 = top * sy, min((top + height) * sy, src_h)
    # Source rows the vertical pass reads: the window plus the bicubic support (2 px, times the scale when
    # shrinking), with a pixel to spare; rows beyond the image are not there in the full resize either.
    margin = _BICUBIC_SUPPORT * max(sy, 1.0) + 1.0
    first, last = max(int(math.floor(y0 - margin)), 0), min(int(math.ceil(y1 + margin)), src_h)
    rows = image.crop((0, first, src_w, last)) if (first, last) != (0, src_h) else image
    if (width, x0, x1) != (src_w, 0, src_w):  # horizontal pass only: height and vertical box are the strip's own
        rows = rows.resize((width, last - first), Image.Resampling.BICUBIC, box=(x0, 0, x1, last - first))
    # Vertical pass only: width and horizontal box are the strip's own.
    return rows.resize((width, height), Image.Resampling.BICUBIC, box=(0, y0 - first, width, y1 - first))


def _as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


# ----------------------------------------------------------------------------------------------------------------------
# Geometric transforms


class Compose:
    """Apply transforms in order, all drawing from the same generator (so their draws are one fixed sequence)."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Any, target: Target = None, rng: np.random.Generator | None = None) -> tuple[Any, Target]:
        for transform in self.transforms:
            image, target = transform(image, target, rng)
        return image, target

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class Resize:
    """Resize to a fixed (height, width) (an int means square), bicubic, boxes scaled; no randomness.

    Unlike torchvision's ``Resize(int)`` an int is *not* the shorter side: fine-tuning resizes to ``(S, S)``
    (BiomedGPT data/mm_data/vqa_gen_dataset.py, caption_dataset.py).
    """

    def __init__(self, size: int | tuple[int, int]) -> None:
        self.height, self.width = _as_hw(size)

    def __call__(
        self, image: Image.Image, target: Target = None, rng: np.random.Generator | None = None
    ) -> tuple[Image.Image, Target]:
        width, height = image.size
        resized = image.resize((self.width, self.height), Image.Resampling.BICUBIC)
        return resized, _scale_target(target, self.width / width, self.height / height)

    def __repr__(self) -> str:
        return f"Resize(({self.height}, {self.width}))"


class RandomResize:
    """Shorter side drawn uniformly from ``sizes``, longer side keeping the aspect ratio, each side capped at max_size.

    As in OFA, the cap clamps each side on its own (it does not shrink the shorter side to fit), so a very elongated
    image is squeezed along its long axis but its shorter side stays >= the crop size that follows. Bicubic; boxes are
    scaled by the actual per-axis ratios, so they stay exact even when the aspect ratio changes.
    """

    def __init__(self, sizes: Sequence[int], max_size: int | None = None) -> None:
        if len(sizes) == 0:
            raise ValueError("RandomResize needs at least one size")
        self.sizes = [int(s) for s in sizes]
        self.max_size = max_size

    def output_size(self, width: int, height: int, size: int) -> tuple[int, int]:
        """(width, height) for shorter side ``size`` (truncated like OFA's int()), then capped per side."""
        if width < height:
            out_w, out_h = size, int(size * height / width)
        else:
            out_w, out_h = int(size * width / height), size
        if self.max_size is not None:
            out_w, out_h = min(out_w, self.max_size), min(out_h, self.max_size)
        return out_w, out_h

    def draw(self, width: int, height: int, rng: np.random.Generator | None) -> tuple[int, int]:
        """Draw the shorter side (one ``rng.integers`` call) and return the (width, height) to resize to."""
        rng = _require_rng(rng, "RandomResize")
        return self.output_size(width, height, self.sizes[int(rng.integers(len(self.sizes)))])

    def __call__(
        self, image: Image.Image, target: Target = None, rng: np.random.Generator | None = None
    ) -> tuple[Image.Image, Target]:
        width, height = image.size
        out_w, out_h = self.draw(width, height, rng)
        resized = image.resize((out_w, out_h), Image.Resampling.BICUBIC)
        return resized, _scale_target(target, out_w / width, out_h / height)

    def __repr__(self) -> str:
        return f"RandomResize({self.sizes[0]}..{self.sizes[-1]}, max_size={self.max_size})"


class CenterCrop:
    """Centre crop to ``size`` (int = square); smaller images are zero-padded; boxes clipped, emptied ones dropped."""

    drop_empty = True

    def __init__(self, size: int | tuple[int, int]) -> None:
        self.height, self.width = _as_hw(size)

    def window(self, width: int, height: int, target: Target = None) -> tuple[int, int]:
        """(left, top) of the crop in an image of ``width`` x ``height``."""
        # Same rounding as torchvision/OFA: int(round(...)) of the (possibly negative, i.e. padding) margin.
        return int(round((width - self.width) / 2.0)), int(round((height - self.height) / 2.0))

    def __call__(
        self, image: Image.Image, target: Target = None, rng: np.random.Generator | None = None
    ) -> tuple[Image.Image, Target]:
        left, top = self.window(*image.size)
        return _crop(image, target, left, top, self.width, self.height)

    def __repr__(self) -> str:
        return f"CenterCrop(({self.height}, {self.width}))"


class ObjectCenterCrop:
    """Crop of ``size`` centred on the first box, slid back inside the image when the centre is near a border.

    The first box is shifted/clipped to the crop but never dropped (visual grounding needs exactly one region, OFA
    crops with ``delete=False``). OFA passes the float offset to PIL, which rounds it for the pixels while the box moves
    by the unrounded amount; here the offset is rounded once and used for both, so box and pixels agree exactly.
    """

    drop_empty = False

    def __init__(self, size: int | tuple[int, int]) -> None:
        self.height, self.width = _as_hw(size)

    def window(self, width: int, height: int, target: Target = None) -> tuple[int, int]:
        """(left, top) of the crop around the first box of ``target`` in an image of ``width`` x ``height``."""
        if target is None or len(np.asarray(target.get("boxes", []))) == 0:
            raise ValueError("ObjectCenterCrop needs a target with at least one box")
        x0, y0, x1, y1 = np.asarray(target["boxes"], dtype=np.float64).reshape(-1, 4)[0]
        cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
        # Centre the window on the box, push it left/up if it runs past the right/bottom edge, then clamp at 0.
        left = max(cx - self.width / 2.0 + min(width - cx - self.width / 2.0, 0.0), 0.0)
        top = max(cy - self.height / 2.0 + min(height - cy - self.height / 2.0, 0.0), 0.0)
        return int(round(left)), int(round(top))

    def __call__(
        self, image: Image.Image, target: Target = None, rng: np.random.Generator | None = None
    ) -> tuple[Image.Image, Target]:
        left, top = self.window(image.size[0], image.size[1], target)
        return _crop(image, target, left, top, self.width, self.height, drop_empty=False)

    def __repr__(self) -> str:
        return f"ObjectCenterCrop(({self.height}, {self.width}))"


class ResizeCrop:
    """:class:`RandomResize` then :class:`CenterCrop` or :class:`ObjectCenterCrop`, fused into one resample.

    Same draws from ``rng`` (one shorter side), same output size, same boxes as ``Compose([resize, crop])``; the
    pixels equal the two-step result up to resampling rounding, but only the crop window is resampled (see
    :func:`_resize_window`) instead of the whole image at up to 480 x 672 px.
    """

    def __init__(self, resize: RandomResize, crop: CenterCrop | ObjectCenterCrop) -> None:
        self.resize = resize
        self.crop = crop

    def __call__(
        self, image: Image.Image, target: Target = None, rng: np.random.Generator | None = None
    ) -> tuple[Image.Image, Target]:
        width, height = image.size
        out_w, out_h = self.resize.draw(width, height, rng)
        target = _scale_target(target, out_w / width, out_h / height)
        left, top = self.crop.window(out_w, out_h, target)
        crop_w, crop_h = self.crop.width, self.crop.height
        cropped = _resize_window(image, out_w, out_h, left, top, crop_w, crop_h)
        return cropped, _crop_target(target, left, top, crop_w, crop_h, self.crop.drop_empty)

    def __repr__(self) -> str:
        return f"ResizeCrop({self.resize!r}, {self.crop!r})"


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``; boxes mirrored (x0' = W - x1, x1' = W - x0)."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(
        self, image: Image.Image, target: Target = None, rng: np.random.Generator | None = None
    ) -> tuple[Image.Image, Target]:
        rng = _require_rng(rng, "RandomHorizontalFlip")
        if rng.random() >= self.p:
            return image, target
        width = image.size[0]
        flipped = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        target = _copy_target(target)
        if target is not None and "boxes" in target:
            boxes = target["boxes"]
            target["boxes"] = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)
        return flipped, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class LargeScaleJitter:
    """Large-scale jitter as OFA's detection pipeline uses it: output is always ``output_size`` x ``output_size``.

    A scale s ~ U[aug_scale_min, aug_scale_max) sets the target ``round(s * output_size)`` for the *shorter* side (OFA
    takes the max of the two per-axis ratios), so with s >= 1 the resized image covers the output and a random window
    is cut from it (offset = floor(excess * U[0,1)) per axis). Where the resized image is smaller than the output
    (only possible with aug_scale_min < 1, which OFA never runs) it is zero-padded at the bottom/right.
    Boxes are scaled, shifted, clipped; boxes left without area are dropped with their labels.
    """

    def __init__(self, output_size: int = 256, aug_scale_min: float = 1.0, aug_scale_max: float = 1.5) -> None:
        if aug_scale_max < aug_scale_min:
            raise ValueError("aug_scale_max must be >= aug_scale_min")
        self.output_size = int(output_size)
        self.aug_scale_min = aug_scale_min
        self.aug_scale_max = aug_scale_max

    def __call__(
        self, image: Image.Image, target: Target = None, rng: np.random.Generator | None = None
    ) -> tuple[Image.Image, Target]:
        rng = _require_rng(rng, "LargeScaleJitter")
        width, height = image.size
        scale = rng.uniform(self.aug_scale_min, self.aug_scale_max)
        shorter_target = round(scale * self.output_size)
        ratio = max(shorter_target / height, shorter_target / width)
        new_w, new_h = max(1, round(width * ratio)), max(1, round(height * ratio))
        target = _scale_target(target, new_w / width, new_h / height)
        # Offsets drawn in (y, x) order, like OFA's torch.rand(2) over (h, w).
        u_y, u_x = rng.random(2)
        top = int(math.floor(max(new_h - self.output_size, 0) * u_y))
        left = int(math.floor(max(new_w - self.output_size, 0) * u_x))
        # Resize and crop in one resample of the window (a padded window falls back to resize-then-crop).
        size = self.output_size
        cropped = _resize_window(image, new_w, new_h, left, top, size, size)
        return cropped, _crop_target(target, left, top, size, size)

    def __repr__(self) -> str:
        return f"LargeScaleJitter({self.output_size}, scale=[{self.aug_scale_min}, {self.aug_scale_max}))"


# ----------------------------------------------------------------------------------------------------------------------
# RandomAugment (OFA utils/vision_helper.py, RandAugment-style)

RANDOM_AUGMENT_OPS = (
    "Identity",
    "AutoContrast",
    "Equalize",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)
_GEOMETRIC_OPS = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}
_MAX_LEVEL = 10.0
# OFA's translate_const is 10 *pixels* at level 10 (so magnitude 7 shifts by 7 px, a mild jitter, not 70% of the image).
_TRANSLATE_CONST = 10.0
_FILL = (128, 128, 128)  # OFA's replace_value for areas uncovered by the affine ops
_OWN_MODES = ("RGB", "L")  # modes the ops work on as they are (anything else becomes RGB first)


def _apply_affine(
    image: Image.Image, target: Target, forward: np.ndarray, fill: int | tuple[int, int, int]
) -> tuple[Image.Image, Target]:
    """Warp by the forward 2x3 matrix (continuous pixel coordinates, pixel i spans [i, i+1]) and move boxes with it.

    PIL's affine transform maps output to input coordinates in the same continuous convention, so passing the inverse
    matrix makes the image content move exactly like box corners under ``forward``. A box becomes the axis-aligned
    hull of its four transformed corners (tight for shear/translate, the enclosing box for rotation), clipped to the
    image; boxes pushed fully outside are dropped with their labels.
    """
    full = np.vstack([forward, [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(full)[:2].reshape(-1)
    warped = image.transform(
        image.size,
        Image.Transform.AFFINE,
        data=tuple(inverse.tolist()),
        resample=Image.Resampling.BILINEAR,
        fillcolor=fill,
    )
    target = _copy_target(target)
    if target is not None and "boxes" in target and len(target["boxes"]):
        boxes = target["boxes"]
        xs = boxes[:, [0, 2, 2, 0]]
        ys = boxes[:, [1, 1, 3, 3]]
        new_x = forward[0, 0] * xs + forward[0, 1] * ys + forward[0, 2]
        new_y = forward[1, 0] * xs + forward[1, 1] * ys + forward[1, 2]
        width, height = image.size
        moved = np.stack([new_x.min(1), new_y.min(1), new_x.max(1), new_y.max(1)], axis=1)
        moved = np.clip(moved, 0.0, np.array([width, height, width, height], dtype=np.float64))
        target["boxes"] = moved
        _filter_target(target, (moved[:, 2] > moved[:, 0]) & (moved[:, 3] > moved[:, 1]))
    return warped, target


class RandomAugment:
    """OFA's RandomAugment(N, M): ``n`` ops drawn with replacement, each applied with probability 0.5.

    Levels follow OFA (MAX_LEVEL 10): Brightness/Sharpness factor ``M/10 * 1.8 + 0.1`` (1.36 at M=7); ShearX/Y
    ``0.3 * M/10``; TranslateX/Y ``10 px * M/10``; Rotate ``30 deg * M/10``; the geometric ones get a random sign and
    fill uncovered pixels with grey 128. Ops run on PIL (OFA's cv2 versions reproduce PIL's results). Unlike OFA, boxes
    in the target follow the geometric ops, so the transform is also safe in box-carrying pipelines.
    """

    def __init__(self, n: int = 2, magnitude: float = 7, ops: Sequence[str] = RANDOM_AUGMENT_OPS) -> None:
        unknown = [op for op in ops if op not in RANDOM_AUGMENT_OPS]
        if unknown:
            raise ValueError(f"unknown RandomAugment ops {unknown}; known: {list(RANDOM_AUGMENT_OPS)}")
        if not ops:
            raise ValueError("RandomAugment needs at least one op")
        self.n = n
        self.magnitude = magnitude
        self.ops = list(ops)

    def _signed(self, value: float, rng: np.random.Generator) -> float:
        return -value if rng.random() < 0.5 else value

    def apply_op(
        self, name: str, image: Image.Image, target: Target, rng: np.random.Generator
    ) -> tuple[Image.Image, Target]:
        """Apply one op at this transform's magnitude (geometric ops draw their sign from ``rng``)."""
        level = self.magnitude / _MAX_LEVEL
        if name == "Identity":
            return image, target
        if name == "AutoContrast":
            return ImageOps.autocontrast(image), target
        if name == "Equalize":
            return ImageOps.equalize(image), target
        if name == "Brightness":
            return ImageEnhance.Brightness(image).enhance(level * 1.8 + 0.1), target
        if name == "Sharpness":
            return ImageEnhance.Sharpness(image).enhance(level * 1.8 + 0.1), target
        if name == "ShearX":
            shear = self._signed(level * 0.3, rng)
            forward = np.array([[1.0, shear, 0.0], [0.0, 1.0, 0.0]])
        elif name == "ShearY":
            shear = self._signed(level * 0.3, rng)
            forward = np.array([[1.0, 0.0, 0.0], [shear, 1.0, 0.0]])
        elif name == "TranslateX":
            forward = np.array([[1.0, 0.0, self._signed(level * _TRANSLATE_CONST, rng)], [0.0, 1.0, 0.0]])
        elif name == "TranslateY":
            forward = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, self._signed(level * _TRANSLATE_CONST, rng)]])
        elif name == "Rotate":
            # Counter-clockwise on screen for positive angles about the image centre (cv2.getRotationMatrix2D).
            angle = math.radians(self._signed(level * 30.0, rng))
            cos, sin = math.cos(angle), math.sin(angle)
            cx, cy = image.size[0] / 2.0, image.size[1] / 2.0
            forward = np.array(
                [[cos, sin, (1 - cos) * cx - sin * cy], [-sin, cos, sin * cx + (1 - cos) * cy]], dtype=np.float64
            )
        else:  # pragma: no cover - guarded in __init__
            raise ValueError(name)
        if image.mode not in _OWN_MODES:
            image = image.convert("RGB")
        return _apply_affine(image, target, forward, _FILL[0] if image.mode == "L" else _FILL)

    def __call__(
        self, image: Image.Image, target: Target = None, rng: np.random.Generator | None = None
    ) -> tuple[Image.Image, Target]:
        rng = _require_rng(rng, "RandomAugment")
        if image.mode not in _OWN_MODES:  # RGB and L images are never modified in place below: no defensive copy
            image = image.convert("RGB")
        chosen = rng.integers(len(self.ops), size=self.n)
        for index in chosen.tolist():
            # OFA skips an op when random() > 0.5; the coin is drawn for every chosen op so the stream length is fixed.
            if rng.random() > 0.5:
                continue
            image, target = self.apply_op(self.ops[index], image, target, rng)
        return image, target

    def __repr__(self) -> str:
        return f"RandomAugment(n={self.n}, magnitude={self.magnitude}, ops={self.ops})"


# ----------------------------------------------------------------------------------------------------------------------
# Tensor conversion, box quantisation, image infilling mask


class ToTensorNormalize:
    """PIL image -> ``[3, H, W]`` float32 tensor normalised with mean/std (default 0.5/0.5, i.e. [-1, 1]).

    0.5/0.5 is what the BiomedGPT datasets use (e.g. data/pretrain_data/unify_dataset.py, vqa_gen_dataset.py).

    Boxes are left in pixels; quantise them with :func:`box_to_bins`.
    """

    def __init__(
        self, mean: tuple[float, float, float] = DEFAULT_MEAN, std: tuple[float, float, float] = DEFAULT_STD
    ) -> None:
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(
        self, image: Image.Image, target: Target = None, rng: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, Target]:
        # images.normalize_image owns the arithmetic (shared with images.image_to_tensor).
        return normalize_image(image, self.mean, self.std), _copy_target(target)

    def __repr__(self) -> str:
        return f"ToTensorNormalize(mean={self.mean}, std={self.std})"


class ToUint8Tensor:
    """PIL image -> ``[C, H, W]`` uint8 tensor (C = 1 for grey, 3 for RGB), what DataLoader workers return.

    Normalisation and the float/bf16 conversion happen on the training device
    (:func:`biomedgpt.data.examples.images_on_device`, bit-identical to :class:`ToTensorNormalize`); grey stays one
    channel until the batch is collated. Boxes are left in pixels.
    """

    def __call__(
        self, image: Image.Image, target: Target = None, rng: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, Target]:
        return to_uint8_tensor(image), _copy_target(target)

    def __repr__(self) -> str:
        return "ToUint8Tensor()"


def box_to_bins(boxes: np.ndarray | Sequence[float], max_image_size: int = 512, num_bins: int = 1000) -> np.ndarray:
    """Pixel boxes -> integer location-bin indices (0..num_bins-1), same shape as ``boxes``.

    ``bin = round(coord / max_image_size * (num_bins - 1))`` (round half to even, like torch's ``.round()``), clipped.
    The divisor is ``max_image_size`` and *not* the image size (BiomedGPT utils/transforms.py ``Normalize``), so a
    256-px detection crop only reaches bin ~500. Returns bin indices; add the tokenizer's ``<bin_0>`` id to get token
    ids.
    """
    coords = np.asarray(boxes, dtype=np.float64)
    bins = np.rint(coords / max_image_size * (num_bins - 1))
    return np.clip(bins, 0, num_bins - 1).astype(np.int64)


def bins_to_box(bins: np.ndarray | Sequence[int], max_image_size: int = 512, num_bins: int = 1000) -> np.ndarray:
    """Inverse of :func:`box_to_bins` (up to quantisation): bin indices -> float pixel coordinates."""
    return np.asarray(bins, dtype=np.float64) / (num_bins - 1) * max_image_size


def image_center_block(code_image_size: int = 128) -> tuple[int, int]:
    """Rows (and columns) ``[low, high)`` of the block image infilling blanks: ``[int(0.5 c), int(1.5 c))``."""
    return int(0.5 * code_image_size), int(1.5 * code_image_size)


def mask_image_center(tensor: torch.Tensor, code_image_size: int = 128) -> torch.Tensor:
    """Image-infilling input: a copy of ``tensor`` (``[..., H, W]``, already normalised) with the centre block zeroed.

    The block is rows/cols ``[int(0.5 c), int(1.5 c))`` for ``c = code_image_size``, i.e. ``[64:192, 64:192]`` of the
    256x256 image for c = 128 (the mask bounds set in UnifyDataset.__init__, BiomedGPT
    data/pretrain_data/unify_dataset.py). Zero *after* normalisation is mid-grey, as in the original.
    """
    low, high = image_center_block(code_image_size)
    masked = tensor.clone()
    masked[..., low:high, low:high] = 0
    return masked


# ----------------------------------------------------------------------------------------------------------------------
# Ready pipelines (BiomedGPT data/pretrain_data/unify_dataset.py; data/mm_data/vqa_gen_dataset.py, caption_dataset.py)


def _vl_sizes(patch_image_size: int) -> list[int]:
    # Every integer shorter side from the patch size up to 480 (OFA np.arange(patch_image_size, 481)); a patch size
    # above 480 would leave that range empty, so it then resizes to the patch size itself.
    return list(range(patch_image_size, max(patch_image_size, VL_MAX_SHORTER_SIDE) + 1))


def pretrain_vl_transform(patch_image_size: int, max_image_size: int = VL_MAX_SIDE) -> Compose:
    """Caption/VQA pretraining images: RandomResize(patch..480, cap 672) -> CenterCrop -> RandomAugment(2, 7) -> tensor.

    ``max_image_size`` here is the RandomResize side cap (672), not the 512 box normaliser of :func:`box_to_bins`.
    """
    return Compose(
        [
            ResizeCrop(
                RandomResize(_vl_sizes(patch_image_size), max_size=max_image_size), CenterCrop(patch_image_size)
            ),
            RandomAugment(2, 7, RANDOM_AUGMENT_OPS),
            ToUint8Tensor(),
        ]
    )


def visual_grounding_transform(patch_image_size: int, max_image_size: int = VL_MAX_SIDE) -> Compose:
    """Visual grounding: RandomResize(patch..480, cap 672) -> ObjectCenterCrop -> tensor; the region box is kept."""
    return Compose(
        [
            ResizeCrop(
                RandomResize(_vl_sizes(patch_image_size), max_size=max_image_size), ObjectCenterCrop(patch_image_size)
            ),
            ToUint8Tensor(),
        ]
    )


def detection_transform(size: int = 256) -> Compose:
    """Detection: RandomHorizontalFlip(0.5) -> LargeScaleJitter(size, 1.0-1.5) -> tensor; boxes kept (in pixels)."""
    return Compose([RandomHorizontalFlip(0.5), LargeScaleJitter(size, 1.0, 1.5), ToUint8Tensor()])


def pure_image_transform() -> Compose:
    """Image infilling input: uint8 tensor only (the file is already 256x256); the centre block
    (:func:`image_center_block`) is blanked after normalisation, on the device."""
    return Compose([ToUint8Tensor()])


def finetune_transform(size: int) -> Compose:
    """Fine-tuning (VQA, captioning): Resize((S, S), bicubic) -> uint8 tensor, no augmentation.

    As BiomedGPT data/mm_data/vqa_gen_dataset.py and caption_dataset.py.

    The normalisation (0.5/0.5, or ImageNet's for MedMNIST, ``--imagenet-default-mean-and-std``) is the example's
    ``image_mean``/``image_std``, applied on the device.
    """
    return Compose([Resize((size, size)), ToUint8Tensor()])
