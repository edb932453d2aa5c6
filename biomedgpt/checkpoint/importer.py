"""Import released BiomedGPT/OFA checkpoints into this project's Hugging Face format.

Two source layouts are understood:

* ``fairseq`` -- a BiomedGPT/OFA training checkpoint ``.pt``: a pickled container with the weights under
  ``"model"`` (EMA weights under ``extra_state["ema"]``) and the run configuration under ``"cfg"`` (dict or
  OmegaConf) or, in older files, ``"args"`` (an ``argparse.Namespace``) (BiomedGPT trainer.py ``state_dict``,
  utils/checkpoint_utils.py). A bare state dict works too.
* ``hf-ofa`` -- a directory written by the transformers OFA port (``config.json`` with ``model_type: "ofa"``,
  ``pytorch_model.bin`` or ``model.safetensors``, optionally sharded, plus ``vocab.json``/``merges.txt``)
  (OFA-Sys/OFA branch feature/add_transformers, transformers/src/transformers/models/ofa/modeling_ofa.py).

The work is split the way torchtitan's state-dict adapters split it: a :class:`StateDictAdapter` per layout
renames keys into ours (our module tree follows the fairseq layout, so fairseq needs no renames; the HF port
renamed seven fragments), drops what this model rebuilds (``*.version``, the relative-position bucket tables,
the decoder's ``image_position_idx``, whose length differs between fairseq (1026) and HF (1025), see taokz/BiomedGPT
issue #39) and folds the tied embedding, stored up to three times, into one tensor after checking the copies are
equal. Then the architecture is read from the tensor shapes (:func:`infer_shapes`) and from the checkpoint's own
configuration; the model is first built on the meta device so that every missing, unexpected or mis-shaped
key is found before anything is allocated or written, and errors name the likely cause (wrong size, missing
NormFormer flags).

Loading a fairseq ``.pt`` unpickles arbitrary objects: import only checkpoints from sources you trust. A safe
``weights_only`` load is tried first; containers holding an ``argparse.Namespace``, OmegaConf objects or NumPy
scalars fall back to a full unpickle in which classes of modules that are not installed (``omegaconf``,
``fairseq``) become inert placeholders, so neither package is needed.
"""

from __future__ import annotations

import argparse
import enum
import io
import json
import math
import pickle
import re
import shutil
import tempfile
import types
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from biomedgpt.checkpoint.errors import CheckpointImportError
from biomedgpt.model.config import MODEL_SIZES, RESNET_LAYERS, BiomedGPTConfig, size_settings
from biomedgpt.output_dirs import check_output_dir, replace_output_dir, staging_dir

__all__ = [
    "FAIRSEQ",
    "FAIRSEQ_ADAPTER",
    "FAIRSEQ_SIZE_NAMES",
    "HF_OFA",
    "HF_OFA_ADAPTER",
    "REPORT_NAME",
    "AdaptedStateDict",
    "CheckpointImportError",
    "CheckpointShapes",
    "ImportReport",
    "LoadedSource",
    "StateDictAdapter",
    "import_checkpoint",
    "infer_shapes",
    "load_source",
    "resolve_config",
    "tokenizer_from_hf_vocab",
]

FAIRSEQ = "fairseq"
HF_OFA = "hf-ofa"
REPORT_NAME = "import_report.json"
TOOL = "biomedgpt-import"

# OFA architecture names (``--arch``, registered in BiomedGPT models/ofa/ofa.py) -> our size names.
FAIRSEQ_SIZE_NAMES = {
    "ofa_tiny": "tiny",
    "ofa_medium": "medium",
    "ofa_base": "base",
    "ofa_large": "large",
    "ofa_huge": "xlarge",
}

TIED_EMBEDDING_KEYS = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "decoder.output_projection.weight")
# Buffers that are not learned: this model rebuilds them (and does not save them).
_REBUILT = re.compile(r"(?:^|\.)version$|(?:^|\.)(?:token|image)_rp_bucket$|^decoder\.image_position_idx$")
# Parameters the NormFormer flags (--scale-attn/--scale-fc/--scale-heads) add, after renaming to our names.
_NORMFORMER_KEY = re.compile(r"\.(attn_ln|self_attn_ln|cross_attn_ln|ffn_layernorm)\.(weight|bias)$|\.c_attn$")
_LAYER_INDEX = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.")
_RESNET_BLOCK = re.compile(r"^encoder\.embed_images\.layer([123])\.(\d+)\.")


# ------------------------------------------------------------------------------------------- state-dict adapters


@dataclass
class AdaptedStateDict:
    """A state dict in our key names plus what the adapter did to get there."""

    state_dict: dict[str, torch.Tensor]
    renamed: dict[str, str] = field(default_factory=dict)  # source key -> our key
    dropped: dict[str, str] = field(default_factory=dict)  # source key -> why
    stripped_prefix: str | None = None


@dataclass(frozen=True)
class StateDictAdapter:
    """Maps one source layout's keys onto ours: ``(regex, replacement)`` renames applied in order, and back."""

    layout: str
    renames: tuple[tuple[str, str], ...]
    strip_prefix: str | None = None  # some exports nest everything under e.g. "model."
    inverse: tuple[tuple[str, str], ...] = ()  # our names -> this layout's, for messages about absent keys

    def rename(self, key: str) -> str:
        for pattern, replacement in self.renames:
            key = re.sub(pattern, replacement, key)
        return key

    def source_key(self, ours: str, prefix: str | None = None) -> str:
        """The name our key ``ours`` has in this layout (``prefix``: the one :meth:`to_ours` stripped)."""
        for pattern, replacement in self.inverse:
            ours = re.sub(pattern, replacement, ours)
        return (prefix or "") + ours

    def to_ours(self, state_dict: Mapping[str, Any]) -> AdaptedStateDict:
        """Rename, drop rebuilt buffers, fold the tied embedding copies into ``encoder.embed_tokens.weight``."""
        keys = list(state_dict)
        strip = self.strip_prefix
        if strip and not (keys and all(k.startswith(strip) for k in keys)):
            strip = None
        out: dict[str, torch.Tensor] = {}
        renamed: dict[str, str] = {}
        dropped: dict[str, str] = {}
        for key in keys:
            value = state_dict[key]
            ours = self.rename(key[len(strip) :] if strip else key)
            if ours != key:
                renamed[key] = ours
            if _REBUILT.search(ours):
                dropped[key] = _rebuilt_reason(ours, value)
                continue
            if not isinstance(value, torch.Tensor):
                dropped[key] = f"not a tensor ({type(value).__name__})"
                continue
            if ours in out:
                raise CheckpointImportError(f"two checkpoint keys map to {ours!r} (the second is {key!r})")
            out[ours] = value
        _fold_tied_embedding(out, dropped)
        return AdaptedStateDict(out, renamed, dropped, strip)


