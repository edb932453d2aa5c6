"""Pretraining data pipeline throughput: the original's TSV reading, today's Parquet pipeline and prepared shards.

Three pipelines turn the same vision-language rows (plus the auxiliary rows the mixture rule adds, 2 text, 1 image
and 1 detection per 8 rows, as BiomedGPT data/pretrain_data/unify_dataset.py mixes them) into the same examples
with the same builder and collator:

- ``original``: the BiomedGPT/OFA way. The TSV is scanned once to build line byte offsets (text mode,
  ``len(line.encode())``, as ``data/file_dataset.py``), then every row is a seek + readline, tab split,
  ``base64.urlsafe_b64decode`` and ``Image.open(...).convert("RGB")`` (it cannot read DICOM or 16-bit grey
  correctly: those rows get this repository's decoder, the least the original would need), and the transforms run
  unfused: RandomResize of the whole image then CenterCrop/ObjectCenterCrop, LargeScaleJitter resize then crop, RGB
  copies in RandomAugment, torch normalisation on a channels-last view;
- ``today``: Parquet shards converted as they come (row groups of 128 rows, whatever their bytes), read through
  mosaicml-streaming (``PretrainStream``, shuffled), the fused transforms, every image decoded to RGB and normalised
  to float32 in the worker: the pipeline before images were prepared at conversion;
- ``prepared``: the repository's pipeline on shards converted with ``biomedgpt-convert --max-shorter-side 480``
  (detection 384, the largest shorter side LargeScaleJitter draws at 256 px) and row groups of at most 8 MiB
  (``--row-group-bytes``, the default now): images decoded, windowed to 8 bits,
  shrunk and stored (grey as one channel) once, at conversion; workers decode them grey as one channel and hand over
  uint8 tensors, normalised on the training device (its cost on this CPU is printed separately: on a GPU it is not
  CPU work).

The corpus (``--content radiograph``, the default) is the sample corpus with its vision-language and detection
images rewritten radiograph-like at ``--image-size`` px on the longer side (``benchmarks/radiograph_corpus.py``:
smooth structure with noise, 8-bit grey JPEG, grey-as-RGB JPEG, 8- and 16-bit grey PNG, and every 5th row a 16-bit
512 px CT DICOM slice); ``--content scenes`` keeps the sample corpus's synthetic colour scenes.

Each runs in this process (one core) and through a DataLoader with ``--workers`` worker processes
(``biomedgpt.data.pipeline.make_loader`` for the Parquet ones, a plain ``torch.utils.data.DataLoader`` over a shuffled
order for the TSV one). A *sample* is one vision-language row (it yields 2 examples, every 8th row 4 auxiliary ones
more); a timed pass is one epoch over all rows in batches of ``--batch-size``. Two figures per pass: samples per
second of wall clock, from the first batch (the warm-up, worker start-up included, not counted) to the last, and
samples per CPU-second of every process involved, which other load on a shared machine does not distort. Passes are
repeated ``--repeats`` times, interleaved across pipelines, and medians are reported. torch runs one intra-op thread
everywhere (DataLoader workers do so anyway), so the in-process figure is per core. All seeds are fixed; before
timing, the pipelines are checked to build the same examples (same tasks and weights; the same tokens, location bins
of prepared shards within one bin; images equal up to resampling rounding).

Run: ``python benchmarks/data_pipeline.py --image-size 1024 --rows 96`` (a few minutes on 2 cores, corpus included);
``--help`` for options. ``--json`` and ``--plot`` write the figures and a bar chart. Results: ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gc
import io
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # radiograph_corpus, next to this script


import biomedgpt.data.pretrain_tasks as pretrain_tasks
from biomedgpt.data import transforms as T
from biomedgpt.data.convert import convert
from biomedgpt.data.examples import Example, collate, images_on_device
from biomedgpt.data.image_preparation import PRETRAIN_MAX_SHORTER_SIDE, ImagePreparation
from biomedgpt.data.images import decode_image, is_dicom
from biomedgpt.data.pipeline import MixtureConfig, PretrainCollator, PretrainStream, make_loader
from biomedgpt.data.pretrain_tasks import NegativeSamples, PretrainExampleBuilder, PretrainTaskConfig
from biomedgpt.data.schema import parse_answers, parse_box, parse_detection_label
from biomedgpt.tokenizer import BiomedGPTTokenizer

PIPELINES = ("original", "today", "prepared")
LABELS = {
    "original": "original: TSV offsets + base64 + PIL, unfused transforms",
    "today": "today: Parquet as converted, RGB, float32 in the workers",
    "prepared": "ours: prepared shards, grey one channel, uint8 in the workers",
}
# Shorter side each kind is prepared to: the largest its training transform draws (RandomResize's 480 for image-text
# rows, LargeScaleJitter's 1.5 x 256 for detection).
PREPARED_SHORTER_SIDE = {"vision_language": PRETRAIN_MAX_SHORTER_SIDE, "detection": 384}
AUXILIARY = ("text", "image", "detection")
SEED = 0


# ----------------------------------------------------------------------------------------------------------------------
# The original's reading: TSV line offsets (BiomedGPT data/file_dataset.py), base64, PIL


class TsvRows:
    """Random access to the rows of a TSV the way ``FileDataset`` does it: byte offsets of every line, seek, readline.

    The file is opened lazily per process (a file object shared by forked DataLoader workers would share its offset).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offsets: list[int] = []
        offset = 0
        with open(path) as fp:  # text mode and len(line.encode("utf-8")), as the original
            for line in fp:
                self.offsets.append(offset)
                offset += len(line.encode("utf-8"))
        self._fp: Any = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.offsets)

    def fields(self, index: int) -> list[str]:
        if self._pid != os.getpid():
            self._fp, self._pid = open(self.path), os.getpid()  # noqa: SIM115 - lives as long as the reader
        self._fp.seek(self.offsets[index])
        return self._fp.readline().rstrip("\n").split("\t")


