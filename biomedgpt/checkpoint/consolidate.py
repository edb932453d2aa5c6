"""Consolidate a DeepSpeed ZeRO (stage 1-3) checkpoint into a Hugging Face model directory, on CPU.

DeepSpeed's files are parsed here rather than through ``zero_to_fp32`` so that conversion streams: every rank file
is memory-mapped, each tensor is assembled from its rank partitions on its own, cast, and written straight into a
safetensors shard whose header was planned ahead. Peak memory is about one tensor, not the model; no GPU and no
process group are needed, and the data-parallel world size of the run does not matter.

Where the fp32 weights live in a tag directory (``CKPT_DIR/<tag>/``)::

    stage 1/2  mp_rank_00_model_states.pt           module weights and buffers, param_shapes (one dict per param
                                                    group), shared_params (alias -> owner), frozen params (stage 2)
               *zero_pp_rank_R_mp_rank_00_optim_states.pt
                                                    single_partition_of_fp32_groups: rank R's contiguous slice of
                                                    each group's flat fp32 vector (params back to back, with
                                                    param_alignment_paddings; the tail padding is not saved)
    stage 3    zero_pp_rank_R_mp_rank_00_model_states.pt
                                                    buffers (replicated), param_shapes, rank R's slice of each
                                                    frozen param
               zero_pp_rank_R_mp_rank_00_optim_states.pt
                                                    fp32_flat_groups: for every param in param_shapes order, rank R's
                                                    ceil(numel / world) elements (the last rank's slice zero-padded)

The model config and tokenizer come from the checkpoint (``<tag>/`` or ``CKPT_DIR/``: ``config.json`` or
``model_config.json``, and ``tokenizer/``, as the trainer writes them), or are given explicitly.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from biomedgpt.checkpoint.errors import DEFAULT_MAX_SHARD_SIZE, ConsolidationError, VerificationError
from biomedgpt.checkpoint.layout import COMPLETE_MARKER, CONFIG_FILES, LATEST_FILE, TOKENIZER_DIR, step_of_tag
from biomedgpt.checkpoint.model_formats import (
    BiomedGPTFormat,
    ModelFormat,
    format_for_config,
    read_config_file,
)
from biomedgpt.model_dir_files import TASK_FILE
from biomedgpt.output_dirs import OutputDirError, check_output_dir, replace_output_dir, staging_dir

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "ConsolidationError",
    "ConsolidationResult",
    "VerificationError",
    "VerificationResult",
    "ZeroCheckpoint",
    "consolidate_checkpoint",
    "verify_consolidated",
]

TOOL = "biomedgpt-consolidate"

SAFE_WEIGHTS_NAME = "model.safetensors"
# --trained-only: the parameters the optimizer held (LLaVA's stage-1 mm_projector.bin, for instance), in one file.
TRAINED_WEIGHTS_NAME = "trained_parameters.safetensors"
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

OUTPUT_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
# safetensors' names for the dtypes a BiomedGPT checkpoint can hold.
_SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_ZERO3_MODEL_FILE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_ZERO12_MODEL_FILE = "mp_rank_00_model_states.pt"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)


def parse_size(size: str | int) -> int:
    """Bytes in ``size``: an int, or ``"2GB"`` / ``"500MB"`` (powers of 1000) / ``"1GiB"`` (powers of 1024)."""
    if isinstance(size, int):
        if size <= 0:
            raise ConsolidationError(f"shard size must be positive, got {size}")
        return size
    match = _SIZE.match(size)
    if not match:
        raise ConsolidationError(f"cannot read the size {size!r}; write e.g. 2GB, 500MB, 1GiB or a number of bytes")
    number, unit = float(match.group(1)), match.group(2).upper()
    base = 1024 if "I" in unit else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[:1] if unit[:1] in "KMGT" else ""]
    value = int(number * base**power)
    if value <= 0:
        raise ConsolidationError(f"shard size must be positive, got {size!r}")
    return value


def output_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in OUTPUT_DTYPES.values():
            raise ConsolidationError(f"output dtype {dtype} is not supported; choose fp32 or bf16")
        return dtype
    try:
        return OUTPUT_DTYPES[dtype.lower()]
    except KeyError:
        raise ConsolidationError(f"output dtype {dtype!r} is not supported; choose fp32 or bf16") from None


def _torch_load(path: Path) -> Any:
    """Memory-mapped load: tensors stay in the page cache, so holding every rank's file costs no RAM.

    DeepSpeed pickles its own types (ZeroStageEnum, ...), so this needs DeepSpeed importable and
    ``weights_only=False``: only open checkpoints you trust.
    """
    try:
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            return torch.load(path, map_location="cpu", weights_only=False)  # a legacy (non-zip) file
    except ImportError as error:
        raise ConsolidationError(f"{path}: reading it needs {error.name or 'a missing module'} ({error})") from error
    except Exception as error:  # truncated or corrupt files surface as many different exception types
        raise ConsolidationError(f"{path}: cannot be read ({type(error).__name__}: {error})") from error


def _entry(state: Mapping[str, Any], key: str, path: Path) -> Any:
    if key not in state:
        raise ConsolidationError(f"{path} is not a DeepSpeed ZeRO checkpoint file of a known layout (no {key!r})")
    return state[key]


def _available_tags(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*model_states.pt"))]
    return sorted(tags)


class _Flat:
    """Several 1-d tensors read as their concatenation, without building it."""

    def __init__(self, parts: Sequence[torch.Tensor]) -> None:
        self.parts = list(parts)
        self.starts = [0]
        for part in self.parts:
            self.starts.append(self.starts[-1] + part.numel())

    @property
    def numel(self) -> int:
        return self.starts[-1]

    def pieces(self, start: int, length: int) -> list[torch.Tensor]:
        """Views covering elements ``[start, start + length)``."""
        if start < 0 or start + length > self.numel:
            raise IndexError(f"range [{start}, {start + length}) outside a flat vector of {self.numel} elements")
        out: list[torch.Tensor] = []
        end = start + length
        for index, part in enumerate(self.parts):
            lo, hi = self.starts[index], self.starts[index + 1]
            if hi <= start or lo >= end:
                continue
            out.append(part.view(-1)[max(start, lo) - lo : min(end, hi) - lo])
        return out


def _join(pieces: list[torch.Tensor]) -> torch.Tensor:
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


@dataclass(frozen=True)
class _Source:
    """Where one tensor of the checkpoint is: ``kind`` is param (fp32 master), frozen, buffer or module."""

    kind: str
    shape: torch.Size
    dtype: torch.dtype
    group: int = 0
    offset: int = 0


class ZeroCheckpoint:
    """One tag of a DeepSpeed ZeRO checkpoint (stage 1, 2 or 3, any data-parallel world size), read on CPU.

    ``checkpoint_dir`` is ``CKPT_DIR`` (with ``tag`` a tag name or ``"latest"``, read from ``CKPT_DIR/latest``) or a
    tag directory itself. ``names`` lists every tensor the checkpoint stores once (trainable params, frozen params,
    persistent buffers); ``aliases`` maps tied names to the name that holds the tensor. ``tensor(name)`` assembles
    one tensor from the rank files: fp32 master weights for trainable params, the stored dtype otherwise.
    """

    def __init__(self, checkpoint_dir: str | os.PathLike[str], tag: str | None = "latest") -> None:
        self.root, self.tag, self.directory = self._resolve(Path(checkpoint_dir), tag)
        self._check_complete()
        self._load()

    # ------------------------------------------------------------------ locating the files

    @staticmethod
    def _resolve(path: Path, tag: str | None) -> tuple[Path, str, Path]:
        if not path.exists():
            raise ConsolidationError(f"{path}: no such checkpoint directory")
        if not path.is_dir():
            raise ConsolidationError(f"{path}: not a directory (give the checkpoint directory, e.g. checkpoints/run)")
        if tag in (None, "", LATEST_FILE):
            if any(path.glob("*model_states.pt")):  # the path is a tag directory itself
                return path.parent, path.name, path
            latest = path / LATEST_FILE
            if not latest.is_file():
                tags = _available_tags(path)
                if not tags:
                    raise ConsolidationError(
                        f"{path} is not a DeepSpeed checkpoint: no '{LATEST_FILE}' file and no tag directory with "
                        "*_model_states.pt files"
                    )
                raise ConsolidationError(f"{latest} not found; pass a tag (--tag), one of: {', '.join(tags)}")
            tag = latest.read_text().strip()
            if not tag:
                raise ConsolidationError(f"{latest} is empty; pass a tag (--tag)")
        directory = path / tag
        if not directory.is_dir():
            tags = _available_tags(path)
            hint = f"; available: {', '.join(tags)}" if tags else ""
            raise ConsolidationError(f"checkpoint tag {tag!r} not found: {directory} does not exist{hint}")
        if not any(directory.glob("*model_states.pt")):
            raise ConsolidationError(f"{directory} is not a DeepSpeed checkpoint: it has no *_model_states.pt file")
        return path, tag, directory

    def _check_complete(self) -> None:
        # The trainer marks a tag complete only after every rank wrote it; DeepSpeed alone writes no marker.
        if step_of_tag(self.tag) is not None and not (self.directory / COMPLETE_MARKER).is_file():
            warnings.warn(
                f"{self.directory} has no {COMPLETE_MARKER} marker: its save may have been interrupted",
                stacklevel=3,
            )

    def _rank_files(self, pattern: re.Pattern[str], what: str) -> list[Path]:
        found: dict[int, Path] = {}
        for path in self.directory.iterdir():
            match = pattern.match(path.name)
            if not match:
                continue
            if int(match.group(2)) != 0:
                raise ConsolidationError(
                    f"{path}: tensor/model-parallel checkpoints (mp_rank > 0) are not supported; only data-parallel "
                    "ZeRO checkpoints"
                )
            found[int(match.group(1))] = path
        if not found:
            raise ConsolidationError(f"{self.directory} is not a ZeRO checkpoint: it has no {what} files")
        missing = sorted(set(range(max(found) + 1)) - set(found))
        if missing:
            raise ConsolidationError(
                f"{self.directory}: {what} files of ranks {missing} are missing (an interrupted or partial save?)"
            )
        return [found[rank] for rank in sorted(found)]

    # ------------------------------------------------------------------ parsing

    def _load(self) -> None:
        from deepspeed.checkpoint import constants as ds

        optim_files = self._rank_files(_OPTIM_FILE, "*_optim_states.pt")
        optim = [_entry(_torch_load(path), ds.OPTIMIZER_STATE_DICT, path) for path in optim_files]
        self.stage = int(_entry(optim[0], ds.ZERO_STAGE, optim_files[0]))
        counts = _entry(optim[0], ds.PARTITION_COUNT, optim_files[0])
        counts = counts if isinstance(counts, (list, tuple)) else [counts]
        if len(set(counts)) != 1:
            raise ConsolidationError(
                f"{optim_files[0]}: param groups partitioned over different rank counts {counts} (expert "
                "parallelism) are not supported"
            )
        self.world_size = int(counts[0])
        if self.world_size != len(optim_files):
            raise ConsolidationError(
                f"{self.directory}: the checkpoint was written by {self.world_size} ranks but holds "
                f"{len(optim_files)} *_optim_states.pt files (an overwritten or partial save?)"
            )
        self.optim_files = optim_files

        if self.stage == 3:
            self.model_files = self._rank_files(_ZERO3_MODEL_FILE, "zero_pp_rank_*_model_states.pt")
            if len(self.model_files) != self.world_size:
                raise ConsolidationError(
                    f"{self.directory}: {len(self.model_files)} model-state files for {self.world_size} ranks"
                )
        elif self.stage in (1, 2):
            path = self.directory / _ZERO12_MODEL_FILE
            if not path.is_file():
                raise ConsolidationError(
                    f"{path} not found: a ZeRO-{self.stage} checkpoint keeps its model state there"
                )
            self.model_files = [path]
        else:
            raise ConsolidationError(f"{optim_files[0]}: unknown ZeRO stage {self.stage}")

        # Rank 0 has the buffers and shapes; other ranks' model files matter only for stage-3 frozen params.
        states = [_torch_load(self.model_files[0])]
        first = states[0]
        for key in (ds.BUFFER_NAMES, ds.PARAM_SHAPES, "module"):
            _entry(first, key, self.model_files[0])
        self.ds_version = str(first.get(ds.DS_VERSION, "unknown"))
        self.client_state = {k: v for k, v in first.items() if k in ("step", "epoch", "mlflow_run_id")}
        module: Mapping[str, torch.Tensor] = first["module"]
        self._module = module
        shape_groups = first[ds.PARAM_SHAPES]
        if isinstance(shape_groups, Mapping):
            shape_groups = [shape_groups]
        self.aliases: dict[str, str] = dict(first.get("shared_params") or {})
        self._sources: dict[str, _Source] = {}

        if self.stage == 3:
            flat_groups = [_entry(state, ds.FP32_FLAT_GROUPS, f) for state, f in zip(optim, optim_files)]
            self._flats = [_Flat([g] if isinstance(g, torch.Tensor) else g) for g in flat_groups]
            self._index_zero3(shape_groups)
        else:
            key = ds.SINGLE_PARTITION_OF_FP32_GROUPS
            groups_per_rank = [_entry(state, key, f) for state, f in zip(optim, optim_files)]
            self._flats = [_Flat([ranks[g] for ranks in groups_per_rank]) for g in range(len(groups_per_rank[0]))]
            paddings = optim[0].get(ds.PARAM_ALIGNMENT_PADDINGS)
            self._index_zero12(shape_groups, paddings)

        frozen_shapes = first.get(ds.FROZEN_PARAM_SHAPES) or {}
        if frozen_shapes:
            if self.stage == 3:
                states += [_torch_load(path) for path in self.model_files[1:]]
            self._fragments = [state.get(ds.FROZEN_PARAM_FRAGMENTS) or {} for state in states]
            for name, shape in frozen_shapes.items():
                self._sources[name] = _Source("frozen", torch.Size(shape), self._fragments[0][name].dtype)

        for name in first[ds.BUFFER_NAMES]:
            if name in module:  # non-persistent buffers are listed but not saved
                tensor = module[name]
                self._sources[name] = _Source("buffer", tensor.shape, tensor.dtype)
        if self.stage in (1, 2):
            # ZeRO-1 records frozen params nowhere but in the module weights (DeepSpeed's zero_to_fp32 drops them).
            for name, tensor in module.items():
                if name not in self._sources and name not in self.aliases:
                    self._sources[name] = _Source("module", tensor.shape, tensor.dtype)
        for alias, owner in list(self.aliases.items()):
            if owner not in self._sources:
                raise ConsolidationError(f"{self.model_files[0]}: tied parameter {alias} points to unknown {owner}")

    def _index_zero3(self, shape_groups: Sequence[Mapping[str, Any]]) -> None:
        offset = 0
        for shapes in shape_groups:
            for name, shape in shapes.items():
                shape = torch.Size(shape)
                self._sources[name] = _Source("param", shape, torch.float32, offset=offset)
                offset += math.ceil(shape.numel() / self.world_size)
        # Every rank's flat vector is exactly its partitions back to back: any other total means a layout we
        # do not understand, so refuse rather than write shifted weights.
        for rank, flat in enumerate(self._flats):
            if flat.numel != offset:
                raise ConsolidationError(
                    f"{self.optim_files[rank]}: holds {flat.numel} fp32 elements but param_shapes account for "
                    f"{offset} per rank; the files do not belong together"
                )

    def _index_zero12(
        self, shape_groups: Sequence[Mapping[str, Any]], paddings: Sequence[Sequence[int]] | None
    ) -> None:
        if len(shape_groups) != len(self._flats):
            raise ConsolidationError(
                f"{self.model_files[0]}: {len(shape_groups)} param groups but the optimizer files hold "
                f"{len(self._flats)}"
            )
        align = 2 * self.world_size  # DeepSpeed pads each group to a multiple of this before partitioning
        for group, shapes in enumerate(shape_groups):
            offset = 0
            pads = list(paddings[group]) if paddings is not None else [0] * len(shapes)
            if len(pads) != len(shapes):
                raise ConsolidationError(
                    f"{self.optim_files[0]}: {len(pads)} alignment paddings for {len(shapes)} params in group {group}"
                )
            for (name, shape), pad in zip(shapes.items(), pads):
                shape = torch.Size(shape)
                self._sources[name] = _Source("param", shape, torch.float32, group=group, offset=offset)
                offset += shape.numel() + pad
            available = self._flats[group].numel
            if offset > available or math.ceil(available / align) != math.ceil(offset / align):
                raise ConsolidationError(
                    f"{self.directory}: param group {group} needs {offset} fp32 elements but the ranks hold "
                    f"{available}; the files do not belong together"
                )

    # ------------------------------------------------------------------ reading

    @property
    def names(self) -> list[str]:
        return list(self._sources)

    def shape(self, name: str) -> torch.Size:
        return self._sources[self.aliases.get(name, name)].shape

    def dtype(self, name: str) -> torch.dtype:
        return self._sources[self.aliases.get(name, name)].dtype

    def kind(self, name: str) -> str:
        return self._sources[self.aliases.get(name, name)].kind

    def __contains__(self, name: str) -> bool:
        return name in self._sources or name in self.aliases

    def tensor(self, name: str) -> torch.Tensor:
        """The full tensor ``name`` (or the one an alias points to). May be a view of a memory-mapped file."""
        name = self.aliases.get(name, name)
        source = self._sources[name]
        numel = source.shape.numel()
        if numel == 0:
            return torch.empty(source.shape, dtype=source.dtype)
        if source.kind == "param" and self.stage == 3:
            part = math.ceil(numel / self.world_size)
            pieces = [piece for flat in self._flats for piece in flat.pieces(source.offset, part)]
            return _join(pieces)[:numel].view(source.shape)
        if source.kind == "param":
            return _join(self._flats[source.group].pieces(source.offset, numel)).view(source.shape)
        if source.kind == "frozen":
            per_rank = [fragments[name].reshape(-1) for fragments in self._fragments]
            if self.stage == 3:  # each rank holds its padded slice
                return _join(per_rank)[:numel].view(source.shape)
            return per_rank[0].view(source.shape)  # ZeRO-2 keeps the whole frozen tensor
        return self._module[name]

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._sources:
            yield name, self.tensor(name)

    def state_dict(self, aliases: bool = True) -> dict[str, torch.Tensor]:
        """Everything at once (small models, tests); ``aliases`` adds the tied names, sharing the tensor."""
        state = {name: self.tensor(name) for name in self._sources}
        if aliases:
            state.update({alias: state[owner] for alias, owner in self.aliases.items()})
        return state

    def describe(self) -> str:
        return f"{self.directory} (ZeRO-{self.stage}, {self.world_size} ranks, DeepSpeed {self.ds_version})"


# ---------------------------------------------------------------------- model config and tokenizer


def _find_config_file(checkpoint: ZeroCheckpoint) -> Path | None:
    for directory in (checkpoint.directory, checkpoint.root):
        for name in CONFIG_FILES:
            if (directory / name).is_file():
                return directory / name
    return None


def _find_tokenizer_dir(checkpoint: ZeroCheckpoint) -> Path | None:
    for directory in (checkpoint.directory, checkpoint.root):
        if (directory / TOKENIZER_DIR).is_dir():
            return directory / TOKENIZER_DIR
    return None


def _find_task_file(checkpoint: ZeroCheckpoint) -> Path | None:
    for directory in (checkpoint.directory, checkpoint.root):
        if (directory / TASK_FILE).is_file():
            return directory / TASK_FILE
    return None


def read_model_config(path: Path) -> Any:
    """The model config in ``path`` (a ``config.json``): a BiomedGPTConfig, or a transformers causal-LM config."""
    return read_config_file(path)[0]


@dataclass
class ModelSources:
    """The model config and tokenizer a consolidated directory is written with, where they came from, and the model
    family they belong to."""

    config: Any
    tokenizer: Any
    config_origin: str
    tokenizer_origin: str
    format: ModelFormat


@dataclass(frozen=True)
class ConfigBuilder:
    """A model config that the checkpoint tools do not read themselves (e.g. from a training config, which the
    trainer owns): ``build`` makes it for the tokenizer in use; ``tokenizer`` is the one to use when neither the
    caller nor the checkpoint gives one."""

    origin: str
    build: Callable[[Any], Any]
    tokenizer: Callable[[], Any]
    tokenizer_origin: str
    model_format: ModelFormat = field(default_factory=BiomedGPTFormat)  # the family ``build`` makes a config of


def is_model_config(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a model's ``config.json`` or a directory holding one (not a training config)."""
    path = Path(path)
    if path.is_dir():
        return (path / "config.json").is_file()
    return path.suffix == ".json" and path.is_file() and "model_type" in path.read_text()


