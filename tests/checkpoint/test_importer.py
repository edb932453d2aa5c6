"""biomedgpt-import: small checkpoints in the fairseq (BiomedGPT trainer.py ``state_dict``) and transformers-OFA
(OFA-Sys/OFA feature/add_transformers modeling_ofa.py) layouts, written with torch.save / safetensors, converted, and
checked tensor by tensor and by logits."""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
from collections import Counter
from pathlib import Path

import pytest
import safetensors.torch
import torch

from biomedgpt import BiomedGPTConfig, BiomedGPTForConditionalGeneration
from biomedgpt.checkpoint.importer import (
    REPORT_NAME,
    CheckpointImportError,
    import_checkpoint,
    load_source,
    tokenizer_from_hf_vocab,
)
from biomedgpt.cli.import_checkpoint import main as cli_main
from biomedgpt.model.positions import decoder_image_position_ids, image_relative_buckets, text_relative_buckets
from biomedgpt.output_dirs import MANIFEST_NAME
from biomedgpt.tokenizer import BiomedGPTTokenizer

SENTENCES = [
    " is there a fracture?",
    " what organ is shown?",
    " the liver is normal in size.",
    " chest x-ray showing a small pleural effusion in the left lower lobe.",
    " no evidence of pneumothorax or consolidation.",
    " what modality is used to take this image?",
]
DIMS = dict(d_model=64, layers=2, heads=4, ffn=128)


# ------------------------------------------------------------------------------------------- vocabulary files