def _image_bytes(text: str) -> bytes:
    return base64.urlsafe_b64decode(text)  # as the original; accepts the standard alphabet too


def vision_language_row(f: list[str]) -> dict[str, Any]:
    """TSV fields (uniq_id, image, caption, question, refs, gt_objects, dataset_name, type) -> the builder's row."""
    row = dict(zip(("uniq_id", "caption", "question", "refs", "gt_objects", "dataset_name", "type"), f[:1] + f[2:]))
    row["image"] = _image_bytes(f[1])
    if row["type"] == "qa":
        row["answers"], row["answer_confs"] = parse_answers(row["refs"])
    elif row["type"] == "visual_grounding":
        row["box"] = parse_box(row["refs"].split(","))
    return row


ROW_PARSERS: dict[str, Callable[[list[str]], dict[str, Any]]] = {
    "vision_language": vision_language_row,
    "text": lambda f: {"uniq_id": f[0], "text": f[1]},
    "image": lambda f: {"uniq_id": f[0], "image": _image_bytes(f[1]), "code": [int(c) for c in f[2].split()]},
    "detection": lambda f: {"uniq_id": f[0], "image": _image_bytes(f[1]), "boxes": parse_detection_label(f[2])},
}


class TsvPretrainDataset(torch.utils.data.Dataset):
    """Examples of vision-language row ``index`` plus its auxiliary draws, by the same rule as ``PretrainStream``
    (so the same index gives the same examples), but every row read from the TSVs."""

    def __init__(self, builder: PretrainExampleBuilder, corpus: Path, mixture: MixtureConfig, epoch: int = 0) -> None:
        self.builder, self.mixture, self.epoch = builder, mixture, epoch
        self.vl = TsvRows(corpus / "vision_language.tsv")
        self.auxiliary = {name: TsvRows(corpus / f"{name}.tsv") for name in AUXILIARY}
        self.orders: dict[tuple[int, str], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.vl)

    def _aux_row(self, name: str, position: int) -> dict[str, Any]:
        rows = self.auxiliary[name]
        key = (self.epoch, name)
        if key not in self.orders:  # PretrainStream's RandomAccessRows.permutation
            self.orders[key] = T.rng_for(SEED, self.epoch, name, "auxiliary-order").permutation(len(rows))
        return ROW_PARSERS[name](rows.fields(int(self.orders[key][position % len(rows)])))

    def __getitem__(self, index: int) -> list[Example]:
        row = vision_language_row(self.vl.fields(index))
        examples = self.builder.from_vision_language(row, T.rng_for(SEED, self.epoch, index, "vl"))
        if index % self.mixture.period:
            return examples
        draw = index // self.mixture.period
        for name in AUXILIARY:
            count = getattr(self.mixture, name)
            for k in range(count):
                position = draw * count + k
                rng = T.rng_for(SEED, self.epoch, f"{name}:{position}", name)
                examples.append(getattr(self.builder, f"from_{name}")(self._aux_row(name, position), rng))
        return examples