def resolve_model_sources(
    checkpoint: ZeroCheckpoint,
    config_from: str | os.PathLike[str] | Any | ConfigBuilder | None = None,
    tokenizer: str | os.PathLike[str] | Any | None = None,
) -> ModelSources:
    """Model config: ``config_from`` (a config object, a ``config.json`` file or model directory, or a
    :class:`ConfigBuilder`), else the checkpoint's ``config.json``/``model_config.json`` (tag, then checkpoint
    directory). Tokenizer: ``tokenizer`` (a directory or a tokenizer), else the checkpoint's ``tokenizer/``, else the
    builder's. The config's ``model_type`` picks the model family (BiomedGPT or a Hugging Face causal LM)."""
    builder = config_from if isinstance(config_from, ConfigBuilder) else None
    model_format: ModelFormat | None = None
    if builder is not None:
        config, config_origin, model_format = None, builder.origin, builder.model_format
    elif config_from is not None and not isinstance(config_from, (str, os.PathLike)):
        config, config_origin, model_format = config_from, "given config", format_for_config(config_from)
    elif config_from is not None:
        path = Path(config_from)
        if not is_model_config(path):
            raise ConsolidationError(
                f"{path}: not a model config.json or a directory holding one (biomedgpt-consolidate --config-from "
                "also reads a training preset or YAML)"
            )
        found = path / "config.json" if path.is_dir() else path
        (config, model_format), config_origin = read_config_file(found), str(found)
    else:
        found = _find_config_file(checkpoint)
        if found is None:
            raise ConsolidationError(
                f"no model config in {checkpoint.directory} or {checkpoint.root} (looked for "
                f"{' / '.join(CONFIG_FILES)}); pass --config-from with the training preset or YAML, or a config.json"
            )
        (config, model_format), config_origin = read_config_file(found), str(found)

    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        tok, tokenizer_origin = tokenizer, "given tokenizer"
    elif tokenizer is not None:
        tok, tokenizer_origin = _read_tokenizer(Path(tokenizer), model_format), str(tokenizer)
    elif (found_tok := _find_tokenizer_dir(checkpoint)) is not None:
        tok, tokenizer_origin = _read_tokenizer(found_tok, model_format), str(found_tok)
    elif builder is not None:
        try:
            tok = builder.tokenizer()
        except (OSError, ValueError) as error:
            raise ConsolidationError(f"--config-from {builder.origin}: cannot load its tokenizer ({error})") from error
        tokenizer_origin = builder.tokenizer_origin
    else:
        raise ConsolidationError(
            f"no tokenizer in {checkpoint.directory / TOKENIZER_DIR} or {checkpoint.root / TOKENIZER_DIR}; "
            "pass --tokenizer DIR (the data.tokenizer of the run) or --config-from the training config"
        )

    if config is None:
        assert builder is not None
        try:
            config = builder.build(tok)
        except ValueError as error:  # BiomedGPTConfig.validate: an impossible combination
            raise ConsolidationError(f"--config-from {builder.origin}: {error}") from error
    problem = model_format.tokenizer_mismatch(tok, config)
    if problem is not None:
        raise ConsolidationError(
            f"the tokenizer from {tokenizer_origin} has {len(tok)} ids but the model config from {config_origin} has "
            f"vocab_size={config.vocab_size} ({problem}); pass the tokenizer the run used (--tokenizer)"
        )
    return ModelSources(config, tok, config_origin, tokenizer_origin, model_format)