def _rebuilt_reason(key: str, value: Any) -> str:
    if key.endswith("version"):
        return "fairseq module version marker"
    if key == "decoder.image_position_idx":
        length = tuple(value.shape)[0] if isinstance(value, torch.Tensor) and value.dim() else "?"
        return f"non-learned buffer rebuilt by the model (length {length}; fairseq saves 1026, the HF port 1025)"
    return "non-learned buffer rebuilt by the model"


def _fold_tied_embedding(state_dict: dict[str, torch.Tensor], dropped: dict[str, str]) -> None:
    present = [k for k in TIED_EMBEDDING_KEYS if k in state_dict]
    if not present:
        return
    keep = state_dict[present[0]]
    for key in present[1:]:
        other = state_dict.pop(key)
        if other.shape != keep.shape or not torch.equal(other.to(keep.dtype), keep):
            raise CheckpointImportError(
                f"{key} differs from {present[0]}: the checkpoint's embeddings are not tied (trained without "
                "--share-all-embeddings?); this model has one matrix for encoder input, decoder input and output "
                "projection, so it cannot hold this checkpoint"
            )
        dropped[key] = f"copy of the tied embedding (equal to {present[0]})"
    del state_dict[present[0]]
    state_dict["encoder.embed_tokens.weight"] = keep


# Our module tree follows fairseq's (the module names of BiomedGPT models/ofa/), so its keys need no renaming.
FAIRSEQ_ADAPTER = StateDictAdapter(FAIRSEQ, renames=())

# The transformers OFA port renamed these fragments of the layer keys (OFA-Sys/OFA feature/add_transformers
# modeling_ofa.py OFAEncoderLayer/OFADecoderLayer): (side, the port's name, ours). The patterns end in a dot so that
# "cross_attn." leaves the LayerNorm names that start with it (cross_attn_layer_norm, ...) to their own rules.
_HF_OFA_FRAGMENTS = (
    ("encoder", "self_attn_mid_layer_norm", "attn_ln"),
    ("decoder", "self_attn_mid_layer_norm", "self_attn_ln"),
    ("encoder", "ffn_layer_norm", "ffn_layernorm"),
    ("decoder", "ffn_layer_norm", "ffn_layernorm"),
    ("decoder", "cross_attn", "encoder_attn"),
    ("decoder", "cross_attn_layer_norm", "encoder_attn_layer_norm"),
    ("decoder", "cross_attn_mid_layer_norm", "cross_attn_ln"),
)


