"""biomedgpt-import against the key names and shapes of the public OFA code, not against our own state dict.

``fixtures/ofa_fairseq_state_dict_keys.json`` lists the state dict of the fairseq ``OFAModel`` that BiomedGPT trains
(taokz/BiomedGPT ``models/ofa``), ``fixtures/ofa_transformers_port_state_dict_keys.json`` that of the transformers
port (OFA-Sys/OFA branch ``feature/add_transformers``, ``modeling_ofa.py``); each file's ``about`` says how they were
produced. Checkpoints are built with exactly those keys, shapes and dtypes (seeded random values) in the container
each code base writes, and every source key must either land in the model or be dropped for a stated reason.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from biomedgpt import BiomedGPTConfig, BiomedGPTForConditionalGeneration
from biomedgpt.checkpoint.importer import (
    FAIRSEQ_ADAPTER,
    HF_OFA_ADAPTER,
    CheckpointImportError,
    check_state_dict,
    config_from_fairseq,
    config_from_hf,
    detect_layout,
    import_checkpoint,
    infer_shapes,
    resolve_config,
)
from biomedgpt.model.config import PUBLISHED_PARAMETER_COUNTS
from biomedgpt.model.modeling import count_trainable_parameters

FIXTURES = Path(__file__).parent / "fixtures"
FAIRSEQ_KEYS = json.loads((FIXTURES / "ofa_fairseq_state_dict_keys.json").read_text(encoding="utf-8"))
PORT_KEYS = json.loads((FIXTURES / "ofa_transformers_port_state_dict_keys.json").read_text(encoding="utf-8"))
# fixture size name -> ours (OFA's ofa_huge is our xlarge)
FAIRSEQ_SIZES = {"ofa_tiny": "tiny", "ofa_base": "base", "ofa_huge": "xlarge"}
PORT_SIZES = {"tiny": "tiny", "base": "base"}

EMBEDDING = "encoder.embed_tokens.weight"
TIED_COPIES = {"decoder.embed_tokens.weight", "decoder.output_projection.weight"}
# Non-learned buffers the model rebuilds itself.
REBUILT = {f"{side}.{name}_rp_bucket" for side in ("encoder", "decoder") for name in ("token", "image")} | {
    "decoder.image_position_idx"
}
VERSION_MARKERS = {"encoder.version", "decoder.version"}
# Everything else in a source state dict must be loaded into the model.
FAIRSEQ_DROPPED = REBUILT | TIED_COPIES | VERSION_MARKERS
PORT_DROPPED = REBUILT | TIED_COPIES


def test_fixtures_hold_what_their_header_says() -> None:
    """The key lists are whole models: every published size's parameter count, the NormFormer keys present."""
    for fixture, sizes in ((FAIRSEQ_KEYS, FAIRSEQ_SIZES), (PORT_KEYS, PORT_SIZES)):
        assert set(fixture["sizes"]) == set(sizes)
        assert {"repository", "commit", "files", "how"} <= set(fixture["about"])
        for name, ours in sizes.items():
            entry = fixture["sizes"][name]
            assert entry["parameters"] == PUBLISHED_PARAMETER_COUNTS[ours]
            assert entry["keys"][EMBEDDING] == [59457, BiomedGPTConfig.for_size(ours).d_model]
            assert all(entry["keys"][k] == entry["keys"][EMBEDDING] for k in TIED_COPIES)
            assert set(entry["dtypes"].values()) == {"int64"}
    assert "encoder.layers.0.attn_ln.weight" in FAIRSEQ_KEYS["sizes"]["ofa_tiny"]["keys"]
    assert "encoder.layers.0.self_attn_mid_layer_norm.weight" in PORT_KEYS["sizes"]["tiny"]["keys"]


@pytest.mark.parametrize("size", sorted(set(FAIRSEQ_SIZES) & {f"ofa_{s}" for s in PORT_SIZES}))
def test_port_keys_renamed_are_the_fairseq_keys(size: str) -> None:
    """Two code bases read independently: the importer's renames must turn one key list into the other."""
    fairseq = FAIRSEQ_KEYS["sizes"][size]["keys"]
    port = PORT_KEYS["sizes"][size.removeprefix("ofa_")]["keys"]
    renamed = {HF_OFA_ADAPTER.rename(k): shape for k, shape in port.items()}
    assert len(renamed) == len(port), "two port keys renamed onto one"
    expected = {k: shape for k, shape in fairseq.items() if k not in VERSION_MARKERS}
    assert sorted(renamed) == sorted(expected)
    differ = {k for k in renamed if renamed[k] != expected[k]}
    assert differ == {"decoder.image_position_idx"}  # 1025 entries in the port, 1026 in fairseq
    assert (renamed["decoder.image_position_idx"], expected["decoder.image_position_idx"]) == ([1025], [1026])
    assert all(FAIRSEQ_ADAPTER.rename(k) == k for k in fairseq)