def _read_tokenizer(path: Path, model_format: ModelFormat) -> Any:
    if not path.is_dir():
        raise ConsolidationError(f"{path}: tokenizer directory not found")
    try:
        return model_format.read_tokenizer(path)
    except (OSError, ValueError) as error:
        raise ConsolidationError(f"{path}: cannot load the tokenizer ({error})") from error


# ---------------------------------------------------------------------- planning the output


@dataclass(frozen=True)
class _Entry:
    name: str  # key in the output
    source: str  # name in the checkpoint
    shape: torch.Size
    dtype: torch.dtype  # output dtype

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize


def model_layout(config: Any) -> tuple[dict[str, torch.Size], dict[str, str]]:
    """The persistent state of the model of ``config`` (key -> shape, in ``state_dict`` order) with each tied group
    under the one key ``save_pretrained`` keeps, and the tied keys it drops (alias -> kept key)."""
    return _layout_of(format_for_config(config).meta_model(config))


def _layout_of(model: torch.nn.Module) -> tuple[dict[str, torch.Size], dict[str, str]]:
    state = model.state_dict(keep_vars=True)  # keep_vars: tied names map to the same Parameter object
    dropped_by_transformers = set(getattr(model, "_tied_weights_keys", None) or ())
    groups: dict[int, list[str]] = {}
    for name, tensor in state.items():
        groups.setdefault(id(tensor), []).append(name)
    layout: dict[str, torch.Size] = {}
    aliases: dict[str, str] = {}
    for name, tensor in state.items():
        names = groups[id(tensor)]
        keep = next((n for n in names if n not in dropped_by_transformers), names[0])
        if name == keep:
            layout[name] = tensor.shape
        else:
            aliases[name] = keep
    return layout, aliases


