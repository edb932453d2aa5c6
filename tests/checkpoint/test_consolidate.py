"""``biomedgpt-consolidate``: real ZeRO-1/2/3 checkpoints from 2 CPU ranks -> Hugging Face model directories.

The checkpoints come from ``conftest.py`` (one torchrun launch); each variant also holds the state dict gathered from
the engine, the ground truth for the weights.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from biomedgpt.checkpoint.consolidate import (
    ConsolidationError,
    ZeroCheckpoint,
    _Flat,
    consolidate_checkpoint,
    model_layout,
    parse_size,
    verify_consolidated,
)
from biomedgpt.cli.consolidate import main, training_config_builder
from biomedgpt.model import BiomedGPTConfig, BiomedGPTForConditionalGeneration
from biomedgpt.output_dirs import MANIFEST_NAME
from biomedgpt.tokenizer import BiomedGPTTokenizer

TIED = {"decoder.embed_tokens.weight", "decoder.output_projection.weight"}
# The checkpoints conftest.py builds: variant -> ZeRO stage (checked against its variants.json).
STAGES = {"zero3": 3, "zero3_frozen": 3, "zero2": 2, "zero1_frozen": 1}
TAG = "step_00000002"


def read_output(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("model*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is no mapping)
                assert name not in tensors, f"{name} written twice"
                tensors[name] = handle.get_tensor(name)
    return tensors


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes: equality here is bit-for-bit (-0.0 vs 0.0, NaN payloads)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def gathered(root: Path, variant: str) -> dict[str, torch.Tensor]:
    return torch.load(root / variant / "gathered.pt", weights_only=True)


def copy_tag(root: Path, variant: str, destination: Path) -> Path:
    """The tag directory alone, without the config, tokenizer or ``latest`` next to it."""
    destination.mkdir(parents=True)
    shutil.copytree(root / variant / "ckpt" / TAG, destination / TAG)
    return destination


# ---------------------------------------------------------------------- no checkpoint needed


def test_parse_size() -> None:
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("500MB") == 500_000_000
    assert parse_size("1GiB") == 2**30
    assert parse_size("1.5kb") == 1500
    assert parse_size(123) == 123
    for bad in ("lots", "0MB", -1):
        with pytest.raises(ConsolidationError):
            parse_size(bad)


def test_flat_reads_ranges_across_parts() -> None:
    flat = _Flat([torch.arange(0, 3), torch.arange(3, 4), torch.arange(4, 9)])
    assert torch.cat(flat.pieces(2, 5)).tolist() == [2, 3, 4, 5, 6]
    assert torch.cat(flat.pieces(0, 9)).tolist() == list(range(9))
    with pytest.raises(IndexError):
        flat.pieces(5, 5)


def test_layout_keeps_the_key_transformers_saves(tmp_path: Path, small_config: BiomedGPTConfig) -> None:
    config = small_config
    layout, tied = model_layout(config)
    assert tied == {name: "encoder.embed_tokens.weight" for name in TIED}
    BiomedGPTForConditionalGeneration(config).save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        assert set(handle.keys()) == set(layout)  # noqa: SIM118
    assert not any("rp_bucket" in name or "image_position_idx" in name for name in layout)  # non-persistent


# ---------------------------------------------------------------------- real checkpoints


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(STAGES))
def test_matches_deepspeed_zero_to_fp32_bit_for_bit(zero_checkpoints: Path, tmp_path: Path, variant: str) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    built = json.loads((zero_checkpoints / "variants.json").read_text())
    assert built["tag"] == TAG and {name: v[0] for name, v in built["variants"].items()} == STAGES
    ckpt = zero_checkpoints / variant / "ckpt"
    result = consolidate_checkpoint(ckpt, tmp_path / "out", progress=False)
    assert (result.zero_stage, result.world_size, result.tag, result.step) == (STAGES[variant], 2, TAG, 2)
    written = read_output(tmp_path / "out")
    deepspeed_state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=TAG)
    engine_state = gathered(zero_checkpoints, variant)

    assert set(written) == set(engine_state) - TIED  # every persistent tensor, the tied ones once
    for name, tensor in deepspeed_state.items():
        key = result.tied.get(name, name)
        assert written[key].dtype == tensor.dtype == torch.float32 or not tensor.is_floating_point(), name
        assert torch.equal(bits(written[key]), bits(tensor)), name
    dropped = set(written) - set(deepspeed_state)
    if variant == "zero1_frozen":
        # DeepSpeed's zero_to_fp32 loses parameters frozen under ZeRO-1 (they are only in the module weights).
        assert dropped == {"encoder.embed_tokens.weight"}
    else:
        assert not dropped
    for name, tensor in written.items():  # and the engine's own weights, frozen and buffers included
        assert torch.equal(bits(tensor), bits(engine_state[name])), name


@pytest.mark.slow
def test_from_pretrained_restores_tie_buffers_and_tokenizer(zero_checkpoints: Path, tmp_path: Path) -> None:
    consolidate_checkpoint(zero_checkpoints / "zero3" / "ckpt", tmp_path / "out", progress=False)
    model, info = BiomedGPTForConditionalGeneration.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info
    embedding = model.encoder.embed_tokens.weight
    assert model.decoder.embed_tokens.weight is embedding and model.decoder.output_projection.weight is embedding
    engine_state = gathered(zero_checkpoints, "zero3")
    assert torch.equal(embedding, engine_state["encoder.embed_tokens.weight"])
    # BatchNorm statistics are buffers in DeepSpeed's model states: trained, not reinitialised.
    bn = model.encoder.embed_images.bn1
    assert torch.equal(bn.running_mean, engine_state["encoder.embed_images.bn1.running_mean"])
    assert bn.running_mean.abs().sum() > 0 and int(bn.num_batches_tracked) == 2
    assert torch.equal(
        model.encoder.token_rp_bucket, BiomedGPTForConditionalGeneration(model.config).encoder.token_rp_bucket
    )
    tokenizer = BiomedGPTTokenizer.from_pretrained(tmp_path / "out")
    assert len(tokenizer) == model.config.vocab_size == len(BiomedGPTTokenizer.default())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["BiomedGPTForConditionalGeneration"] and config["dtype"] == "float32"


@pytest.mark.slow
def test_cli_verify_against_engine_weights_and_deepspeed(
    zero_checkpoints: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = zero_checkpoints / "zero3" / "ckpt"
    reference = zero_checkpoints / "zero3" / "gathered.pt"
    assert main([str(ckpt), str(tmp_path / "a"), "--verify-against", str(reference), "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2, out  # stdout holds only the summary and the verdict (DeepSpeed's chatter goes to stderr)
    assert out[0].startswith(f"consolidated {ckpt / TAG} (ZeRO-3, 2 ranks") and "416 tensors" in out[0]
    assert out[1].startswith("verify OK: 416 tensors compared") and "bitwise equal" in out[1]

    # Default reference: DeepSpeed's own reader.
    assert main([str(ckpt), str(tmp_path / "b"), "--verify", "--no-progress"]) == 0
    assert "zero_to_fp32" in capsys.readouterr().out

    # A reference that differs in one weight fails verification with exit status 1.
    state = gathered(zero_checkpoints, "zero3")
    state["decoder.layers.0.fc1.weight"][0, 0] += 1.0
    torch.save(state, tmp_path / "tampered.pt")
    result = verify_consolidated(tmp_path / "a", tmp_path / "tampered.pt")
    assert not result.ok and result.mismatched == ["decoder.layers.0.fc1.weight"] and result.logits_max_diff > 0
    assert main([str(ckpt), str(tmp_path / "c"), "--verify-against", str(tmp_path / "tampered.pt")]) == 1
    assert "verify FAILED" in capsys.readouterr().out


@pytest.mark.slow
def test_bf16_output_in_small_shards(zero_checkpoints: Path, tmp_path: Path) -> None:
    ckpt = zero_checkpoints / "zero2" / "ckpt"
    fp32 = consolidate_checkpoint(ckpt, tmp_path / "fp32", progress=False)
    argv = [str(ckpt), str(tmp_path / "bf16"), "--dtype", "bf16", "--max-shard-size", "3MB", "--no-progress"]
    assert main([*argv, "--verify"]) == 0
    out = tmp_path / "bf16"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert not (out / "model.safetensors").exists()
    reference = read_output(tmp_path / "fp32")
    written = read_output(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in written.values())
    for shard in shards:  # only a tensor larger than the limit may overflow its (then single-tensor) shard
        with safe_open(str(shard), framework="pt") as handle:
            sizes = [handle.get_slice(k).get_shape() for k in handle.keys()]  # noqa: SIM118
            assert shard.stat().st_size <= 3_000_000 + 100_000 or len(sizes) == 1
    assert written.keys() == reference.keys() and len(fp32.shards) == 1
    for name, tensor in written.items():
        expected = reference[name]
        if expected.is_floating_point():
            assert tensor.dtype == torch.bfloat16 and torch.equal(bits(tensor), bits(expected.to(torch.bfloat16)))
        else:  # BatchNorm's num_batches_tracked stays an integer
            assert tensor.dtype == expected.dtype == torch.int64 and torch.equal(tensor, expected)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # bf16 engine weights (a bf16 run) against the fp32 master weights: equal at bf16, logits within tolerance.
    engine_bf16 = {
        k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in gathered(zero_checkpoints, "zero2").items()
    }
    check = verify_consolidated(tmp_path / "fp32", engine_bf16)
    assert check.ok and check.compared == 416 and check.max_weight_diff == 0 and not check.logits_exact, check.summary()
    model = BiomedGPTForConditionalGeneration.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.bfloat16 and model.decoder.output_projection.weight is model.encoder.embed_tokens.weight


@pytest.mark.slow
def test_streams_one_tensor_at_a_time(zero_checkpoints: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No second copy of the model: each tensor assembled from the rank partitions is written and dropped before
    the next is built (the rank files themselves are memory-mapped)."""
    alive: list[weakref.ref] = []
    most = 0
    original = ZeroCheckpoint.tensor

    def tracked(self: ZeroCheckpoint, name: str) -> torch.Tensor:
        nonlocal most
        tensor = original(self, name)
        alive[:] = [ref for ref in alive if ref() is not None]
        most = max(most, len(alive))
        if self.kind(name) in ("param", "frozen"):  # assembled from rank files (buffers are the file's own)
            alive.append(weakref.ref(tensor))
        return tensor

    monkeypatch.setattr(ZeroCheckpoint, "tensor", tracked)
    for variant in ("zero3", "zero2"):
        result = consolidate_checkpoint(zero_checkpoints / variant / "ckpt", tmp_path / variant, progress=False)
        assert result.num_tensors == 416 and most == 0