def meta_state_dict(entry: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The fixture's keys as shape-only tensors; the tied matrix under its first name only (meta tensors cannot be
    compared, and a de-duplicating save keeps one name)."""
    return {
        key: torch.empty(shape, dtype=getattr(torch, entry["dtypes"].get(key, "float32")), device="meta")
        for key, shape in entry["keys"].items()
        if key not in TIED_COPIES
    }


CASES = [("fairseq", name, ours) for name, ours in FAIRSEQ_SIZES.items()] + [
    ("hf-ofa", name, ours) for name, ours in PORT_SIZES.items()
]


@pytest.mark.parametrize(("layout", "name", "ours"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_every_size_fits_key_for_key(layout: str, name: str, ours: str) -> None:
    """At every size in the fixtures the renamed keys are exactly the model's, with the model's shapes."""
    fixture = FAIRSEQ_KEYS if layout == "fairseq" else PORT_KEYS
    entry = fixture["sizes"][name]
    source = meta_state_dict(entry)
    assert detect_layout(source) == layout
    adapted = (FAIRSEQ_ADAPTER if layout == "fairseq" else HF_OFA_ADAPTER).to_ours(source)
    assert set(adapted.dropped) == (FAIRSEQ_DROPPED if layout == "fairseq" else PORT_DROPPED) - TIED_COPIES

    shapes = infer_shapes(adapted.state_dict)
    assert shapes.size_name() == ours and shapes.normformer is True
    if layout == "fairseq":
        declared, warnings = config_from_fairseq(entry["args"], {"num_bins": 1000, "code_dict_size": 8192})
    else:
        declared, warnings = config_from_hf(entry["config"])
    assert warnings == [], "the public code's own settings are the ones this model implements"
    config, _ = resolve_config(shapes, declared)
    check = check_state_dict(adapted.state_dict, config)
    assert check.mismatched == [] and check.missing == [] and check.defaulted == []
    assert check.unexpected_architecture == [] and check.unexpected_other == []
    assert sorted(check.tied_aliases) == sorted(TIED_COPIES)
    with torch.device("meta"):
        model = BiomedGPTForConditionalGeneration(config)
    assert count_trainable_parameters(model) == entry["parameters"]


# ------------------------------------------------------------------------------------------- real files, tiny size


def random_state_dict(entry: dict[str, Any], seed: int, float_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Seeded random tensors with exactly the fixture's keys, shapes and dtypes, the tied names sharing one tensor
    as in the saved state dict. The rebuilt int64 tables are zeros expanded from one element: the importer drops
    them by name, so only their shapes matter, and the file stays small."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, shape in entry["keys"].items():
        dtype = getattr(torch, entry["dtypes"].get(key, "float32"))
        if key in TIED_COPIES:
            state[key] = state[EMBEDDING]
        elif key in REBUILT:
            state[key] = torch.zeros((1,) * len(shape), dtype=dtype).expand(shape)
        elif dtype.is_floating_point:
            state[key] = torch.randn(shape, generator=gen).to(float_dtype)
        else:  # BatchNorm batch counters
            state[key] = torch.randint(1, 10**6, shape, generator=gen, dtype=dtype)
    return state


def save_fairseq_release(path: Path, state: dict[str, torch.Tensor], args: dict[str, Any]) -> Path:
    """The container of BiomedGPT's trainer.py ``Trainer.state_dict``: cfg made plain by OmegaConf.to_container, its
    ``model`` entry the argparse Namespace fairseq keeps for models registered without a dataclass."""
    cfg = {
        "common": {"fp16": True, "seed": 7},
        "model": argparse.Namespace(**args, _name=args["arch"]),
        "task": {"_name": "unify_task", "num_bins": 1000, "code_dict_size": 8192, "patch_image_size": 256},
    }
    container = {
        "args": None,
        "cfg": cfg,
        "model": state,
        "criterion": None,
        "optimizer_history": [{"criterion_name": "AdjustLabelSmoothedCrossEntropyCriterion", "num_updates": 3}],
        "task_state": {},
        "extra_state": {"metrics": {}, "previous_training_time": 1.0},
    }
    torch.save(container, path)
    return path


def save_port_release(directory: Path, state: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """What the port's ``save_pretrained(safe_serialization=False)`` writes: config.json + pytorch_model.bin."""
    directory.mkdir()
    torch.save(state, directory / "pytorch_model.bin")
    (directory / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def fairseq_release(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    entry = FAIRSEQ_KEYS["sizes"]["ofa_tiny"]
    # Every BiomedGPT script trains with --fp16, which leaves each floating tensor of the checkpoint in float16.
    state = random_state_dict(entry, seed=11, float_dtype=torch.float16)
    path = save_fairseq_release(tmp_path_factory.mktemp("fairseq") / "checkpoint_best.pt", state, entry["args"])
    return path, state


@pytest.fixture(scope="module")
def port_release(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    entry = PORT_KEYS["sizes"]["tiny"]
    state = random_state_dict(entry, seed=12, float_dtype=torch.float32)
    return save_port_release(tmp_path_factory.mktemp("port") / "OFA-tiny", state, entry["config"]), state


def assert_every_key_accounted(out: Path, source: dict[str, torch.Tensor], report: Any, dropped: set[str]) -> None:
    """Each source key is dropped for a reason or loaded, value for value, under its renamed key; every tensor of
    the model came from the checkpoint."""
    assert report.missing == [] and report.unexpected == [] and report.defaulted == []
    assert set(report.dropped) == dropped and all(report.dropped.values())
    loaded = BiomedGPTForConditionalGeneration.from_pretrained(out).state_dict()
    consumed = {HF_OFA_ADAPTER.rename(k) if report.layout == "hf-ofa" else k: k for k in source if k not in dropped}
    assert set(loaded) == set(consumed) | TIED_COPIES
    for ours, theirs in consumed.items():
        assert torch.equal(loaded[ours], source[theirs].to(loaded[ours].dtype)), theirs
    for copy in TIED_COPIES:
        assert torch.equal(loaded[copy], loaded[EMBEDDING])


def test_fairseq_release_imports_every_key(fairseq_release: tuple[Path, dict], tmp_path: Path) -> None:
    path, source = fairseq_release
    report = import_checkpoint(path, tmp_path / "out")
    assert (report.layout, report.container, report.weights) == ("fairseq", "fairseq-container", "model")
    kept = [k for k in source if k not in FAIRSEQ_DROPPED]
    assert report.source_dtypes == {
        "float16": sum(source[k].is_floating_point() for k in kept),
        "int64": sum(not source[k].is_floating_point() for k in kept),
    }
    assert report.size_guess == "tiny"
    assert report.parameters == FAIRSEQ_KEYS["sizes"]["ofa_tiny"]["parameters"]
    assert report.config_origin["d_model"] == "checkpoint config" and report.config["normformer"] is True
    # The real cfg.model raises none of the "this model does not implement ..." warnings.
    assert [w for w in report.warnings if not w.startswith("no tokenizer written")] == []
    assert_every_key_accounted(tmp_path / "out", source, report, FAIRSEQ_DROPPED)


def test_port_release_imports_every_key(port_release: tuple[Path, dict], tmp_path: Path) -> None:
    directory, source = port_release
    report = import_checkpoint(directory, tmp_path / "out")
    assert (report.layout, report.container, report.weights) == ("hf-ofa", "hf-directory", "pytorch_model.bin")
    assert report.size_guess == "tiny" and report.config_origin["d_model"] == "checkpoint config"
    assert report.parameters == PORT_KEYS["sizes"]["tiny"]["parameters"]
    assert [w for w in report.warnings if not w.startswith("no tokenizer written")] == []
    assert report.renamed == sum(HF_OFA_ADAPTER.rename(k) != k for k in source) > 0
    assert_every_key_accounted(tmp_path / "out", source, report, PORT_DROPPED)


# A key lost or named differently (as a model built with other code or flags would save it) is refused, and the
# error names what is missing; --strict also names the stray key.
MUTATIONS = [
    ("fairseq", "decoder.layers.2.self_attn_ln.weight", None, "decoder.layers.2.self_attn_ln.weight"),
    (
        "fairseq",
        "encoder.layers.1.ffn_layernorm.bias",
        "encoder.layers.1.ffn_ln.bias",
        "encoder.layers.1.ffn_layernorm.bias",
    ),
    ("fairseq", "encoder.embed_images.layer3.5.bn2.running_var", None, "encoder.embed_images.layer3.5.bn2.running_var"),
    (
        "hf-ofa",
        "decoder.layers.0.cross_attn_mid_layer_norm.weight",
        "decoder.layers.0.cross_attn_mid_ln.weight",
        "decoder.layers.0.cross_attn_mid_layer_norm.weight",
    ),
]


@pytest.mark.parametrize(("layout", "key", "new_name", "named"), MUTATIONS, ids=[m[1] for m in MUTATIONS])
def test_a_lost_or_renamed_key_is_named(
    layout: str,
    key: str,
    new_name: str | None,
    named: str,
    fairseq_release: tuple[Path, dict],
    port_release: tuple[Path, dict],
    tmp_path: Path,
) -> None:
    _, release = fairseq_release if layout == "fairseq" else port_release
    state = {(new_name if k == key else k): v for k, v in release.items() if new_name is not None or k != key}
    if layout == "fairseq":
        source = save_fairseq_release(tmp_path / "bad.pt", state, FAIRSEQ_KEYS["sizes"]["ofa_tiny"]["args"])
    else:
        source = save_port_release(tmp_path / "bad", state, PORT_KEYS["sizes"]["tiny"]["config"])
    with pytest.raises(CheckpointImportError, match=r"missing from the checkpoint \(1\)") as info:
        import_checkpoint(source, tmp_path / "out")
    assert re.search(rf"\b{re.escape(named)}\b", str(info.value)), str(info.value)
    assert not (tmp_path / "out").exists()
    if new_name is not None:
        with pytest.raises(CheckpointImportError, match=re.escape(new_name)):
            import_checkpoint(source, tmp_path / "out", strict=True)