@pytest.fixture(scope="module")
def vocab(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Original-format encoder.json/vocab.bpe/dict.txt and the equivalent HF-OFA vocab.json/merges.txt."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    corpus = SENTENCES * 20
    bpe.train_from_iterator(corpus, vocab_size=300, min_frequency=2, show_progress=False)
    model = json.loads(bpe.to_str())["model"]
    encoder: dict[str, int] = model["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    merges_text = "#version: 0.2\n" + "\n".join(merges) + "\n"

    bpe_dir = tmp_path_factory.mktemp("bpe")
    (bpe_dir / "encoder.json").write_text(json.dumps(encoder, ensure_ascii=False), encoding="utf-8")
    (bpe_dir / "vocab.bpe").write_text(merges_text, encoding="utf-8")
    counts = Counter(i for s in corpus for i in bpe.encode(s).ids)
    order = sorted(encoder.values(), key=lambda g: (-counts[g], -g))  # fairseq: by frequency
    lines = [f"{g} {counts[g]}" for g in order] + [f"madeupword000{k} 0" for k in range(3)]
    (bpe_dir / "dict.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")

    # BART's vocab.json numbers tokens by fairseq id: specials, dict.txt order, madeupwords, <mask>.
    gpt2_token = {i: t for t, i in encoder.items()}
    symbols = [gpt2_token[g] for g in order] + [f"madeupword000{k}" for k in range(3)]
    hf_vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    hf_vocab.update({sym: 4 + i for i, sym in enumerate(symbols)})
    hf_vocab["<mask>"] = 4 + len(symbols)
    vocab_size = 4 + len(symbols) + 1 + 8192 + 1000
    return {"bpe_dir": bpe_dir, "hf_vocab": hf_vocab, "merges": merges_text, "vocab_size": vocab_size}


# ------------------------------------------------------------------------------------------- checkpoints


def small_config(vocab_size: int, normformer: bool = True) -> BiomedGPTConfig:
    return BiomedGPTConfig.for_size(
        "tiny",
        vocab_size=vocab_size,
        d_model=DIMS["d_model"],
        encoder_layers=DIMS["layers"],
        decoder_layers=DIMS["layers"],
        encoder_attention_heads=DIMS["heads"],
        decoder_attention_heads=DIMS["heads"],
        encoder_ffn_dim=DIMS["ffn"],
        decoder_ffn_dim=DIMS["ffn"],
        normformer=normformer,
        dropout=0.0,
        encoder_drop_path_rate=0.0,
        decoder_drop_path_rate=0.0,
    )


def random_state(config: BiomedGPTConfig, seed: int) -> dict[str, torch.Tensor]:
    """A state dict in our names where every tensor holds its own random values (tied copies equal)."""
    model = BiomedGPTForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    made: dict[int, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if value.data_ptr() in made:  # the tied embedding: one matrix under three names
            state[key] = made[value.data_ptr()]
            continue
        if not value.is_floating_point():
            new = torch.randint(1, 1000, value.shape, generator=gen, dtype=value.dtype)
        elif key.endswith("running_var"):
            new = torch.rand(value.shape, generator=gen) + 0.5
        elif value.dim() == 1 and bool(torch.all(value == 1)):  # LayerNorm/BatchNorm scales, c_attn
            new = 1 + 0.1 * torch.randn(value.shape, generator=gen)
        else:
            new = 0.05 * torch.randn(value.shape, generator=gen)
        made[value.data_ptr()] = new
        state[key] = new
    return state


def fairseq_layout(ours: dict[str, torch.Tensor], full_buffers: bool = True) -> dict[str, torch.Tensor]:
    """fairseq keys (BiomedGPT models/ofa/): our names plus the version markers and the saved bucket / image-position
    buffers."""
    sd = dict(ours)
    sd["encoder.version"] = torch.tensor([3.0])
    sd["decoder.version"] = torch.tensor([3.0])
    if full_buffers:  # the real shapes ([1024,1024], [1765,1765], [1026]); storages shared, saved once
        text, image = text_relative_buckets(256, 1024), image_relative_buckets(42)
        position_idx = decoder_image_position_ids(16, 42, 1024)
    else:
        text, image, position_idx = torch.zeros(4, 4, dtype=torch.long), torch.zeros(5, 5, dtype=torch.long), None
    for side in ("encoder", "decoder"):
        sd[f"{side}.token_rp_bucket"] = text
        sd[f"{side}.image_rp_bucket"] = image
    sd["decoder.image_position_idx"] = position_idx if position_idx is not None else torch.zeros(1026, dtype=torch.long)
    assert sd["decoder.image_position_idx"].shape == (1026,)
    return sd


def fairseq_model_cfg(normformer: bool = True, **overrides: object) -> dict:
    cfg = dict(
        _name="ofa_tiny",
        arch="ofa_tiny",
        encoder_embed_dim=DIMS["d_model"],
        decoder_embed_dim=DIMS["d_model"],
        encoder_layers=DIMS["layers"],
        decoder_layers=DIMS["layers"],
        encoder_attention_heads=DIMS["heads"],
        decoder_attention_heads=DIMS["heads"],
        encoder_ffn_embed_dim=DIMS["ffn"],
        decoder_ffn_embed_dim=DIMS["ffn"],
        resnet_type="resnet50",
        scale_attn=normformer,
        scale_fc=normformer,
        scale_heads=normformer,
        encoder_normalize_before=True,
        decoder_normalize_before=True,
        share_all_embeddings=True,
        no_scale_embedding=True,
        disable_entangle=True,
        max_source_positions=1024,
        max_target_positions=1024,
        token_bucket_size=256,
        image_bucket_size=42,
        dropout=0.1,
        encoder_drop_path_rate=0.1,
        decoder_drop_path_rate=0.1,
    )
    cfg.update(overrides)
    return cfg


def save_fairseq(path: Path, model_sd: dict, cfg: object = None, ema_sd: dict | None = None, **extra: object) -> Path:
    container = {
        "args": None,
        "cfg": cfg,
        "model": model_sd,
        "criterion": None,
        "optimizer_history": [{"criterion_name": "AdjustLabelSmoothedCrossEntropyCriterion", "num_updates": 10}],
        "task_state": {},
        "extra_state": {"metrics": {}, "val_loss": 1.5, **({"ema": ema_sd} if ema_sd is not None else {}), **extra},
        "last_optimizer_state": {},
    }
    torch.save(container, path)
    return path


@pytest.fixture(scope="module")
def states(vocab: dict) -> dict:
    config = small_config(vocab["vocab_size"])
    return {"config": config, "model": random_state(config, seed=1), "ema": random_state(config, seed=2)}


@pytest.fixture(scope="module")
def fairseq_pt(states: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ema = fairseq_layout(states["ema"], full_buffers=False)
    ema_half = {k: v.half() if v.is_floating_point() else v for k, v in ema.items()}  # EMA kept in fp16 ...
    ema_fp32 = {k: v for k, v in states["ema"].items() if v.is_floating_point()}  # ... exact copy with --ema-fp32
    # Legacy OFA models keep cfg.model as an argparse.Namespace: that needs the full unpickler.
    cfg = {"model": argparse.Namespace(**fairseq_model_cfg()), "task": {"_name": "vqa_gen", "num_bins": 1000}}
    path = tmp_path_factory.mktemp("fairseq") / "checkpoint.pt"
    return save_fairseq(path, fairseq_layout(states["model"]), cfg, ema_half, ema_fp32_params=ema_fp32)


def make_batch(vocab_size: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 200, (2, 6), generator=gen)
    ids[:, 0], ids[:, -1] = 0, 2
    return dict(
        input_ids=ids,
        patch_images=torch.randn(2, 3, 32, 32, generator=gen),
        patch_masks=torch.tensor([True, False]),
        decoder_input_ids=torch.randint(4, vocab_size, (2, 4), generator=gen),
        code_masks=torch.tensor([True, False]),
    )


def assert_imported(out: Path, expected: dict[str, torch.Tensor], config: BiomedGPTConfig) -> None:
    """Every tensor at its key with its value, rebuilt buffers as built fresh, same logits as a reference."""
    imported = BiomedGPTForConditionalGeneration.from_pretrained(out).eval()
    got = imported.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value.to(got[key].dtype)), key
    assert imported.decoder.image_position_idx.shape == (1026,)
    assert torch.equal(imported.encoder.image_rp_bucket, image_relative_buckets(42))
    assert imported.decoder.output_projection.weight is imported.encoder.embed_tokens.weight

    reference = BiomedGPTForConditionalGeneration(config).eval()
    reference.load_state_dict(expected, strict=True)
    batch = make_batch(config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(imported(**batch).logits, reference(**batch).logits, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- fairseq


def test_fairseq_checkpoint_lands_key_for_key(fairseq_pt: Path, states: dict, vocab: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert cli_main([str(fairseq_pt), str(out), "--bpe-dir", str(vocab["bpe_dir"])]) == 0
    assert_imported(out, states["model"], states["config"])

    report = json.loads((out / REPORT_NAME).read_text())
    assert report["layout"] == "fairseq" and report["weights"] == "model"
    assert report["unpickle_mode"].startswith("full")  # the Namespace in cfg
    assert report["config_origin"]["d_model"] == "checkpoint config"
    assert report["config"]["normformer"] is True and report["config"]["resnet_type"] == "resnet50"
    assert report["unexpected"] == [] and report["missing"] == []
    dropped = report["dropped"]
    for key in ("encoder.version", "decoder.version", "encoder.token_rp_bucket", "decoder.image_rp_bucket"):
        assert key in dropped
    assert "1026" in dropped["decoder.image_position_idx"]
    assert set(k for k in dropped if "embed_tokens" in k or "output_projection" in k) == {
        "decoder.embed_tokens.weight",
        "decoder.output_projection.weight",
    }
    tok = BiomedGPTTokenizer.from_pretrained(out)
    assert len(tok) == vocab["vocab_size"] == report["tokenizer"]["vocab_size"]
    assert tok.decode(tok.encode(SENTENCES[0])) == SENTENCES[0]


def test_overwrite_replaces_only_an_earlier_import(
    fairseq_pt: Path, states: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    assert cli_main([str(fairseq_pt), str(out)]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert MANIFEST_NAME in written and REPORT_NAME in written
    assert cli_main([str(fairseq_pt), str(out)]) == 2 and "pass --overwrite" in capsys.readouterr().err
    assert cli_main([str(fairseq_pt), str(out), "--overwrite", "--ema"]) == 0
    assert sorted(p.name for p in out.iterdir()) == written
    assert_imported(out, states["ema"], states["config"])  # the new weights, not the old ones

    # Anything the importer did not write stays, and the import is refused (exit 2), with or without --overwrite.
    (out / "notes.md").write_text("mine")
    for extra in ([], ["--overwrite"]):
        assert cli_main([str(fairseq_pt), str(out), *extra]) == 2
        assert "did not write (notes.md)" in capsys.readouterr().err
    assert (out / "notes.md").read_text() == "mine" and (out / "config.json").exists()
    # An HF directory imported onto itself would be replaced by its own import.
    assert cli_main([str(out), str(out), "--overwrite"]) == 2 and "is the input" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*partial*"))


def test_fairseq_ema_weights(fairseq_pt: Path, states: dict, tmp_path: Path) -> None:
    report = import_checkpoint(fairseq_pt, tmp_path / "ema", ema=True)
    assert report.weights == "ema+ema_fp32_params"
    assert_imported(tmp_path / "ema", states["ema"], states["config"])
    assert not report.tokenizer["written"] and "--bpe-dir" in report.tokenizer["reason"]


def test_fairseq_without_cfg_infers_architecture_from_shapes(vocab: dict, tmp_path: Path) -> None:
    config = small_config(vocab["vocab_size"], normformer=False)
    ours = random_state(config, seed=3)
    assert not any("attn_ln" in k or "c_attn" in k for k in ours)
    path = save_fairseq(tmp_path / "nocfg.pt", fairseq_layout(ours, full_buffers=False))
    report = import_checkpoint(path, tmp_path / "out")
    assert report.unpickle_mode == "weights_only"
    assert set(report.config_origin.values()) == {"shapes", "embedding rows"}
    assert report.config["normformer"] is False
    assert (report.config["d_model"], report.config["encoder_layers"], report.config["encoder_attention_heads"]) == (
        64,
        2,
        4,
    )
    assert report.config["encoder_ffn_dim"] == 128 and report.config["resnet_type"] == "resnet50"
    assert_imported(tmp_path / "out", ours, config)


def test_forced_wrong_size_names_the_likely_size(fairseq_pt: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointImportError) as info:
        import_checkpoint(fairseq_pt, tmp_path / "out", size="base")
    message = str(info.value)
    assert "encoder.image_proj.weight: model [768, 1024], checkpoint [64, 1024]" in message
    assert "checkpoint has d_model=64: no published size, not looks like 'base' (--size base)" not in message
    assert "checkpoint has d_model=64: no published size, not 'base' (--size base)" in message
    assert "leave out --size base" in message
    assert not (tmp_path / "out").exists(), "nothing is written when the import fails"


def test_missing_normformer_keys_say_which_flag(vocab: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # cfg claims --scale-attn/--scale-fc/--scale-heads, the tensors were trained without them.
    ours = random_state(small_config(vocab["vocab_size"], normformer=False), seed=4)
    cfg = {"model": fairseq_model_cfg(normformer=True), "task": {}}
    path = save_fairseq(tmp_path / "plain.pt", fairseq_layout(ours, full_buffers=False), cfg)
    assert cli_main([str(path), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "missing from the checkpoint" in err and "encoder.layers.0.attn_ln.weight" in err
    assert "trained without --scale-attn/--scale-fc/--scale-heads; pass --no-normformer" in err
    assert cli_main([str(path), str(tmp_path / "out"), "--no-normformer"]) == 0


def test_normformer_checkpoint_into_plain_model_is_refused(fairseq_pt: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointImportError, match="drop --no-normformer") as info:
        import_checkpoint(fairseq_pt, tmp_path / "out", normformer=False)
    assert "no place for" in str(info.value) and "attn_ln" in str(info.value)


def test_cfg_disagreeing_with_tensors_is_caught(states: dict, tmp_path: Path) -> None:
    cfg = {"model": fairseq_model_cfg(encoder_layers=1)}
    path = save_fairseq(tmp_path / "bad.pt", fairseq_layout(states["model"], full_buffers=False), cfg)
    with pytest.raises(CheckpointImportError) as info:
        import_checkpoint(path, tmp_path / "out")
    message = str(info.value)
    assert "encoder.layers.1.fc1.weight" in message and "checkpoint has encoder_layers=2, the model 1" in message
    assert "--ignore-cfg" in message
    report = import_checkpoint(path, tmp_path / "out", ignore_cfg=True)
    assert report.config["encoder_layers"] == 2


def test_unexpected_keys_are_reported_by_name(states: dict, tmp_path: Path) -> None:
    sd = fairseq_layout(states["model"], full_buffers=False)
    sd["classification_heads.vqa.dense.weight"] = torch.randn(3, 64)
    sd["encoder.layers.0.adapter.fc.weight"] = torch.randn(8, 64)
    path = save_fairseq(tmp_path / "extra.pt", sd, {"model": fairseq_model_cfg()})
    report = import_checkpoint(path, tmp_path / "out")
    assert report.unexpected == ["classification_heads.vqa.dense.weight", "encoder.layers.0.adapter.fc.weight"]
    assert json.loads((tmp_path / "out" / REPORT_NAME).read_text())["unexpected"] == report.unexpected
    assert any("classification_heads.vqa.dense.weight" in w for w in report.warnings)
    with pytest.raises(CheckpointImportError, match=re.escape("classification_heads.vqa.dense.weight")):
        import_checkpoint(path, tmp_path / "strict", strict=True)


def test_missing_key_is_an_error_unless_allowed(states: dict, tmp_path: Path) -> None:
    sd = fairseq_layout(states["model"], full_buffers=False)
    del sd["encoder.image_proj.bias"]
    path = save_fairseq(tmp_path / "missing.pt", sd, {"model": fairseq_model_cfg()})
    with pytest.raises(CheckpointImportError, match=re.escape("encoder.image_proj.bias")):
        import_checkpoint(path, tmp_path / "out")
    report = import_checkpoint(path, tmp_path / "out", allow_missing=True)
    assert report.missing == ["encoder.image_proj.bias"]


def test_untied_embedding_copies_are_refused(states: dict, tmp_path: Path) -> None:
    sd = fairseq_layout(states["model"], full_buffers=False)
    sd["decoder.output_projection.weight"] = sd["encoder.embed_tokens.weight"] + 1
    path = save_fairseq(tmp_path / "untied.pt", sd, {"model": fairseq_model_cfg()})
    with pytest.raises(CheckpointImportError, match="not tied"):
        import_checkpoint(path, tmp_path / "out")


def test_tokenizer_size_must_match_embedding_rows(fairseq_pt: Path, vocab: dict, tmp_path: Path) -> None:
    short = tmp_path / "bpe"
    short.mkdir()
    for name in ("encoder.json", "vocab.bpe"):
        (short / name).write_bytes((vocab["bpe_dir"] / name).read_bytes())
    lines = (vocab["bpe_dir"] / "dict.txt").read_text().splitlines()
    (short / "dict.txt").write_text("\n".join(lines[:-1]) + "\n")  # one madeupword short
    with pytest.raises(CheckpointImportError, match=f"embedding has {vocab['vocab_size']} rows") as info:
        import_checkpoint(fairseq_pt, tmp_path / "out", bpe_dir=short)
    assert "one row more" in str(info.value)


def test_omegaconf_cfg_loads_without_omegaconf(states: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        import omegaconf  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("omegaconf is installed: its real classes would be used")
    # Shaped like OmegaConf's pickles: containers keep "_content", value nodes "_val"; the classes live in
    # modules present only while saving.
    dictconfig, nodes = types.ModuleType("omegaconf.dictconfig"), types.ModuleType("omegaconf.nodes")

    class DictConfig:
        def __init__(self, content: dict) -> None:
            self._content, self._parent, self._metadata = content, None, {"ref_type": "Any"}

    class AnyNode:
        def __init__(self, value: object) -> None:
            self._val, self._parent, self._metadata = value, None, {}

    for cls, module in ((DictConfig, dictconfig), (AnyNode, nodes)):
        cls.__module__, cls.__qualname__ = module.__name__, cls.__name__
        setattr(module, cls.__name__, cls)
    for module in (types.ModuleType("omegaconf"), dictconfig, nodes):
        monkeypatch.setitem(sys.modules, module.__name__, module)

    model_cfg = DictConfig({k: AnyNode(v) for k, v in fairseq_model_cfg().items()})
    cfg = DictConfig({"model": model_cfg, "task": DictConfig({"num_bins": AnyNode(1000)})})
    path = save_fairseq(tmp_path / "omega.pt", fairseq_layout(states["model"], full_buffers=False), cfg)
    for name in ("omegaconf", "omegaconf.dictconfig", "omegaconf.nodes"):
        monkeypatch.delitem(sys.modules, name)

    loaded = load_source(path)
    assert loaded.unpickle_mode.startswith("full")
    assert loaded.model_cfg["encoder_embed_dim"] == 64 and loaded.model_cfg["scale_attn"] is True
    assert loaded.task_cfg == {"num_bins": 1000}


# ------------------------------------------------------------------------------------------- transformers OFA


def to_hf_key(key: str) -> str:
    """The OFA transformers port's renames (modeling_ofa.py), read right to left: fairseq names -> the port's."""
    match = re.match(r"^(encoder|decoder)\.layers\.(\d+)\.(.*)$", key)
    if not match:
        return key
    side, index, rest = match.groups()
    table = {
        "encoder": {"attn_ln.": "self_attn_mid_layer_norm.", "ffn_layernorm.": "ffn_layer_norm."},
        "decoder": {
            "self_attn_ln.": "self_attn_mid_layer_norm.",
            "encoder_attn_layer_norm.": "cross_attn_layer_norm.",
            "encoder_attn.": "cross_attn.",
            "cross_attn_ln.": "cross_attn_mid_layer_norm.",
            "ffn_layernorm.": "ffn_layer_norm.",
        },
    }[side]
    for old, new in table.items():
        if rest.startswith(old):
            return f"{side}.layers.{index}.{new}{rest[len(old) :]}"
    return key


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_hf_ofa_directory_lands_key_for_key(states: dict, vocab: dict, tmp_path: Path, weights_file: str) -> None:
    source = tmp_path / "ofa"
    source.mkdir()
    sd = {to_hf_key(k): v.clone() for k, v in fairseq_layout(states["model"]).items() if not k.endswith("version")}
    assert "decoder.layers.1.cross_attn.c_attn" in sd and "encoder.layers.0.self_attn_mid_layer_norm.bias" in sd
    # The HF port's length (taokz/BiomedGPT issue #39).
    sd["decoder.image_position_idx"] = sd["decoder.image_position_idx"][:1025].clone()
    # The tied embedding is serialized three times, as separate tensors.
    assert all(k in sd for k in ("encoder.embed_tokens.weight", "decoder.output_projection.weight"))
    if weights_file.endswith(".safetensors"):
        safetensors.torch.save_file(sd, source / weights_file)
    else:
        torch.save(sd, source / weights_file)
    config = {
        "model_type": "ofa",
        "architectures": ["OFAModel"],
        "vocab_size": vocab["vocab_size"],
        "d_model": DIMS["d_model"],
        "encoder_layers": DIMS["layers"],
        "decoder_layers": DIMS["layers"],
        "encoder_attention_heads": DIMS["heads"],
        "decoder_attention_heads": DIMS["heads"],
        "encoder_ffn_dim": DIMS["ffn"],
        "decoder_ffn_dim": DIMS["ffn"],
        "max_position_embeddings": 1024,
        "resnet_type": "resnet50",
        "normformer": True,
        "token_bucket_size": 256,
        "image_bucket_size": 42,
        "code_image_size": 128,
        "attn_scale_factor": 2.0,
        "scale_embedding": False,
        "entangle_position_embedding": False,
        "dropout": 0.1,
    }
    (source / "config.json").write_text(json.dumps(config))
    (source / "vocab.json").write_text(json.dumps(vocab["hf_vocab"], ensure_ascii=False), encoding="utf-8")
    (source / "merges.txt").write_text(vocab["merges"], encoding="utf-8")

    out = tmp_path / "out"
    report = import_checkpoint(source, out)
    assert report.layout == "hf-ofa" and report.weights == weights_file
    assert report.unexpected == [] and report.missing == [] and report.warnings == []
    # per layer: encoder 2 LayerNorms; decoder 4 LayerNorms + 9 cross-attention tensors (q,k,v,out, c_attn)
    assert report.renamed == DIMS["layers"] * (2 * 2 + 4 * 2 + 9)
    assert "1025" in report.dropped["decoder.image_position_idx"]
    assert_imported(out, states["model"], states["config"])

    tok = BiomedGPTTokenizer.from_pretrained(out)
    reference = BiomedGPTTokenizer.from_gpt2_bpe(vocab["bpe_dir"])
    assert len(tok) == len(reference) == vocab["vocab_size"]
    for text in [*SENTENCES, " unseen wörds 42"]:
        assert tok.encode(text) == reference.encode(text)
        assert tok.decode(tok.encode(text)) == text
    assert tok.convert_ids_to_tokens(tok.mask_id) == "<mask>" and tok.mask_id == vocab["hf_vocab"]["<mask>"]


def test_hf_ofa_without_normformer_drops_identity_c_attn(vocab: dict, tmp_path: Path) -> None:
    # The HF port builds c_attn (head scaling) even with normformer=False; at ones it is the identity.
    config = small_config(vocab["vocab_size"], normformer=False)
    ours = random_state(config, seed=5)
    sd = {to_hf_key(k): v.clone() for k, v in fairseq_layout(ours, full_buffers=False).items()}
    for side, attention in (("encoder", "self_attn"), ("decoder", "self_attn"), ("decoder", "cross_attn")):
        for layer in range(DIMS["layers"]):
            sd[f"{side}.layers.{layer}.{attention}.c_attn"] = torch.ones(DIMS["heads"])
    source = tmp_path / "ofa"
    source.mkdir()
    safetensors.torch.save_file(sd, source / "model.safetensors")
    (source / "config.json").write_text(json.dumps({"model_type": "ofa", "normformer": False, "d_model": 64}))
    report = import_checkpoint(source, tmp_path / "out")
    assert report.config["normformer"] is False
    assert sum("c_attn of ones" in why for why in report.dropped.values()) == 3 * DIMS["layers"]
    assert any("version" in k for k in report.dropped)  # fairseq markers are dropped here too
    assert report.tokenizer["written"] is False
    assert_imported(tmp_path / "out", ours, config)


def test_hf_vocab_with_gaps_keeps_the_id_layout(vocab: dict, tmp_path: Path) -> None:
    hf_vocab = {t: i for t, i in vocab["hf_vocab"].items() if not t.startswith("madeupword")}
    (tmp_path / "vocab.json").write_text(json.dumps(hf_vocab, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "merges.txt").write_text(vocab["merges"], encoding="utf-8")
    tok, notes = tokenizer_from_hf_vocab(tmp_path / "vocab.json", tmp_path / "merges.txt")
    reference = BiomedGPTTokenizer.from_gpt2_bpe(vocab["bpe_dir"])
    assert len(tok) == len(reference) and tok.mask_id == reference.mask_id
    assert tok.encode(SENTENCES[3]) == reference.encode(SENTENCES[3])
    assert any("placeholders" in note for note in notes)