@pytest.mark.slow
def test_config_and_tokenizer_from_arguments(zero_checkpoints: Path, tmp_path: Path) -> None:
    bare = copy_tag(zero_checkpoints, "zero3", tmp_path / "bare")  # an old checkpoint: no config, no tokenizer
    with pytest.raises(ConsolidationError, match="no model config in .*--config-from"):
        consolidate_checkpoint(bare, tmp_path / "x", tag=TAG, progress=False)
    source = zero_checkpoints / "zero3" / "ckpt"
    result = consolidate_checkpoint(
        bare / TAG,  # a tag directory itself also works
        tmp_path / "out",
        config_from=source / "config.json",
        tokenizer=source / "tokenizer",
        progress=False,
    )
    assert result.config_origin == str(source / "config.json")
    assert read_output(tmp_path / "out").keys() == read_output_keys_of(zero_checkpoints, "zero3")

    # A training preset builds its model config (here the 'demo' tiny model, which this checkpoint is not); the
    # library takes it from the CLI's builder, and alone refuses what is not a model config.
    builder = training_config_builder("demo", [])
    with pytest.raises(ConsolidationError, match="does not match the model config.*encoder.embed_tokens.weight"):
        consolidate_checkpoint(bare, tmp_path / "y", tag=TAG, config_from=builder, progress=False)
    with pytest.raises(ConsolidationError, match="demo: not a model config.json"):
        consolidate_checkpoint(bare, tmp_path / "y", tag=TAG, config_from="demo", progress=False)
    # A model config whose vocabulary is not the tokenizer's is refused, naming both sources.
    config = json.loads((source / "config.json").read_text())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({**config, "vocab_size": 12200}))
    with pytest.raises(ConsolidationError, match="tokenizer from .* has 12193 ids but the model config from .*12200"):
        consolidate_checkpoint(
            bare, tmp_path / "v", tag=TAG, config_from=tmp_path / "other", tokenizer=source / "tokenizer"
        )
    # Through the CLI: a preset with overrides, the wrong size; exit status 2 and nothing written.
    argv = [str(bare), str(tmp_path / "z"), "--tag", TAG, "--config-from", "demo", "--set", "model.size=base"]
    assert main(argv) == 2
    assert not (tmp_path / "z").exists()