def _layer_renames(fragments: Iterable[tuple[str, str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple(
        (rf"^{side}\.layers\.(\d+)\.{re.escape(old)}\.", rf"{side}.layers.\1.{new}.") for side, old, new in fragments
    )


HF_OFA_ADAPTER = StateDictAdapter(
    HF_OFA,
    renames=_layer_renames(_HF_OFA_FRAGMENTS),
    strip_prefix="model.",
    inverse=_layer_renames((side, ours, theirs) for side, theirs, ours in _HF_OFA_FRAGMENTS),
)

_HF_MARKER = re.compile(r"\.(self_attn_mid_layer_norm|ffn_layer_norm|cross_attn_layer_norm)\.|\.cross_attn\.")


def detect_layout(state_dict: Mapping[str, Any]) -> str:
    """``hf-ofa`` when any key carries a name only the transformers port uses, else ``fairseq``."""
    return HF_OFA if any(_HF_MARKER.search(k) for k in state_dict) else FAIRSEQ


# ------------------------------------------------------------------------------------------- shape inference


@dataclass
class CheckpointShapes:
    """Architecture read off the tensors themselves (None where the tensors do not tell)."""

    vocab_size: int
    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_attention_heads: int | None
    decoder_attention_heads: int | None
    encoder_ffn_dim: int | None
    decoder_ffn_dim: int | None
    resnet_blocks: tuple[int, int, int] | None
    resnet_type: str | None
    max_position_embeddings: int | None
    token_bucket_size: int | None
    image_bucket_size: int | None
    normformer_parts: dict[str, bool]

    @property
    def normformer(self) -> bool | None:
        """True/False when the NormFormer parameters are all present/absent; None when only some are."""
        parts = set(self.normformer_parts.values())
        return parts.pop() if len(parts) == 1 else None

    def size_name(self) -> str | None:
        """The published size these shapes are, or failing that the one with this d_model."""
        exact = [
            name
            for name, s in MODEL_SIZES.items()
            if (s["d_model"], s["encoder_layers"], s["decoder_layers"], s["ffn_dim"], s["heads"], s["resnet_type"])
            == (
                self.d_model,
                self.encoder_layers,
                self.decoder_layers,
                self.encoder_ffn_dim,
                self.encoder_attention_heads,
                self.resnet_type,
            )
        ]
        if exact:
            return exact[0]
        return next((name for name, s in MODEL_SIZES.items() if s["d_model"] == self.d_model), None)

    def config_kwargs(self) -> dict[str, Any]:
        """BiomedGPTConfig arguments these shapes determine."""
        values = {
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "encoder_layers": self.encoder_layers,
            "decoder_layers": self.decoder_layers,
            "encoder_attention_heads": self.encoder_attention_heads,
            "decoder_attention_heads": self.decoder_attention_heads,
            "encoder_ffn_dim": self.encoder_ffn_dim,
            "decoder_ffn_dim": self.decoder_ffn_dim,
            "resnet_type": self.resnet_type,
            "max_position_embeddings": self.max_position_embeddings,
            "token_bucket_size": self.token_bucket_size,
            "image_bucket_size": self.image_bucket_size,
            "normformer": self.normformer,
        }
        return {k: v for k, v in values.items() if v is not None}


def _rows(state_dict: Mapping[str, torch.Tensor], key: str, dim: int = 0) -> int | None:
    tensor = state_dict.get(key)
    return None if tensor is None or tensor.dim() <= dim else int(tensor.shape[dim])


def infer_shapes(state_dict: Mapping[str, torch.Tensor]) -> CheckpointShapes:
    """Read the architecture from a state dict in our key names (after :meth:`StateDictAdapter.to_ours`)."""
    embedding = state_dict.get("encoder.embed_tokens.weight")
    if embedding is None or embedding.dim() != 2:
        sample = ", ".join(sorted(state_dict)[:5])
        raise CheckpointImportError(
            f"no token embedding (encoder.embed_tokens.weight) in the checkpoint: not a BiomedGPT/OFA model? "
            f"First keys: {sample}"
        )
    layers = {"encoder": -1, "decoder": -1}
    blocks = [0, 0, 0]
    for key in state_dict:
        if match := _LAYER_INDEX.match(key):
            layers[match[1]] = max(layers[match[1]], int(match[2]))
        if match := _RESNET_BLOCK.match(key):
            stage = int(match[1]) - 1
            blocks[stage] = max(blocks[stage], int(match[2]) + 1)
    resnet_blocks = tuple(blocks) if any(blocks) else None
    resnet_type = next((name for name, depth in RESNET_LAYERS.items() if depth == resnet_blocks), None)

    def heads(side: str) -> int | None:
        # The relative-position tables have one column per head whether or not c_attn exists.
        return _rows(state_dict, f"{side}.token_rel_pos_table_list.0.weight", 1) or _rows(
            state_dict, f"{side}.layers.0.self_attn.c_attn"
        )

    positions = _rows(state_dict, "encoder.embed_positions.weight")
    image_positions = _rows(state_dict, "encoder.embed_image_positions.weight")
    image_grid = None
    if image_positions is not None and math.isqrt(image_positions - 1) ** 2 == image_positions - 1:
        image_grid = math.isqrt(image_positions - 1)
    token_table = _rows(state_dict, "encoder.token_rel_pos_table_list.0.weight")
    parts = {
        "attn_ln": any(re.search(r"\.(attn_ln|self_attn_ln|cross_attn_ln)\.", k) for k in state_dict),
        "ffn_layernorm": any(".ffn_layernorm." in k for k in state_dict),
        "c_attn": any(k.endswith(".c_attn") for k in state_dict),
    }
    return CheckpointShapes(
        vocab_size=int(embedding.shape[0]),
        d_model=int(embedding.shape[1]),
        encoder_layers=layers["encoder"] + 1,
        decoder_layers=layers["decoder"] + 1,
        encoder_attention_heads=heads("encoder"),
        decoder_attention_heads=heads("decoder"),
        encoder_ffn_dim=_rows(state_dict, "encoder.layers.0.fc1.weight"),
        decoder_ffn_dim=_rows(state_dict, "decoder.layers.0.fc1.weight"),
        resnet_blocks=resnet_blocks,  # type: ignore[arg-type]
        resnet_type=resnet_type,
        max_position_embeddings=None if positions is None else positions - 2,
        token_bucket_size=None if token_table is None else (token_table + 1) // 2,
        image_bucket_size=image_grid,
        normformer_parts=parts,
    )


# ------------------------------------------------------------------------------------------- reading sources


class _Placeholder:
    """Stands in for an instance of a class whose module is not installed; keeps what pickle hands it."""

    _pickled_class = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Placeholder:
        obj = super().__new__(cls)
        obj.__dict__["_args"] = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # called by REDUCE; __new__ kept the arguments
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict state, slot state)
        self.__dict__["_state"] = state

    def __repr__(self) -> str:
        return f"<unpickled {self._pickled_class}>"


class _PermissiveUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            # omegaconf / fairseq classes inside "cfg": keep their data, lose their behaviour.
            return type(name, (_Placeholder,), {"_pickled_class": f"{module}.{name}"})


def _permissive_pickle_module() -> types.ModuleType:
    module = types.ModuleType("biomedgpt_permissive_pickle")
    module.Unpickler = _PermissiveUnpickler  # type: ignore[attr-defined]
    module.load = lambda file, **kw: _PermissiveUnpickler(file, **kw).load()  # type: ignore[attr-defined]
    module.loads = lambda data, **kw: _PermissiveUnpickler(io.BytesIO(data), **kw).load()  # type: ignore[attr-defined]
    return module


def _to_plain(obj: Any, depth: int = 0) -> Any:
    """Configuration objects (dict, Namespace, OmegaConf or its placeholders, enums) -> plain Python data."""
    if depth > 50:
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, enum.Enum):
        return obj.value if isinstance(obj.value, (str, int, float, bool)) else obj.name
    if isinstance(obj, Mapping):
        return {str(k): _to_plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v, depth + 1) for v in obj]
    if isinstance(obj, argparse.Namespace):
        return {k: _to_plain(v, depth + 1) for k, v in vars(obj).items()}
    if isinstance(obj, _Placeholder):
        state = obj.__dict__.get("_state")
        if isinstance(state, dict):
            if "_content" in state:  # OmegaConf DictConfig / ListConfig
                return _to_plain(state["_content"], depth + 1)
            if "_val" in state:  # OmegaConf value node
                return _to_plain(state["_val"], depth + 1)
            return {k: _to_plain(v, depth + 1) for k, v in state.items() if not k.startswith("_")}
        args = obj.__dict__.get("_args") or ()
        return _to_plain(args[0], depth + 1) if len(args) == 1 else repr(obj)
    if type(obj).__module__.startswith("omegaconf"):  # omegaconf installed: real DictConfig
        from omegaconf import OmegaConf  # type: ignore[import-not-found]

        return OmegaConf.to_container(obj, resolve=False, enum_to_str=True)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        try:
            return obj.item()
        except (TypeError, ValueError, RuntimeError):
            pass
    return repr(obj)


@dataclass
class LoadedSource:
    """What a source holds, before any renaming."""

    path: Path
    container: str  # "fairseq-container", "state-dict", "hf-directory"
    state_dict: dict[str, Any]
    weights: str  # "model", "ema", "ema+ema_fp32_params", "model.safetensors", ...
    model_cfg: dict[str, Any] | None = None  # fairseq cfg.model / args, or HF config.json
    task_cfg: dict[str, Any] | None = None  # fairseq cfg.task / args
    unpickle_mode: str | None = None
    vocab_files: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _torch_load(path: Path) -> tuple[Any, str]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True), "weights_only"
    except Exception as exc:  # the container holds more than tensors (Namespace, OmegaConf, NumPy scalars...)
        safe_error = exc
    try:
        data = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_permissive_pickle_module())
    except Exception as exc:
        raise CheckpointImportError(f"cannot read {path}: {exc} (weights-only load: {safe_error})") from exc
    return data, "full (placeholders for classes of uninstalled modules)"