# ----------------------------------------------------------------------------------------------------------------------
# The transforms as they were before they were optimised (same draws from the generator, same boxes)


class LegacyToTensorNormalize(T.ToTensorNormalize):
    """RGB copy, (square) same-size resize copy, then torch arithmetic on the permuted channels-last view."""

    def __call__(self, image: Image.Image, target: T.Target = None, rng: Any = None) -> tuple[torch.Tensor, T.Target]:
        image = image.convert("RGB")
        if image.size[0] == image.size[1]:
            image = image.resize(image.size, Image.Resampling.BICUBIC)
        array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (array - mean) / std, T._copy_target(target)


class LegacyRandomAugment(T.RandomAugment):
    """Copies the image to RGB on entry and before every geometric op, as before."""

    def __call__(self, image: Image.Image, target: T.Target = None, rng: Any = None) -> tuple[Image.Image, T.Target]:
        return super().__call__(image.convert("RGB"), target, rng)

    def apply_op(self, name: str, image: Image.Image, target: T.Target, rng: Any) -> tuple[Image.Image, T.Target]:
        return super().apply_op(name, image.convert("RGB") if name in T._GEOMETRIC_OPS else image, target, rng)


class LegacyLargeScaleJitter(T.LargeScaleJitter):
    """Resize the whole image, then crop the window (the same draws as the fused version)."""

    def __call__(self, image: Image.Image, target: T.Target = None, rng: Any = None) -> tuple[Image.Image, T.Target]:
        rng = T._require_rng(rng, "LargeScaleJitter")
        width, height = image.size
        scale = rng.uniform(self.aug_scale_min, self.aug_scale_max)
        shorter_target = round(scale * self.output_size)
        ratio = max(shorter_target / height, shorter_target / width)
        new_w, new_h = max(1, round(width * ratio)), max(1, round(height * ratio))
        resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        target = T._scale_target(target, new_w / width, new_h / height)
        u_y, u_x = rng.random(2)
        top = int(math.floor(max(new_h - self.output_size, 0) * u_y))
        left = int(math.floor(max(new_w - self.output_size, 0) * u_x))
        return T._crop(resized, target, left, top, self.output_size, self.output_size)


def use_legacy_transforms(builder: PretrainExampleBuilder) -> PretrainExampleBuilder:
    size, sizes = builder.config.patch_image_size, T._vl_sizes(builder.config.patch_image_size)
    builder.vl_transform = T.Compose(
        [
            T.RandomResize(sizes, max_size=T.VL_MAX_SIDE),
            T.CenterCrop(size),
            LegacyRandomAugment(2, 7, T.RANDOM_AUGMENT_OPS),
            LegacyToTensorNormalize(),
        ]
    )
    builder.grounding_transform = T.Compose(
        [T.RandomResize(sizes, max_size=T.VL_MAX_SIDE), T.ObjectCenterCrop(size), LegacyToTensorNormalize()]
    )
    aux = builder.config.auxiliary_image_size
    builder.detection_transform = T.Compose(
        [T.RandomHorizontalFlip(0.5), LegacyLargeScaleJitter(aux, 1.0, 1.5), LegacyToTensorNormalize()]
    )
    builder.image_transform = T.Compose([LegacyToTensorNormalize()])
    return builder


def legacy_decode_image(data: bytes, source: str = "<bytes>", keep_grey: bool = False, **_: Any) -> Image.Image:
    """``Image.open(BytesIO(...)).convert("RGB")``: the original's decode (a decoded image plus an RGB copy).

    DICOM, which PIL cannot open, and grey deeper than 8 bits, which ``convert("RGB")`` clips to white, get this
    repository's decoder: the least the original would need to read them (to RGB, as it works).
    """
    try:
        if is_dicom(data):
            return decode_image(data, source)
        image = Image.open(io.BytesIO(data))
        if image.mode.startswith("I") or image.mode == "F":
            return decode_image(data, source)
        return image.convert("RGB")
    except Exception as error:
        raise ValueError(f"{source}: not a readable image ({error})") from error