def _plan_entries(
    checkpoint: ZeroCheckpoint, model: torch.nn.Module, model_format: ModelFormat, dtype: torch.dtype
) -> tuple[list[_Entry], dict[str, str]]:
    """What to write, in model order, each output key mapped to the checkpoint tensor that holds it; and the tied
    keys left out. Any difference between the checkpoint and the model config is an error listing them."""
    layout, aliases = _layout_of(model)
    prefix = model_format.weight_prefix(next(iter(layout)), checkpoint) if layout else ""
    tie_group: dict[str, list[str]] = {name: [name] for name in layout}
    for alias, kept in aliases.items():
        tie_group[kept].append(alias)
    entries: list[_Entry] = []
    problems: list[str] = []
    used: set[str] = set()
    for name, shape in layout.items():
        source = next((prefix + n for n in tie_group[name] if prefix + n in checkpoint), None)
        if source is None:
            problems.append(f"missing {name} {tuple(shape)}")
            continue
        owner = checkpoint.aliases.get(source, source)
        used.add(owner)
        if checkpoint.shape(owner) != shape:
            problems.append(f"{name}: checkpoint {tuple(checkpoint.shape(owner))} vs model {tuple(shape)}")
            continue
        stored = checkpoint.dtype(owner)
        entries.append(_Entry(name, owner, shape, dtype if stored.is_floating_point else stored))
    problems += [f"unexpected {name} {tuple(checkpoint.shape(name))}" for name in checkpoint.names if name not in used]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... ({len(problems)} in all)" if len(problems) > 6 else "")
        raise ConsolidationError(
            f"{checkpoint.directory} does not match the model config (different size or vocabulary?): {shown}"
        )
    return entries, aliases