def _looks_like_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _load_fairseq_file(path: Path, ema: bool) -> LoadedSource:
    data, mode = _torch_load(path)
    if _looks_like_state_dict(data):
        if ema:
            raise CheckpointImportError(f"{path} is a bare state dict: it holds no EMA weights (--ema)")
        return LoadedSource(path, "state-dict", dict(data), "state dict", unpickle_mode=mode)
    if not isinstance(data, Mapping) or "model" not in data:
        top = sorted(data)[:8] if isinstance(data, Mapping) else type(data).__name__
        raise CheckpointImportError(
            f"{path} is neither a fairseq checkpoint (no 'model' entry) nor a state dict: {top}"
        )
    notes: list[str] = []
    cfg = _to_plain(data.get("cfg"))
    args = _to_plain(data.get("args"))
    model_cfg = task_cfg = None
    if isinstance(cfg, dict) and (cfg.get("model") or cfg.get("task")):
        model_cfg = cfg.get("model") if isinstance(cfg.get("model"), dict) else None
        task_cfg = cfg.get("task") if isinstance(cfg.get("task"), dict) else None
    if model_cfg is None and isinstance(args, dict):  # legacy checkpoints: one flat argparse namespace
        model_cfg = task_cfg = args
    if model_cfg is None:
        notes.append("checkpoint has no cfg/args: architecture inferred from tensor shapes only")

    weights = "model"
    state_dict = data["model"]
    if ema:
        extra = data.get("extra_state") or {}
        if not isinstance(extra, Mapping) or not _looks_like_state_dict(extra.get("ema")):
            raise CheckpointImportError(
                f"{path} has no EMA weights (extra_state['ema']): it was saved without --store-ema; "
                "import it without --ema"
            )
        state_dict = dict(extra["ema"])
        weights = "ema"
        fp32 = extra.get("ema_fp32_params")
        if isinstance(fp32, Mapping) and fp32:
            # With --ema-fp32 the exact averages live here; "ema" holds them cast to the training dtype.
            unknown = [k for k in fp32 if k not in state_dict]
            if unknown:
                raise CheckpointImportError(
                    f"extra_state['ema_fp32_params'] has keys not in the EMA weights: {unknown[:5]}"
                )
            state_dict.update({k: v for k, v in fp32.items() if isinstance(v, torch.Tensor)})
            weights = "ema+ema_fp32_params"
    if not _looks_like_state_dict(state_dict):
        raise CheckpointImportError(f"{path}: the {weights!r} entry is not a state dict of tensors")
    return LoadedSource(path, "fairseq-container", dict(state_dict), weights, model_cfg, task_cfg, mode, notes=notes)


def _load_hf_directory(path: Path, ema: bool) -> LoadedSource:
    if ema:
        raise CheckpointImportError("--ema applies to fairseq .pt checkpoints; a transformers directory has one set")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointImportError(f"{path} is a directory without config.json: not a transformers checkpoint")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    if model_type == BiomedGPTConfig.model_type:
        raise CheckpointImportError(f"{path} is already in this project's format (model_type 'biomedgpt')")
    notes = []
    if model_type != "ofa":
        notes.append(f"config.json model_type is {model_type!r}, not 'ofa': read as the transformers OFA port")

    from safetensors.torch import load_file

    state_dict: dict[str, Any] = {}
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index_path, single_path = path / index_name, path / single
        if index_path.is_file():
            shards = sorted(set(json.loads(index_path.read_text(encoding="utf-8"))["weight_map"].values()))
            files = [path / s for s in shards]
            weights = f"{index_name} ({len(files)} shards)"
        elif single_path.is_file():
            files, weights = [single_path], single
        else:
            continue
        for file in files:
            part = (
                load_file(file)
                if file.suffix == ".safetensors"
                else torch.load(file, map_location="cpu", weights_only=True)
            )
            state_dict.update(part)
        break
    else:
        raise CheckpointImportError(f"{path} has no model.safetensors or pytorch_model.bin (nor a sharded index)")
    vocab = {name: path / name for name in ("vocab.json", "merges.txt", "added_tokens.json") if (path / name).is_file()}
    return LoadedSource(path, "hf-directory", state_dict, weights, model_cfg=config, vocab_files=vocab, notes=notes)


def load_source(source: str | Path, ema: bool = False) -> LoadedSource:
    """Read a fairseq ``.pt`` (or bare state dict file) or a transformers OFA directory."""
    path = Path(source)
    if path.is_dir():
        return _load_hf_directory(path, ema)
    if path.is_file():
        return _load_fairseq_file(path, ema)
    raise CheckpointImportError(f"checkpoint not found: {path}")


# ------------------------------------------------------------------------------------------- configuration


def _declared(values: Mapping[str, Any] | None, key: str) -> Any:
    """A configuration value, or None when absent or an unresolved ${...} interpolation."""
    if not values:
        return None
    value = values.get(key)
    if isinstance(value, str) and value.startswith("${"):
        return None
    return value