def rgb_decode_image(data: bytes, source: str = "<bytes>", keep_grey: bool = False, **_: Any) -> Image.Image:
    """Today's decoding, before grey images stayed one channel and JPEGs were drafted: every image to RGB."""
    return decode_image(data, source)


DECODERS: dict[str, Callable[..., Image.Image]] = {"original": legacy_decode_image, "today": rgb_decode_image}


@contextlib.contextmanager
def pipeline_decoding(name: str) -> Iterator[None]:
    """Swap the builder module's ``decode_image`` while pipeline ``name`` runs (forked workers inherit it)."""
    saved = pretrain_tasks.decode_image
    pretrain_tasks.decode_image = DECODERS.get(name, saved)
    try:
        yield
    finally:
        pretrain_tasks.decode_image = saved


def use_float_output(builder: PretrainExampleBuilder) -> PretrainExampleBuilder:
    """Today's transforms: the same fused ones, ending in float32 normalisation (in the worker) instead of uint8."""
    for name in ("vl_transform", "grounding_transform", "detection_transform", "image_transform"):
        transform = getattr(builder, name)
        setattr(builder, name, T.Compose([*transform.transforms[:-1], T.ToTensorNormalize()]))
    return builder


def normalised_image(example: Example) -> torch.Tensor | None:
    """An example's image as the model sees it: uint8 ones normalised as on the device, float ones blanked alike."""
    if example.image is None:
        return None
    if example.image.dtype == torch.uint8:
        return images_on_device(collate([example], 1))["patch_images"][0]
    image = example.image.clone()
    if example.image_blank is not None:
        top, bottom, left, right = example.image_blank
        image[:, top:bottom, left:right] = 0
    return image


# ----------------------------------------------------------------------------------------------------------------------
# Set-up, equivalence check, timing


def make_builder(corpus: Path, pipeline: str = "prepared") -> PretrainExampleBuilder:
    builder = PretrainExampleBuilder(
        BiomedGPTTokenizer.default(), NegativeSamples.load(corpus / "negative_sample"), PretrainTaskConfig()
    )
    if pipeline == "original":
        return use_legacy_transforms(builder)
    return use_float_output(builder) if pipeline == "today" else builder