def read_output_keys_of(root: Path, variant: str) -> set[str]:
    return set(gathered(root, variant)) - TIED


@pytest.mark.slow
def test_errors_name_the_path(zero_checkpoints: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = zero_checkpoints / "zero2" / "ckpt"
    cases = {
        "missing tag": ([str(ckpt), str(tmp_path / "o"), "--tag", "step_00000099"], [str(ckpt / "step_00000099"), TAG]),
        "no checkpoint": ([str(tmp_path), str(tmp_path / "o")], [str(tmp_path), "not a DeepSpeed checkpoint"]),
        "no directory": ([str(tmp_path / "nope"), str(tmp_path / "o")], [str(tmp_path / "nope")]),
        "bad size": ([str(ckpt), str(tmp_path / "o"), "--max-shard-size", "big"], ["'big'"]),
    }
    for case, (argv, expected) in cases.items():
        assert main([*argv, "--no-progress"]) == 2, case
        err = capsys.readouterr().err
        assert err.startswith("biomedgpt-consolidate: error:"), (case, err)
        assert all(text in err for text in expected), (case, err)

    # A tag directory that is not a DeepSpeed checkpoint.
    (tmp_path / "fake" / "step_00000001").mkdir(parents=True)
    (tmp_path / "fake" / "latest").write_text("step_00000001")
    assert main([str(tmp_path / "fake"), str(tmp_path / "o")]) == 2
    assert f"{tmp_path / 'fake' / 'step_00000001'} is not a DeepSpeed checkpoint" in capsys.readouterr().err

    # A rank's optimizer file missing, and a truncated one.
    partial = copy_tag(zero_checkpoints, "zero3", tmp_path / "partial")
    (partial / TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(ConsolidationError, match=r"written by 2 ranks but holds 1 \*_optim_states.pt"):
        ZeroCheckpoint(partial, TAG)
    broken = copy_tag(zero_checkpoints, "zero3", tmp_path / "broken")
    target = broken / TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    target.write_bytes(target.read_bytes()[:1000])
    with pytest.raises(ConsolidationError, match=f"{target}: cannot be read"):
        ZeroCheckpoint(broken, TAG)

    # A tag without the trainer's COMPLETE marker is read, with a warning.
    (broken / TAG / "COMPLETE").unlink(missing_ok=True)
    unmarked = copy_tag(zero_checkpoints, "zero2", tmp_path / "unmarked")
    (unmarked / TAG / "COMPLETE").unlink()
    with pytest.warns(UserWarning, match="no COMPLETE marker"):
        ZeroCheckpoint(unmarked, TAG)


def _tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_overwrite_never_deletes_what_consolidation_did_not_write(
    zero_checkpoints: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The reported data loss: OUT containing the checkpoint (a run folder), and OUT being the checkpoint.
    run = tmp_path / "RUN"
    shutil.copytree(zero_checkpoints / "zero2" / "ckpt", run / "checkpoints")
    (run / "notes.txt").write_text("mine")
    before = _tree(run)
    for output in (run, run / "checkpoints"):
        assert main([str(run / "checkpoints"), str(output), "--overwrite", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "the input" in err and str(output) in err, err
        assert _tree(run) == before, output  # not a byte removed

    # A directory of somebody else's files: refused with or without --overwrite, nothing removed.
    ckpt = run / "checkpoints"
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    for extra in ([], ["--overwrite"]):
        assert main([str(ckpt), str(taken), "--no-progress", *extra]) == 2
        assert "not empty (keep.txt)" in capsys.readouterr().err
        assert (taken / "keep.txt").read_text() == "x" and not (taken / "model.safetensors").exists()

    # An earlier consolidation: replaced only with --overwrite, and then without leftovers (4 shards -> 1 file).
    out = tmp_path / "model"
    assert main([str(ckpt), str(out), "--no-progress", "--max-shard-size", "40KB"]) == 0
    sharded = set(_tree(out))
    assert len([n for n in sharded if n.endswith(".safetensors")]) > 1 and MANIFEST_NAME in sharded
    assert main([str(ckpt), str(out), "--no-progress"]) == 2 and "pass --overwrite" in capsys.readouterr().err
    assert main([str(ckpt), str(out), "--no-progress", "--overwrite"]) == 0
    replaced = set(_tree(out))
    assert "model.safetensors" in replaced and not [n for n in replaced if n.startswith("model-0")]
    assert not list(tmp_path.glob(".*partial*"))  # no staging directory left behind

    # A file the user added to a consolidated model: the next --overwrite keeps everything.
    (out / "my_eval.json").write_text("{}")
    kept = _tree(out)
    assert main([str(ckpt), str(out), "--no-progress", "--overwrite"]) == 2
    assert "did not write (my_eval.json)" in capsys.readouterr().err and _tree(out) == kept


@pytest.mark.slow
def test_module_entry_point(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "biomedgpt.cli.consolidate", str(tmp_path / "missing"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and f"{tmp_path / 'missing'}: no such checkpoint directory" in proc.stderr