def config_from_fairseq(
    model_cfg: Mapping[str, Any] | None, task_cfg: Mapping[str, Any] | None
) -> tuple[dict[str, Any], list[str]]:
    """BiomedGPTConfig arguments declared by a fairseq cfg.model / cfg.task (or legacy args), and warnings."""
    kwargs: dict[str, Any] = {}
    warnings: list[str] = []
    if not model_cfg:
        return kwargs, warnings
    arch = _declared(model_cfg, "arch") or _declared(model_cfg, "_name")
    if arch in FAIRSEQ_SIZE_NAMES:  # the arch presets fill what the cfg leaves out
        kwargs.update(size_settings(FAIRSEQ_SIZE_NAMES[arch]))
    renames = {
        "encoder_layers": "encoder_layers",
        "decoder_layers": "decoder_layers",
        "encoder_attention_heads": "encoder_attention_heads",
        "decoder_attention_heads": "decoder_attention_heads",
        "encoder_ffn_embed_dim": "encoder_ffn_dim",
        "decoder_ffn_embed_dim": "decoder_ffn_dim",
        "resnet_type": "resnet_type",
        "token_bucket_size": "token_bucket_size",
        "image_bucket_size": "image_bucket_size",
        "code_image_size": "code_image_size",
        "attn_scale_factor": "attn_scale_factor",
        "dropout": "dropout",
        "attention_dropout": "attention_dropout",
        "activation_dropout": "activation_dropout",
        "encoder_drop_path_rate": "encoder_drop_path_rate",
        "decoder_drop_path_rate": "decoder_drop_path_rate",
        "resnet_drop_path_rate": "resnet_drop_path_rate",
    }
    for theirs, ours in renames.items():
        value = _declared(model_cfg, theirs)
        if value is not None:
            kwargs[ours] = value
    enc_dim, dec_dim = _declared(model_cfg, "encoder_embed_dim"), _declared(model_cfg, "decoder_embed_dim")
    if enc_dim is not None and dec_dim is not None and enc_dim != dec_dim:
        raise CheckpointImportError(f"encoder_embed_dim={enc_dim} != decoder_embed_dim={dec_dim}: unsupported")
    if (enc_dim or dec_dim) is not None:
        kwargs["d_model"] = enc_dim or dec_dim
    src, tgt = _declared(model_cfg, "max_source_positions"), _declared(model_cfg, "max_target_positions")
    if src is not None and tgt is not None and src != tgt:
        raise CheckpointImportError(
            f"max_source_positions={src} != max_target_positions={tgt}: this model has one max_position_embeddings"
        )
    if (src or tgt) is not None:
        kwargs["max_position_embeddings"] = src or tgt
    flags = {name: bool(_declared(model_cfg, name)) for name in ("scale_attn", "scale_fc", "scale_heads")}
    if any(_declared(model_cfg, name) is not None for name in flags):
        if len(set(flags.values())) > 1:
            raise CheckpointImportError(
                f"the checkpoint was trained with only some NormFormer flags ({flags}); this model builds "
                "attn_ln, ffn_layernorm and c_attn together (normformer) or none of them"
            )
        kwargs["normformer"] = flags["scale_attn"]
    for task_key in ("num_bins", "code_dict_size"):
        value = _declared(task_cfg, task_key)
        if value is not None:
            kwargs[task_key] = value
    # Flags that change behaviour but not parameter names: this model implements only the BiomedGPT setting.
    checks = (
        ("encoder_normalize_before", False, "post-LN encoder; this model is pre-LN"),
        ("decoder_normalize_before", False, "post-LN decoder; this model is pre-LN"),
        ("no_scale_embedding", False, "embeddings scaled by sqrt(d_model); this model does not scale them"),
        ("entangle_position_embedding", True, "absolute positions added to embeddings; this model never adds them"),
        (
            "disable_entangle",
            False,
            "without --disable-entangle the fairseq decoder adds absolute positions to "
            "its token embeddings (OFA models/ofa/unify_transformer.py, TransformerDecoder); this model does not",
        ),
        ("scale_resids", True, "residual scaling (w_resid) is not implemented"),
        ("share_all_embeddings", False, "embeddings not shared; this model ties them"),
    )
    for key, bad, why in checks:
        value = _declared(model_cfg, key)
        if value is not None and bool(value) == bad:
            warnings.append(f"cfg.model.{key}={value}: {why}")
    activation = _declared(model_cfg, "activation_fn")
    if activation not in (None, "gelu"):
        warnings.append(f"cfg.model.activation_fn={activation!r}: this model uses exact GELU")
    return kwargs, warnings


_HF_CONFIG_KEYS = (
    "d_model",
    "encoder_layers",
    "decoder_layers",
    "encoder_attention_heads",
    "decoder_attention_heads",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "max_position_embeddings",
    "resnet_type",
    "normformer",
    "token_bucket_size",
    "image_bucket_size",
    "code_image_size",
    "attn_scale_factor",
    "dropout",
    "attention_dropout",
    "activation_dropout",
    "encoder_drop_path_rate",
    "decoder_drop_path_rate",
    "resnet_drop_path_rate",
    "init_std",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "decoder_start_token_id",
    "forced_eos_token_id",
)