class Bench:
    def __init__(self, root: Path, batch_size: int) -> None:
        self.corpus = root / "corpus"
        self.shards = {"today": root / "converted", "prepared": root / "prepared"}
        self.batch_size = batch_size
        self.mixture = MixtureConfig()
        self.builders = {name: make_builder(self.corpus, name) for name in PIPELINES}
        tokenizer = self.builders["prepared"].tokenizer
        self.collator = PretrainCollator(tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)
        started = time.perf_counter()
        self.tsv = TsvPretrainDataset(self.builders["original"], self.corpus, self.mixture)
        self.tsv_setup_s = time.perf_counter() - started
        self.rows = len(self.tsv)
        self.streams: dict[str, PretrainStream] = {}
        self.stream_setup_s = self.new_streams()

    def new_streams(self) -> float:
        """Fresh ``PretrainStream``s (as the trainer builds them) over both shard sets; returns their set-up time.

        New ones per mode: a StreamingDataset iterated in this process must not then be iterated by forked DataLoader
        workers (its inter-process barrier holds a file lock created here, which filelock refuses to use after fork).
        """
        self.streams = {}
        gc.collect()  # releases the previous datasets' shared memory before the same directories are opened again
        started = time.perf_counter()
        for name, shards in self.shards.items():
            self.streams[name] = PretrainStream(
                self.builders[name],
                str(shards / "vision_language"),
                *(str(shards / aux) for aux in AUXILIARY),
                mixture=self.mixture,
                seed=SEED,
                batch_size=self.batch_size,
                shuffle=True,
                shuffle_seed=SEED,
                num_canonical_nodes=1,
            )
            if self.streams[name].num_samples != self.rows:
                raise RuntimeError(f"{shards}: {self.streams[name].num_samples} rows, the TSV {self.rows}")
        return (time.perf_counter() - started) / len(self.shards)

    def examples(self, name: str, index: int) -> list[Example]:
        with pipeline_decoding(name):
            return self.tsv[index] if name == "original" else self.streams[name].get_item(index)

    def check_same_examples(self, count: int) -> dict[str, Any]:
        """Rows 0..count-1 through all pipelines (epoch 0) must give the same tasks, weights and tokens (location
        bins of prepared shards within one bin: their image was resized once more); images are compared as the model
        sees them, in 8-bit levels: the largest difference and the share off by more than 2 levels, per pipeline."""
        bins = self.builders["prepared"].tokenizer.bin_id(0), self.builders["prepared"].tokenizer.bin_id(999)
        report: dict[str, Any] = {}
        for index in range(count):
            original = self.examples("original", index)
            for name in ("today", "prepared"):
                seen = report.setdefault(name, {"worst_levels": 0.0, "off": 0, "values": 0, "bins_off_by_one": 0})
                other = self.examples(name, index)
                if len(other) != len(original):
                    raise AssertionError(f"{name} row {index}: {len(other)} examples vs {len(original)}")
                for a, b in zip(original, other):
                    _compare(a, b, f"{name} row {index} ({a.task})", bins if name == "prepared" else None, seen)
        for seen in report.values():
            seen["share_off_by_more_than_2_levels"] = seen.pop("off") / max(seen.pop("values"), 1)
        return report

    def device_normalisation_rate(self, repeats: int = 20) -> float:
        """Samples per CPU-second of ``images_on_device`` on this CPU for prepared batches (on a GPU it runs there)."""
        rows = [self.examples("prepared", index) for index in range(min(self.batch_size, self.rows))]
        batch = self.collator(rows)
        started = time.process_time()
        for _ in range(repeats):
            for key in ("v1", "v2"):
                images_on_device(batch[key])
        return repeats * len(rows) / (time.process_time() - started)

    def _loader(self, name: str, workers: int, epoch: int) -> Any:
        if name != "original":
            return make_loader(self.streams[name], self.batch_size, self.collator, num_workers=workers)
        dataset = self.tsv
        dataset.epoch = epoch
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(SEED + epoch)).tolist()
        return torch.utils.data.DataLoader(
            dataset, batch_size=self.batch_size, sampler=order, collate_fn=self.collator, num_workers=workers
        )

    def time_pass(self, name: str, workers: int, epoch: int) -> tuple[float, float]:
        """One epoch: (samples per second of wall clock, samples per CPU-second of every process involved).

        The wall-clock rate runs from the first batch (the warm-up, not counted) to the last. The CPU rate is immune
        to other load on the machine: in-process it covers the same span (``time.process_time``, all threads); with
        workers it adds the workers' whole CPU time (``RUSAGE_CHILDREN`` once they are joined) and so counts every
        batch, start-up included.
        """
        children_before, cpu_before = _children_cpu(), time.process_time()
        loader = self._loader(name, workers, epoch)
        total = counted = 0
        first_at = first_cpu = 0.0
        with pipeline_decoding(name):
            for batch in loader:
                rows = len(batch["v1"]["sample_ids"]) // 2  # every vision-language row gives 2 v1 examples
                total += rows
                if total == rows:
                    first_at, first_cpu = time.perf_counter(), time.process_time()
                    continue
                counted += rows
            elapsed, steady_cpu = time.perf_counter() - first_at, time.process_time() - first_cpu
        del loader  # stops and joins its workers
        gc.collect()
        if workers == 0:
            return counted / elapsed, counted / steady_cpu
        cpu = time.process_time() - cpu_before + _children_cpu() - children_before
        return counted / elapsed, total / cpu