def _plan_shards(entries: list[_Entry], max_shard_size: int) -> list[list[_Entry]]:
    """Greedy in model order, like transformers: a tensor larger than the limit gets a shard of its own."""
    shards: list[list[_Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return [SAFE_WEIGHTS_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


# ---------------------------------------------------------------------- writing


def _write_shard(
    path: Path,
    entries: list[_Entry],
    checkpoint: ZeroCheckpoint,
    metadata: Mapping[str, str],
    progress: Any,
) -> None:
    """A safetensors file written tensor by tensor: the header is known from the plan, so no shard is held in
    memory. Wider dtypes first keeps every tensor aligned without gaps (the format forbids holes)."""
    if sys.byteorder != "little":  # safetensors stores little-endian; this writer copies raw bytes
        raise ConsolidationError("writing safetensors needs a little-endian machine")
    ordered = sorted(entries, key=lambda e: -e.dtype.itemsize)
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for entry in ordered:
        header[entry.name] = {
            "dtype": _SAFETENSORS_DTYPES[entry.dtype],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
    with path.open("wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for entry in ordered:
            tensor = checkpoint.tensor(entry.source).to(entry.dtype).contiguous()
            if tensor.shape != entry.shape:
                raise ConsolidationError(f"{entry.source}: assembled shape {tuple(tensor.shape)} != {entry.shape}")
            handle.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            progress.update(entry.nbytes)
            del tensor


@dataclass
class ConsolidationResult:
    output_dir: Path
    source_dir: Path  # the tag directory read
    checkpoint: str  # description of the source tag
    tag: str
    zero_stage: int
    world_size: int
    dtype: torch.dtype
    num_tensors: int
    num_parameters: int  # elements of the parameters, the tied embedding counted once
    total_bytes: int
    shards: list[str]
    tied: dict[str, str]  # dropped key -> written key (restored by tying on load)
    config_origin: str
    tokenizer_origin: str
    seconds: float = 0.0
    step: int | None = None

    def summary(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        step = f", step {self.step}" if self.step is not None else ""
        return (
            f"consolidated {self.checkpoint}{step} -> {self.output_dir}: {self.num_tensors} tensors, "
            f"{self.num_parameters:,} parameters, {self.total_bytes / 1e6:,.1f} MB {dtype} in {len(self.shards)} "
            f"shard(s), {len(self.tied)} tied keys restored on load, {self.seconds:.1f}s"
        )


def _progress_bar(total: int, enabled: bool, desc: str) -> Any:
    from tqdm import tqdm

    disable = not enabled or bool(os.environ.get("BIOMEDGPT_NO_PROGRESS"))
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, dynamic_ncols=True, file=sys.stderr, disable=disable)


def _check_output(output: Path, checkpoint_dir: str | os.PathLike[str], overwrite: bool) -> None:
    try:
        check_output_dir(output, tool=TOOL, inputs=[checkpoint_dir], overwrite=overwrite)
    except OutputDirError as error:
        raise ConsolidationError(str(error)) from None


def consolidate_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    tag: str | None = "latest",
    dtype: str | torch.dtype = "fp32",
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    config_from: str | os.PathLike[str] | Any | ConfigBuilder | None = None,
    tokenizer: str | os.PathLike[str] | Any | None = None,
    overwrite: bool = False,
    progress: bool = True,
    trained_only: bool = False,
) -> ConsolidationResult:
    """Write ``output_dir`` (``config.json``, ``model*.safetensors`` with an index when sharded, tokenizer files)
    from a ZeRO checkpoint, loadable with ``BiomedGPTForConditionalGeneration.from_pretrained`` (a BiomedGPT run) or
    ``transformers.AutoModelForCausalLM.from_pretrained`` (a ``causal_lm`` run; the model's ``model_type`` decides).

    The directory appears only when complete (written under a temporary name, then renamed). Floating tensors are
    cast to ``dtype``; integer buffers keep theirs. Tied weights are written once, under the key transformers keeps.

    ``trained_only``: only the parameters that trained (the optimizer's; frozen ones and buffers are left out) go
    into one ``trained_parameters.safetensors`` beside the config and tokenizer, keyed as in the full model: a
    stage that trains the projector alone gives the projector weights. Such a directory is no loadable model.
    """
    start = time.perf_counter()
    out_dtype = output_dtype(dtype)
    shard_limit = parse_size(max_shard_size)
    output = Path(output_dir)
    _check_output(output, checkpoint_dir, overwrite)  # before any work
    checkpoint = ZeroCheckpoint(checkpoint_dir, tag)
    sources = resolve_model_sources(checkpoint, config_from, tokenizer)
    model = sources.format.meta_model(sources.config)
    entries, tied = _plan_entries(checkpoint, model, sources.format, out_dtype)
    if trained_only:
        entries = [entry for entry in entries if checkpoint.kind(entry.source) == "param"]
        if not entries:
            raise ConsolidationError(f"{checkpoint.describe()}: no parameter trained (all frozen)")
        shards, names = [entries], [TRAINED_WEIGHTS_NAME]
    else:
        shards = _plan_shards(entries, shard_limit)
        names = _shard_names(len(shards))
    total = sum(entry.nbytes for entry in entries)
    metadata = {
        "format": "pt",  # transformers refuses safetensors files without it
        "source": str(checkpoint.directory),
        "tag": checkpoint.tag,
        "zero_stage": str(checkpoint.stage),
        "world_size": str(checkpoint.world_size),
    }

    staging = staging_dir(output)
    try:
        with _progress_bar(total, progress, "consolidating") as bar:
            for name, shard in zip(names, shards):
                _write_shard(staging / name, shard, checkpoint, metadata, bar)
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": total},
                "weight_map": {entry.name: name for name, shard in zip(names, shards) for entry in shard},
            }
            index["weight_map"] = dict(sorted(index["weight_map"].items()))
            (staging / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        config = copy.deepcopy(sources.config)
        config.architectures = [type(model).__name__]
        config.dtype = out_dtype
        config.save_pretrained(staging)
        sources.tokenizer.save_pretrained(staging)
        origin = Path(sources.tokenizer_origin)
        for name in PROCESSOR_FILES:  # a vision-language run keeps its image processor beside the tokenizer
            if (origin / name).is_file():
                shutil.copyfile(origin / name, staging / name)
        task_file = _find_task_file(checkpoint)
        if task_file is not None:  # evaluation then prepares inputs as the fine-tuning did
            shutil.copyfile(task_file, staging / TASK_FILE)
        replace_output_dir(staging, output, tool=TOOL, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    parameters = sum(
        entry.shape.numel() for entry in entries if checkpoint.kind(entry.source) in ("param", "frozen", "module")
    )
    step = checkpoint.client_state.get("step")
    return ConsolidationResult(
        output_dir=output,
        source_dir=checkpoint.directory,
        checkpoint=checkpoint.describe(),
        tag=checkpoint.tag,
        zero_stage=checkpoint.stage,
        world_size=checkpoint.world_size,
        dtype=out_dtype,
        num_tensors=len(entries),
        num_parameters=parameters,
        total_bytes=total,
        shards=names,
        tied=tied,
        config_origin=sources.config_origin,
        tokenizer_origin=sources.tokenizer_origin,
        seconds=time.perf_counter() - start,
        step=int(step) if isinstance(step, int) else None,
    )


# ---------------------------------------------------------------------- verification

_PRECISION = {torch.float64: 4, torch.float32: 3, torch.float16: 2, torch.bfloat16: 1}


def _precision(tensor: torch.Tensor) -> int:
    return _PRECISION.get(tensor.dtype, 3) if tensor.is_floating_point() else 9


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equality of the bytes (tells -0.0 from 0.0 and compares NaNs), which ``torch.equal`` does not."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))


def _compare(written: torch.Tensor, reference: torch.Tensor) -> tuple[bool, float]:
    """Exact at the narrower of the two precisions (a bf16 file against fp32 weights, or the reverse), and the
    largest absolute difference in fp32."""
    if written.is_floating_point() and reference.is_floating_point():
        common = min(written, reference, key=_precision).dtype
        a, b = written.to(common), reference.to(common)
        return _bitwise_equal(a, b), float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
    return _bitwise_equal(written, reference.to(written.dtype)), 0.0


@dataclass
class VerificationResult:
    reference: str
    compared: int = 0
    mismatched: list[str] = field(default_factory=list)
    not_in_reference: list[str] = field(default_factory=list)
    max_weight_diff: float = 0.0
    tied: bool = False
    load_problems: list[str] = field(default_factory=list)
    logits_max_diff: float = 0.0
    logits_exact: bool = False
    logits_finite: bool = False
    logits_tolerance: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            not self.mismatched
            and not self.load_problems
            and self.tied
            and self.logits_finite
            and self.logits_max_diff <= self.logits_tolerance
        )

    def summary(self) -> str:
        status = "OK" if self.ok else "FAILED"
        text = (
            f"verify {status}: {self.compared} tensors compared with {self.reference}"
            f" ({len(self.mismatched)} differ, max |diff| {self.max_weight_diff:.3g}); tie "
            f"{'kept' if self.tied else 'BROKEN'}; forward pass logits max |diff| {self.logits_max_diff:.3g}"
            f" ({'bitwise equal' if self.logits_exact else f'tolerance {self.logits_tolerance:.3g}'})"
        )
        if self.not_in_reference:
            text += f"; not in the reference: {', '.join(self.not_in_reference[:5])}"
        if self.mismatched:
            text += f"; differ: {', '.join(self.mismatched[:5])}"
        if self.load_problems:
            text += f"; loading: {'; '.join(self.load_problems[:5])}"
        if not self.logits_finite:
            text += "; the logits hold NaN or inf"
        return text


class _Reference:
    """A state dict to compare against, read one tensor at a time."""

    def __init__(self, source: Mapping[str, Any] | str | os.PathLike[str] | None, checkpoint: Path | None) -> None:
        self._handle: Any = None
        if isinstance(source, Mapping):
            self.tensors, self.description = source, "the given state dict"
        elif source is not None:
            path = Path(source)
            if not path.is_file():
                raise ConsolidationError(f"{path}: reference state dict not found")
            self.description = str(path)
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                self._handle = safe_open(str(path), framework="pt")
                self.tensors = {k: None for k in self._handle.keys()}  # noqa: SIM118 (safe_open is no mapping)
            else:
                try:
                    loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                except Exception as error:  # torch.load raises many kinds for a file that is no state dict
                    raise ConsolidationError(f"{path}: cannot read a state dict ({error})") from error
                if not isinstance(loaded, Mapping):
                    raise ConsolidationError(f"{path}: holds a {type(loaded).__name__}, not a state dict")
                self.tensors = loaded["module"] if isinstance(loaded.get("module"), Mapping) else loaded
        else:
            if checkpoint is None:
                raise ConsolidationError("verification needs a reference state dict or the checkpoint")
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            with contextlib.redirect_stdout(sys.stderr):  # it prints progress; keep stdout for our summary
                self.tensors = get_fp32_state_dict_from_zero_checkpoint(
                    str(checkpoint.parent), tag=checkpoint.name, lazy_mode=True
                )
            self.description = f"DeepSpeed's zero_to_fp32 reading of {checkpoint}"

    def get(self, name: str) -> torch.Tensor | None:
        if name not in self.tensors:
            return None
        if self._handle is not None:
            return self._handle.get_tensor(name)
        value = self.tensors[name]
        return value if isinstance(value, torch.Tensor) else value.contiguous()  # DeepSpeed's lazy tensors

    def find(self, name: str, aliases: list[str], model_format: ModelFormat) -> torch.Tensor | None:
        """The reference for output key ``name`` (or a tied alias of it), under any of the format's prefixes (the
        engine's state names the model's weights as its training wrapper holds them)."""
        for prefix in model_format.weight_prefixes:
            for key in (name, *aliases):
                if prefix + key in self.tensors:
                    return self.get(prefix + key)
        return None


def verify_consolidated(
    output_dir: str | os.PathLike[str],
    reference: Mapping[str, Any] | str | os.PathLike[str] | None = None,
    checkpoint: ZeroCheckpoint | str | os.PathLike[str] | None = None,
) -> VerificationResult:
    """Load ``output_dir`` with ``from_pretrained``, compare every tensor with ``reference`` (a state dict, a
    ``.pt``/``.safetensors`` file of weights gathered from the engine, or by default DeepSpeed's own
    ``zero_to_fp32`` reading of ``checkpoint``, a tag directory), and run one forward pass with each set of weights.

    Weights must agree exactly at the narrower precision of the two; logits exactly when the reference is at least
    as precise as the written file, else within a bf16-sized tolerance. Holds the model twice in memory.
    """
    output = Path(output_dir)
    if isinstance(checkpoint, ZeroCheckpoint):
        checkpoint = checkpoint.directory
    ref = _Reference(reference, Path(checkpoint) if checkpoint is not None else None)
    result = VerificationResult(reference=ref.description)
    config, model_format = read_config_file(output / "config.json")
    model, info = model_format.load(output)
    model.eval()
    result.load_problems = [f"{kind}: {', '.join(keys)}" for kind, keys in info.items() if keys]
    _, tied = model_layout(config)
    result.tied = all(model.get_parameter(alias) is model.get_parameter(kept) for alias, kept in tied.items())

    from safetensors import safe_open

    reference_model = copy.deepcopy(model)
    reference_less_precise = False
    with torch.no_grad():
        reference_state = reference_model.state_dict()
        for shard in sorted(output.glob("model*.safetensors")):
            with safe_open(str(shard), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is no mapping)
                    written = handle.get_tensor(name)
                    expected = ref.find(name, [a for a, k in tied.items() if k == name], model_format)
                    if expected is None:
                        result.not_in_reference.append(name)
                        continue
                    result.compared += 1
                    if expected.shape != written.shape:
                        result.mismatched.append(f"{name} (shape {tuple(expected.shape)} in the reference)")
                        continue
                    exact, diff = _compare(written, expected)
                    result.max_weight_diff = max(result.max_weight_diff, diff)
                    if not exact:
                        result.mismatched.append(name)
                    if _precision(expected) < _precision(written):
                        reference_less_precise = True
                    # The reference model gets the reference weights as they would be written at this dtype.
                    reference_state[name].copy_(expected.to(written.dtype))
        batch = model_format.dummy_batch(model.config)
        logits = model(**batch).logits
        reference_logits = reference_model(**batch).logits
    result.logits_finite = bool(torch.isfinite(logits).all())
    result.logits_max_diff = float((logits - reference_logits).abs().max())
    result.logits_exact = _bitwise_equal(logits, reference_logits)
    # Exact unless the reference is coarser than the file (bf16 engine weights vs an fp32 file).
    scale = float(reference_logits.abs().max())
    result.logits_tolerance = 0.0 if not reference_less_precise else 5e-2 * max(scale, 1.0)
    return result