def config_from_hf(config: Mapping[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """BiomedGPTConfig arguments declared by a transformers OFA ``config.json``, and warnings.

    The keys are those of configuration_ofa.py on the OFA-Sys/OFA branch feature/add_transformers.
    """
    kwargs: dict[str, Any] = {}
    warnings: list[str] = []
    if not config:
        return kwargs, warnings
    for key in _HF_CONFIG_KEYS:
        if config.get(key) is not None:
            kwargs[key] = config[key]
    checks = (
        ("scale_embedding", True, "embeddings scaled by sqrt(d_model); this model does not scale them"),
        ("encoder_normalize_before", False, "post-LN encoder; this model is pre-LN"),
        ("decoder_normalize_before", False, "post-LN decoder; this model is pre-LN"),
        ("entangle_position_embedding", True, "absolute positions added to embeddings; this model never adds them"),
        ("share_decoder_input_output_embed", False, "untied output projection; this model ties it"),
    )
    for key, bad, why in checks:
        if key in config and bool(config[key]) == bad:
            warnings.append(f"config.json {key}={config[key]}: {why}")
    if config.get("activation_function", "gelu") != "gelu":
        warnings.append(
            f"config.json activation_function={config['activation_function']!r}: this model uses exact GELU"
        )
    return kwargs, warnings


def resolve_config(
    shapes: CheckpointShapes,
    declared: Mapping[str, Any] | None = None,
    size: str | None = None,
    normformer: bool | None = None,
) -> tuple[BiomedGPTConfig, dict[str, str]]:
    """The config to build: tensor shapes, overridden by the checkpoint's declared config, by ``size`` (a
    published preset) and by ``normformer``. The vocabulary size is always the embedding's row count.

    Returns the config and, per architecture key, where its value came from. Disagreements with the shapes are
    not resolved here: :func:`check_state_dict` reports them as errors with hints.
    """
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}

    def apply(new: Mapping[str, Any], label: str) -> None:
        for key, value in new.items():
            values[key] = value
            origin[key] = label

    apply(shapes.config_kwargs(), "shapes")
    if shapes.normformer is None and normformer is None and not (declared and "normformer" in declared):
        have = [p for p, on in shapes.normformer_parts.items() if on]
        lack = [p for p, on in shapes.normformer_parts.items() if not on]
        raise CheckpointImportError(
            f"the checkpoint has some NormFormer parameters ({', '.join(have)}) but not others ({', '.join(lack)}); "
            "this model builds attn_ln, ffn_layernorm and c_attn together (normformer) or none of them"
        )
    if declared:
        apply(declared, "checkpoint config")
    if size is not None:
        if size not in MODEL_SIZES:
            raise CheckpointImportError(f"unknown size {size!r}; choose one of {list(MODEL_SIZES)}")
        apply(size_settings(size), f"--size {size}")
    if normformer is not None:
        apply({"normformer": normformer}, "--normformer" if normformer else "--no-normformer")
    apply({"vocab_size": shapes.vocab_size}, "embedding rows")
    if "resnet_type" not in values:
        blocks = shapes.resnet_blocks
        raise CheckpointImportError(
            f"the ResNet in the checkpoint has {blocks} blocks in layer1-3, which is none of "
            f"{ {name: depth for name, depth in RESNET_LAYERS.items()} }"
            if blocks
            else "the checkpoint has no ResNet image backbone (encoder.embed_images.*) and no config naming one"
        )
    try:
        config = BiomedGPTConfig(**values)
    except (TypeError, ValueError) as exc:
        raise CheckpointImportError(f"cannot build a model config from the checkpoint: {exc}") from exc
    return config, origin


# ------------------------------------------------------------------------------------------- checking


@dataclass
class StateDictCheck:
    """How a state dict in our names fits a model built from a config."""

    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # key, model shape, checkpoint shape
    missing: list[str]
    defaulted: list[str]  # missing but harmless (BatchNorm batch counters)
    unexpected_architecture: list[str]  # would fit a model of another size / NormFormer setting
    unexpected_other: list[str]  # modules this model does not have (classification heads, adapters...)
    tied_aliases: list[str]


def _model_shapes(config: BiomedGPTConfig) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """Expected key -> shape of a model built from ``config`` (on the meta device: nothing is allocated)."""
    from biomedgpt.model.modeling import BiomedGPTForConditionalGeneration

    with torch.device("meta"):
        model = BiomedGPTForConditionalGeneration(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shared = model.get_input_embeddings().weight
    aliases = [n for n, p in model.named_parameters(remove_duplicate=False) if p is shared]
    return shapes, [a for a in aliases if a != "encoder.embed_tokens.weight"]


def check_state_dict(state_dict: Mapping[str, torch.Tensor], config: BiomedGPTConfig) -> StateDictCheck:
    expected, aliases = _model_shapes(config)
    for alias in aliases:
        expected.pop(alias, None)
    mismatched = [
        (k, expected[k], tuple(v.shape))
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    absent = [k for k in expected if k not in state_dict]
    defaulted = [k for k in absent if k.endswith("num_batches_tracked")]
    missing = [k for k in absent if k not in defaulted]
    unexpected_arch, unexpected_other = [], []
    for key in state_dict:
        if key in expected:
            continue
        as_first = re.sub(r"^((?:encoder|decoder)\.layers\.)\d+\.", r"\g<1>0.", key)
        as_first = re.sub(r"^(encoder\.embed_images\.layer[123]\.)\d+\.", r"\g<1>1.", as_first)
        as_first = re.sub(r"_list\.\d+\.", "_list.0.", as_first)
        architectural = _NORMFORMER_KEY.search(key) or as_first in expected
        (unexpected_arch if architectural else unexpected_other).append(key)
    return StateDictCheck(mismatched, missing, defaulted, unexpected_arch, unexpected_other, aliases)


def _size_with_d_model(d_model: int) -> str | None:
    return next((n for n, s in MODEL_SIZES.items() if s["d_model"] == d_model), None)


def mismatch_hints(shapes: CheckpointShapes, config: BiomedGPTConfig, origin: Mapping[str, str]) -> list[str]:
    """Human explanations of how the checkpoint's shapes differ from the config it is being loaded into."""
    hints = []
    if shapes.d_model != config.d_model:
        found, built = _size_with_d_model(shapes.d_model), _size_with_d_model(config.d_model)
        hints.append(
            f"checkpoint has d_model={shapes.d_model}: "
            + (f"looks like '{found}'" if found else "no published size")
            + (f", not '{built}'" if built else f", not d_model={config.d_model}")
            + f" ({origin.get('d_model', '?')})"
        )
    for key in (
        "encoder_layers",
        "decoder_layers",
        "encoder_attention_heads",
        "decoder_attention_heads",
        "encoder_ffn_dim",
        "decoder_ffn_dim",
        "max_position_embeddings",
        "token_bucket_size",
        "image_bucket_size",
    ):
        found = getattr(shapes, key)
        if found is not None and found != getattr(config, key):
            hints.append(f"checkpoint has {key}={found}, the model {getattr(config, key)} ({origin.get(key, '?')})")
    if shapes.resnet_blocks is not None and shapes.resnet_blocks != config.resnet_layers:
        found = shapes.resnet_type or f"blocks {shapes.resnet_blocks}"
        hints.append(
            f"checkpoint ResNet is {found} (layer1-3 blocks {shapes.resnet_blocks}), the model "
            f"{config.resnet_type} ({origin.get('resnet_type', '?')})"
        )
    have = shapes.normformer
    if have is None:
        present = [p for p, on in shapes.normformer_parts.items() if on]
        absent = [p for p, on in shapes.normformer_parts.items() if not on]
        hints.append(
            f"checkpoint has NormFormer parameters {present} but not {absent}; this model builds all of them "
            "(normformer) or none"
        )
    elif have is False and config.normformer:
        hints.append(
            "checkpoint lacks attn_ln/ffn_layernorm/c_attn: it was trained without "
            "--scale-attn/--scale-fc/--scale-heads; pass --no-normformer"
        )
    elif have is True and not config.normformer:
        hints.append(
            "checkpoint has attn_ln/ffn_layernorm/c_attn (trained with --scale-attn --scale-fc --scale-heads); "
            "drop --no-normformer"
        )
    guess = shapes.size_name()
    forced = [o for o in set(origin.values()) if o.startswith("--")]
    if hints and forced:
        instead = f"try --size {guess}, or " if guess and any(o.startswith("--size") for o in forced) else ""
        hints.append(f"{instead}leave out {' and '.join(sorted(forced))} to build the model from the checkpoint")
    elif hints and "checkpoint config" in origin.values():
        hints.append("the checkpoint's own config disagrees with its tensors: --ignore-cfg builds from the tensors")
    return hints


def _format_keys(keys: Iterable[str], limit: int = 12) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# ------------------------------------------------------------------------------------------- vocabulary


_CODE_OR_BIN = re.compile(r"^<(code|bin)_(\d+)>$")
_MADEUP = re.compile(r"^madeupword(_gap)?\d+$")


def tokenizer_from_hf_vocab(
    vocab_json: Path,
    merges_txt: Path,
    added_tokens_json: Path | None = None,
    num_codes: int | None = None,
    num_bins: int | None = None,
) -> tuple[Any, list[str]]:
    """Our GPT-2-BPE tokenizer from the HF OFA tokenizer files (BART ``vocab.json`` + ``merges.txt``).

    BART's ``vocab.json`` lists tokens by *fairseq* id: 0-3 specials, 4.. the text tokens in ``dict.txt``
    order, then ``<mask>``; OFA adds ``<code_k>`` and ``<bin_k>`` after it. GPT-2's own ids are not in these
    files, but our backend only needs *some* GPT-2 id per token and the dictionary line of that id, so the
    files written take "fairseq id - 4" as the GPT-2 id; BPE merges act on token strings, so tokenization is
    unchanged. Returns the tokenizer and notes.
    """
    from biomedgpt.tokenizer import DEFAULT_NUM_BINS, DEFAULT_NUM_CODES, BiomedGPTTokenizer

    notes: list[str] = []
    vocab: dict[str, int] = json.loads(vocab_json.read_text(encoding="utf-8"))
    added: dict[str, int] = {}
    if added_tokens_json is not None and added_tokens_json.is_file():
        added = json.loads(added_tokens_json.read_text(encoding="utf-8"))
    by_id: dict[int, str] = {}
    for token, idx in {**vocab, **added}.items():
        if idx in by_id and by_id[idx] != token:
            raise CheckpointImportError(f"{vocab_json.name}: id {idx} is both {by_id[idx]!r} and {token!r}")
        by_id[idx] = token
    specials = [by_id.get(i) for i in range(4)]
    if specials != ["<s>", "<pad>", "</s>", "<unk>"]:
        raise CheckpointImportError(f"{vocab_json.name}: ids 0-3 are {specials}, expected <s> <pad> </s> <unk>")
    text_end = vocab.get("<mask>")
    if text_end is None:
        raise CheckpointImportError(f"{vocab_json.name} has no <mask>: not a BART/OFA vocabulary")
    gaps = [i for i in range(4, text_end) if i not in by_id]
    if gaps:
        # Ids the HF tokenizer never produces (e.g. dictionary padding left out of vocab.json) still own an
        # embedding row: give them symbols BPE cannot produce.
        by_id.update({i: f"madeupword_gap{i}" for i in gaps})
        notes.append(f"{vocab_json.name} has no token for {len(gaps)} ids below <mask> ({gaps[:5]}...): placeholders")
    counts = {"code": 0, "bin": 0}
    for i in sorted(j for j in by_id if j > text_end):
        match = _CODE_OR_BIN.match(by_id[i])
        if not match:
            raise CheckpointImportError(f"{vocab_json.name}: id {i} ({by_id[i]!r}) after <mask> is not a code or bin")
        counts[match[1]] += 1
    codes = num_codes if num_codes is not None else (counts["code"] or DEFAULT_NUM_CODES)
    bins = num_bins if num_bins is not None else (counts["bin"] or DEFAULT_NUM_BINS)

    encoder: dict[str, int] = {}
    lines: list[str] = []
    for i in range(4, text_end):
        token = by_id[i]
        if _MADEUP.match(token) or _CODE_OR_BIN.match(token):
            lines.append(f"{token} 0")  # dictionary padding / special symbol, never produced by BPE
        else:
            encoder[token] = i - 4
            lines.append(f"{i - 4} 1")
    with tempfile.TemporaryDirectory(prefix="biomedgpt_vocab_") as tmp:
        directory = Path(tmp)
        (directory / "encoder.json").write_text(json.dumps(encoder, ensure_ascii=False), encoding="utf-8")
        (directory / "vocab.bpe").write_bytes(merges_txt.read_bytes())
        (directory / "dict.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        try:
            tokenizer = BiomedGPTTokenizer.from_gpt2_bpe(directory, num_codes=codes, num_bins=bins)
        except Exception as exc:  # tokenizers rejects merges whose pieces are not in the vocabulary
            raise CheckpointImportError(
                f"cannot build a BPE tokenizer from {vocab_json.name}/{merges_txt.name}: {exc}"
            ) from exc
    notes.append(
        "tokenizer written from vocab.json/merges.txt; its encoder.json numbers tokens by fairseq id - 4, "
        "not by GPT-2 id (same tokens, same model ids)"
    )
    return tokenizer, notes


def _check_tokenizer_size(tokenizer: Any, rows: int, origin: str) -> None:
    if len(tokenizer) == rows:
        return
    layout = (
        f"4 specials + {tokenizer.num_text_tokens} text + <mask> + {tokenizer.num_codes} codes + "
        f"{tokenizer.num_bins} bins = {len(tokenizer)}"
    )
    hint = ""
    if rows - len(tokenizer) == 1:
        hint = " (one row more: a trailing <mask>/extra symbol, or a dict.txt missing a line)"
    raise CheckpointImportError(
        f"tokenizer from {origin} has {layout} ids but the checkpoint embedding has {rows} rows{hint}; "
        "use the vocabulary files the checkpoint was trained with (BiomedGPT's utils/BPE gives 59457)"
    )


# ------------------------------------------------------------------------------------------- the import


@dataclass
class ImportReport:
    source: str
    output: str
    layout: str
    container: str
    weights: str
    unpickle_mode: str | None
    size_guess: str | None
    config_origin: dict[str, str]
    config: dict[str, Any]
    shapes: dict[str, Any]
    source_dtypes: dict[str, int]
    output_dtype: str
    parameters: int
    renamed: int
    renamed_examples: dict[str, str]
    dropped: dict[str, str]
    unexpected: list[str]
    missing: list[str]
    defaulted: list[str]
    tokenizer: dict[str, Any]
    warnings: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def import_checkpoint(
    source: str | Path,
    out_dir: str | Path,
    *,
    ema: bool = False,
    bpe_dir: str | Path | None = None,
    size: str | None = None,
    normformer: bool | None = None,
    ignore_cfg: bool = False,
    allow_missing: bool = False,
    strict: bool = False,
    dtype: str = "float32",
    overwrite: bool = False,
) -> ImportReport:
    """Convert ``source`` into ``out_dir`` (``save_pretrained`` model, tokenizer when known, report).

    Raises :class:`CheckpointImportError` before writing anything when the weights do not fit: shape
    mismatches, keys of another architecture, missing keys (unless ``allow_missing``), foreign keys when
    ``strict``, or a tokenizer whose size differs from the embedding's rows.
    """
    from biomedgpt.model.modeling import BiomedGPTForConditionalGeneration, count_trainable_parameters
    from biomedgpt.tokenizer import BiomedGPTTokenizer

    if dtype not in _DTYPES:
        raise CheckpointImportError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    check_output_dir(out, tool=TOOL, inputs=[source], overwrite=overwrite)  # OutputDirError, before any work

    loaded = load_source(source, ema=ema)
    layout = detect_layout(loaded.state_dict)
    if loaded.container == "hf-directory" and layout != HF_OFA:
        layout = HF_OFA  # e.g. a port without NormFormer layers: the renames are harmless then
    adapter = HF_OFA_ADAPTER if layout == HF_OFA else FAIRSEQ_ADAPTER
    adapted = adapter.to_ours(loaded.state_dict)
    state_dict = adapted.state_dict
    shapes = infer_shapes(state_dict)

    warnings = list(loaded.notes)
    declared: dict[str, Any] = {}
    if not ignore_cfg:
        if loaded.container == "hf-directory":
            declared, cfg_warnings = config_from_hf(loaded.model_cfg)
            stated_vocab = (loaded.model_cfg or {}).get("vocab_size")
            if stated_vocab is not None and stated_vocab != shapes.vocab_size:
                warnings.append(
                    f"config.json vocab_size={stated_vocab}, embedding has {shapes.vocab_size} rows: rows win"
                )
        else:
            declared, cfg_warnings = config_from_fairseq(loaded.model_cfg, loaded.task_cfg)
        warnings += cfg_warnings
    config, origin = resolve_config(shapes, declared, size=size, normformer=normformer)

    if not config.normformer:
        # The HF port builds c_attn even without NormFormer; left at ones it scales nothing and can go.
        for key in [k for k in state_dict if k.endswith(".c_attn")]:
            if bool(torch.all(state_dict[key] == 1)):
                del state_dict[key]
                adapted.dropped[key] = "c_attn of ones (identity head scaling) in a checkpoint without NormFormer"

    check = check_state_dict(state_dict, config)

    source_names = {ours: theirs for theirs, ours in adapted.renamed.items()}

    def named(keys: Iterable[str]) -> list[str]:
        # Our key names, and the checkpoint's own where it spells them differently (e.g. the port's
        # cross_attn_mid_layer_norm for our cross_attn_ln), so the user can find them in their file: the real source
        # key for tensors it has, the layout's name for those it lacks.
        out = []
        for key in keys:
            theirs = source_names.get(key) or (
                key if key in state_dict else adapter.source_key(key, adapted.stripped_prefix)
            )
            out.append(key if theirs == key else f"{key} ({layout} name {theirs})")
        return out

    errors: list[str] = []
    if check.mismatched:
        rows = [
            f"  {n}: model {list(m)}, checkpoint {list(c)}"
            for n, (_, m, c) in zip(named(k for k, _, _ in check.mismatched[:12]), check.mismatched[:12])
        ]
        more = f"\n  ... ({len(check.mismatched) - 12} more)" if len(check.mismatched) > 12 else ""
        errors.append(f"size mismatch for {len(check.mismatched)} tensors:\n" + "\n".join(rows) + more)
    if check.unexpected_architecture:
        errors.append(
            f"checkpoint tensors this model has no place for ({len(check.unexpected_architecture)}): "
            + _format_keys(named(check.unexpected_architecture))
        )
    if check.missing and not allow_missing:
        errors.append(
            f"missing from the checkpoint ({len(check.missing)}): {_format_keys(named(check.missing))}"
            " (--allow-missing keeps their fresh initialisation)"
        )
    if check.unexpected_other and strict:
        errors.append(
            f"unexpected keys ({len(check.unexpected_other)}): {_format_keys(named(check.unexpected_other))}"
            " (without --strict they are reported and left out)"
        )
    if errors:
        hints = mismatch_hints(shapes, config, origin)
        message = "cannot import {}:\n{}".format(loaded.path, "\n".join(errors))
        if hints:
            message += "\nhint: " + "\nhint: ".join(hints)
        raise CheckpointImportError(message)
    if check.unexpected_other:
        warnings.append(
            f"left out {len(check.unexpected_other)} unexpected keys: {_format_keys(named(check.unexpected_other))}"
        )
    if check.missing:
        warnings.append(
            f"{len(check.missing)} keys missing, left freshly initialised: {_format_keys(named(check.missing))}"
        )

    # The vocabulary is checked before anything is written.
    tokenizer = None
    tokenizer_info: dict[str, Any] = {"written": False}
    if bpe_dir is not None:
        try:
            tokenizer = BiomedGPTTokenizer.from_gpt2_bpe(
                Path(bpe_dir), num_codes=config.code_dict_size, num_bins=config.num_bins
            )
        except (OSError, ValueError) as exc:
            raise CheckpointImportError(f"--bpe-dir {bpe_dir}: {exc}") from exc
        origin_name = f"--bpe-dir {bpe_dir}"
    elif "vocab.json" in loaded.vocab_files and "merges.txt" in loaded.vocab_files:
        tokenizer, notes = tokenizer_from_hf_vocab(
            loaded.vocab_files["vocab.json"],
            loaded.vocab_files["merges.txt"],
            loaded.vocab_files.get("added_tokens.json"),
        )
        tokenizer_info["notes"] = notes
        origin_name = "vocab.json/merges.txt"
    else:
        origin_name = ""
        tokenizer_info["reason"] = (
            "no vocabulary files: pass --bpe-dir with encoder.json, vocab.bpe and dict.txt (BiomedGPT's utils/BPE)"
        )
        warnings.append("no tokenizer written: " + tokenizer_info["reason"])
    if tokenizer is not None:
        _check_tokenizer_size(tokenizer, shapes.vocab_size, origin_name)
        tokenizer_info.update(written=True, origin=origin_name, vocab_size=len(tokenizer), mask_id=tokenizer.mask_id)

    source_dtypes: dict[str, int] = {}
    for tensor in state_dict.values():
        name = str(tensor.dtype).removeprefix("torch.")
        source_dtypes[name] = source_dtypes.get(name, 0) + 1

    model = BiomedGPTForConditionalGeneration(config)
    with torch.no_grad():
        result = model.load_state_dict(state_dict, strict=False)
    leftover = set(result.missing_keys) - set(check.missing) - set(check.defaulted) - set(check.tied_aliases)
    if leftover:  # would mean check_state_dict and the real model disagree
        raise CheckpointImportError(f"internal: keys not loaded: {_format_keys(sorted(leftover))}")
    model = model.to(_DTYPES[dtype]).eval()

    report = ImportReport(
        source=str(loaded.path),
        output=str(out),
        layout=layout,
        container=loaded.container,
        weights=loaded.weights,
        unpickle_mode=loaded.unpickle_mode,
        size_guess=shapes.size_name(),
        config_origin=origin,
        config={k: getattr(config, k) for k in sorted(set(origin) | {"normformer", "code_dict_size", "num_bins"})},
        shapes=asdict(shapes),
        source_dtypes=source_dtypes,
        output_dtype=dtype,
        parameters=count_trainable_parameters(model),
        renamed=len(adapted.renamed),
        renamed_examples=dict(list(adapted.renamed.items())[:10]),
        dropped=adapted.dropped,
        unexpected=check.unexpected_other,
        missing=check.missing,
        defaulted=check.defaulted,
        tokenizer=tokenizer_info,
        warnings=warnings,
    )
    staging = staging_dir(out)  # the directory appears whole, with the manifest that lets --overwrite replace it
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")
        replace_output_dir(staging, out, tool=TOOL, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report