def _compare(a: Example, b: Example, where: str, bins: tuple[int, int] | None, seen: dict[str, Any]) -> None:
    """Raise unless ``a`` and ``b`` have the same task, weight and tokens (location bins within one where ``bins``
    gives their token range); add their image difference, in 8-bit levels, to ``seen``."""
    # Weights compared in float32: Parquet stores answer confidences as float32 (collate does too).
    if (a.task, np.float32(a.weight), a.image is None) != (b.task, np.float32(b.weight), b.image is None):
        raise AssertionError(f"{where}: the pipelines built different examples")
    tokens_a, tokens_b = (np.concatenate([ex.source, ex.target]) for ex in (a, b))
    if tokens_a.shape != tokens_b.shape:
        raise AssertionError(f"{where}: token counts differ")
    differ = tokens_a != tokens_b
    if bins is not None:
        in_bins = (np.minimum(tokens_a, tokens_b) >= bins[0]) & (np.maximum(tokens_a, tokens_b) <= bins[1])
        differ_elsewhere = differ & ~(in_bins & (np.abs(tokens_a - tokens_b) <= 1))
    else:
        differ_elsewhere = differ
    if differ_elsewhere.any():
        raise AssertionError(f"{where}: tokens differ")
    seen["bins_off_by_one"] += int(differ.sum())
    if a.image is not None:
        levels = (normalised_image(a) - normalised_image(b)).abs() * 127.5
        seen["worst_levels"] = max(seen["worst_levels"], float(levels.max()))
        seen["off"] += int((levels > 2.5).sum())
        seen["values"] += levels.numel()


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import PIL

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
    }


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(results["modes"])
    fig, axes = plt.subplots(1, len(modes), figsize=(5.6 * len(modes), 4.2), squeeze=False)
    colors = {"original": "#9e9e9e", "today": "#64b5f6", "prepared": "#1565c0"}
    names = {"original": "original\n(TSV, old transforms)", "today": "today\n(Parquet as converted)",
             "prepared": "ours\n(prepared shards, uint8)"}  # fmt: skip
    aim = 6 if results["image_size"] >= 2048 else 4
    metrics = (("per_core", "wall clock / core", None), ("per_cpu_s", "per CPU-second", "//"))
    width = 0.38
    for ax, mode in zip(axes[0], modes):
        rows = results["modes"][mode]
        top = 0.0
        for k, (key, label, hatch) in enumerate(metrics):
            for i, name in enumerate(PIPELINES):
                value = rows[name][key]
                top = max(top, value)
                x = i + (k - 0.5) * width
                ax.bar(
                    x, value, width, color=colors[name], hatch=hatch, edgecolor="white", label=label if i == 0 else None
                )
                ratio = value / rows["original"][key]
                ax.annotate(f"{value:.0f}\n{ratio:.2f}x", (x, value), ha="center", va="bottom", fontsize=8)
        target = aim * rows["original"]["per_cpu_s"]
        ax.axhline(target, color="#c62828", linestyle=":", linewidth=1, label=f"{aim}x original per CPU-s (target)")
        top = max(top, target)
        ax.set_xticks(range(len(PIPELINES)), [names[n] for n in PIPELINES], fontsize=9)
        ax.set_title(mode, fontsize=10)
        ax.set_ylabel("samples / s")
        ax.set_ylim(0, top * 1.3)
        ax.legend(fontsize=8, loc="upper left")
    m = results["machine"]
    fig.suptitle(
        f"Pretraining data pipeline: median of {results['repeats']} epochs of {results['rows']} rows "
        f"({results['image_size']} px {results['content']}), {m['cores']}-core {m['arch']} CPU",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def make_corpus(root: Path, rows: int, image_size: int, content: str) -> str:
    """The corpus TSVs, their conversion as they come (``converted/``) and prepared (``prepared/``); returns how."""
    from biomedgpt.data.sample_corpus import write_sample_corpus
    from biomedgpt.demo import PRETRAINING_KINDS, prepare_demo_data

    per_type = max(1, round(rows / 3))
    if content == "scenes":
        prepare_demo_data(root, rows=per_type, seed=SEED, image_size=image_size)
        how = f"prepare_demo_data(rows={per_type}, image_size={image_size}, seed={SEED})"
    else:
        from radiograph_corpus import rewrite_as_radiographs

        write_sample_corpus(root / "corpus", rows=per_type, seed=SEED, image_size=64)
        rewrite_as_radiographs(root / "corpus", image_size, seed=SEED)
        how = f"write_sample_corpus(rows={per_type}, seed={SEED}) + rewrite_as_radiographs(image_size={image_size})"
    for kind in PRETRAINING_KINDS:
        # Today's layout: row groups of 128 rows whatever their bytes (row_group_bytes came with preparation).
        convert(str(root / "corpus" / f"{kind}.tsv"), kind, str(root / "converted" / kind), overwrite=True,
                row_group_bytes=None)  # fmt: skip
    for kind in PRETRAINING_KINDS:
        side = PREPARED_SHORTER_SIDE.get(kind)
        preparation = ImagePreparation(max_shorter_side=side) if side else None
        convert(str(root / "corpus" / f"{kind}.tsv"), kind, str(root / "prepared" / kind), overwrite=True,
                preparation=preparation)  # fmt: skip
    return how


# Tokens per example for the FLOPs of one sample (biomedgpt.train.flops): a 40-token prompt, a 30-token target, a
# 384 px image of which 196 patches are kept.
FEED_SHAPE = {"text_len": 40, "target_len": 30, "image_size": (384, 384), "kept_patches": 196}
FEED_SIZES = ("base", "large", "xlarge")
FEED_MFU = 0.4


def feeding(per_cpu_s: dict[str, float]) -> list[dict[str, Any]]:
    """CPU cores of data work one H100 at 40% MFU needs, per size, for each pipeline's samples per CPU-second.

    The GPU's rate is examples per second from the FLOPs of one image-text example; a vision-language row gives two
    of them (the auxiliary examples are counted as free, which overstates the rows a GPU consumes: the estimate is
    on the safe side), so rows/s = examples/s / 2.
    """
    from biomedgpt.model.config import BiomedGPTConfig
    from biomedgpt.train.flops import forward_flops, training_flops
    from biomedgpt.train.metrics import DEVICE_PEAK_TFLOPS

    peak = DEVICE_PEAK_TFLOPS["H100"]["bf16"] * 1e12
    table = []
    for size in FEED_SIZES:
        flops = training_flops(forward_flops(BiomedGPTConfig.for_size(size), 1, **FEED_SHAPE))
        examples_per_s = FEED_MFU * peak / flops
        rows_per_s = examples_per_s / 2
        row = {"size": size, "tflop_per_example": flops / 1e12, "examples_per_s": examples_per_s}
        row["rows_per_s"] = rows_per_s
        row["cores"] = {name: rows_per_s / rate for name, rate in per_cpu_s.items()}
        table.append(row)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=96, help="vision-language rows (default 96; rounded to 3k)")
    parser.add_argument(
        "--image-size", type=int, default=1024, help="longer side of the VL/detection images in px (default 1024)"
    )
    parser.add_argument(
        "--content",
        choices=("radiograph", "scenes"),
        default="radiograph",
        help="radiograph-like grey images in mixed encodings with 16-bit PNG and DICOM (default), or the sample "
        "corpus's colour scenes",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="vision-language rows per batch (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per pipeline and mode (default 3)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the second mode (0: skip)")
    parser.add_argument("--check-rows", type=int, default=24, help="rows checked for identical examples first")
    parser.add_argument("--data-dir", type=Path, help="keep/reuse the corpus here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--plot", type=Path, help="write a bar chart (PNG) here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]

    with contextlib.ExitStack() as stack:
        root = args.data_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-data-")))
        started = time.perf_counter()
        how = "reused"
        if not (root / "prepared" / "vision_language" / "index.json").is_file():
            how = make_corpus(root, args.rows, args.image_size, args.content)
        made = time.perf_counter() - started
        manifest = json.loads((root / "corpus" / "manifest.json").read_text())
        bench = Bench(root, args.batch_size)
        mib = {
            name: sum(f.stat().st_size for f in (root / name / "vision_language").glob("shard.*.parquet")) / 2**20
            for name in ("converted", "prepared")
        }
        print(
            f"corpus: {how} in {made:.1f} s -> {bench.rows} vision-language rows "
            f"({(root / 'corpus' / 'vision_language.tsv').stat().st_size / 2**20:.1f} MiB TSV, "
            f"{mib['converted']:.1f} MiB of Parquet as converted, {mib['prepared']:.1f} MiB prepared); "
            f"formats: {manifest.get('radiographs', {}).get('formats', 'scenes')}; "
            f"set-up: TSV offsets {bench.tsv_setup_s:.2f} s, PretrainStream {bench.stream_setup_s:.2f} s",
            flush=True,
        )
        check: dict[str, Any] = {}
        if args.check_rows:
            checked = min(args.check_rows, bench.rows)
            check = bench.check_same_examples(checked)
            for name, seen in check.items():
                print(
                    f"check: rows 0..{checked - 1}, {name} vs original: same tasks, weights and tokens "
                    f"({seen['bins_off_by_one']} location bins off by one); images: "
                    f"{100 * seen['share_off_by_more_than_2_levels']:.3f}% of values differ by more than 2/255 "
                    f"levels, at most {seen['worst_levels']:.0f}",
                    flush=True,
                )
        device_rate = bench.device_normalisation_rate()
        print(f"normalisation on the device, run on this CPU: {device_rate:.0f} samples/CPU-s (not counted)")
        modes = {"in-process (1 core)": 0}
        if args.workers:
            modes[f"{args.workers} DataLoader workers"] = args.workers
        figures: dict[str, dict[str, list[tuple[float, float]]]] = {m: {p: [] for p in PIPELINES} for m in modes}
        for mode, workers in modes.items():
            bench.new_streams()
            for repeat in range(args.repeats):
                for name in PIPELINES:  # interleaved, so drifts of the machine hit every pipeline alike
                    wall, cpu = bench.time_pass(name, workers, epoch=repeat)
                    figures[mode][name].append((wall, cpu))
                    print(
                        f"  {mode:>22} | {name:>8} | pass {repeat + 1}: {wall:6.1f} samples/s, "
                        f"{cpu:6.1f} samples/CPU-s",
                        flush=True,
                    )

    cores = os.cpu_count() or 1
    results: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/data_pipeline.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "rows": bench.rows,
        "image_size": manifest["image_size"],
        "content": args.content,
        "corpus": manifest.get("radiographs", {}),
        "parquet_mib": mib,
        "check": check,
        "device_normalisation_samples_per_cpu_s": device_rate,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "modes": {},
    }
    for mode, workers in modes.items():
        used = 1 if workers == 0 else cores
        table = {}
        for name, passes in figures[mode].items():
            wall = statistics.median(w for w, _ in passes)
            table[name] = {
                "samples_per_s": wall,
                "per_core": wall / used,
                "per_cpu_s": statistics.median(c for _, c in passes),
                "passes": [{"samples_per_s": w, "samples_per_cpu_s": c} for w, c in passes],
            }
        for row in table.values():
            row["per_core_vs_original"] = row["per_core"] / table["original"]["per_core"]
            row["per_cpu_s_vs_original"] = row["per_cpu_s"] / table["original"]["per_cpu_s"]
        results["modes"][mode] = table

    print(
        "\n| mode | pipeline | samples/s | per core | per core vs original | samples per CPU-s | vs original |"
        "\n|---|---|---:|---:|---:|---:|---:|"
    )
    for mode, table in results["modes"].items():
        for name in PIPELINES:
            r = table[name]
            print(
                f"| {mode} | {LABELS[name]} | {r['samples_per_s']:.1f} | {r['per_core']:.1f} | "
                f"{r['per_core_vs_original']:.2f}x | {r['per_cpu_s']:.1f} | {r['per_cpu_s_vs_original']:.2f}x |"
            )
    in_process = results["modes"]["in-process (1 core)"]
    results["feeding"] = feeding({name: in_process[name]["per_cpu_s"] for name in PIPELINES})
    print(
        f"\nCPU cores of data work per H100 at {FEED_MFU:.0%} MFU (in-process samples per CPU-second; "
        f"{FEED_SHAPE['image_size'][0]} px, {FEED_SHAPE['kept_patches']} patches, 2 image-text examples per row):"
        "\n| size | TFLOP per example | rows/s per GPU | " + " | ".join(f"cores: {n}" for n in PIPELINES) + " |"
        "\n|---|---:|---:|" + "---:|" * len(PIPELINES)
    )
    for row in results["feeding"]:
        cores_text = " | ".join(f"{row['cores'][n]:.1f}" for n in PIPELINES)
        print(f"| {row['size']} | {row['tflop_per_example']:.3f} | {row['rows_per_s']:.0f} | {cores_text} |")
    print(
        f"median of {args.repeats} passes; 1-min load average {results['load_average_1min'][0]} before, "
        f"{results['load_average_1min'][1]} after"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.plot:
        plot(results, args.plot)
        print(f"chart: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
