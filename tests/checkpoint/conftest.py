"""Real DeepSpeed ZeRO checkpoints for the consolidation tests.

Run as a script under ``torch.distributed.run`` (2 CPU ranks, gloo), this file trains a small BiomedGPT for two steps
under several ZeRO set-ups and saves, per variant, ``<root>/<variant>/ckpt`` (DeepSpeed's files, ``latest``, the
model config and tokenizer as the trainer writes them) and ``<root>/<variant>/gathered.pt`` (the full state dict
gathered from the engine). One launch builds every variant: starting DeepSpeed costs far more than this training.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

TAG = "step_00000002"
# name -> (ZeRO stage, freeze the tied embedding, optimizer param groups)
VARIANTS: dict[str, tuple[int, bool, int]] = {
    "zero3": (3, False, 2),
    "zero3_frozen": (3, True, 1),
    "zero2": (2, False, 2),
    "zero1_frozen": (1, True, 2),
}


def small_model_config(vocab_size: int) -> Any:
    from biomedgpt.model import BiomedGPTConfig

    # Three heads make the relative-position tables odd-sized, so ZeRO pads their partitions.
    return BiomedGPTConfig.for_size(
        "tiny",
        vocab_size=vocab_size,
        d_model=48,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=3,
        decoder_attention_heads=3,
        encoder_ffn_dim=96,
        decoder_ffn_dim=96,
        dropout=0.0,
        encoder_drop_path_rate=0.0,
        decoder_drop_path_rate=0.0,
    )


def _batch(vocab_size: int, generator: Any) -> dict[str, Any]:
    import torch

    return {
        "input_ids": torch.randint(4, 2000, (1, 12), generator=generator),
        "patch_images": torch.randn(1, 3, 32, 32, generator=generator),
        "patch_masks": torch.ones(1, dtype=torch.bool),
        "labels": torch.randint(4, vocab_size, (1, 7), generator=generator),
    }


def _make_variant(root: Path, name: str, stage: int, freeze: bool, groups: int) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from biomedgpt.model import BiomedGPTForConditionalGeneration
    from biomedgpt.tokenizer import BiomedGPTTokenizer

    rank = dist.get_rank()
    tokenizer = BiomedGPTTokenizer.default()
    config = small_model_config(len(tokenizer))
    ds_config = {
        "train_batch_size": 2,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    torch.manual_seed(0)
    if stage == 3:
        with deepspeed.zero.Init(config_dict_or_path=dict(ds_config)):
            model = BiomedGPTForConditionalGeneration(config)
    else:
        model = BiomedGPTForConditionalGeneration(config)
    if freeze:
        model.set_embedding_trainable(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if groups == 2:  # two param groups (no decay on 1-d tensors), as many recipes do
        param_groups = [
            {"params": [p for p in trainable if p.ndim > 1], "weight_decay": 0.01},
            {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0},
        ]
    else:
        param_groups = [{"params": trainable, "weight_decay": 0.01}]
    optimizer = torch.optim.AdamW(param_groups, lr=1e-2)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    generator = torch.Generator().manual_seed(100 + rank)
    for _ in range(2):
        loss = engine(**_batch(config.vocab_size, generator)).loss
        engine.backward(loss)
        engine.step()

    ckpt = root / name / "ckpt"
    engine.save_checkpoint(str(ckpt), tag=TAG, client_state={"step": 2}, save_latest=True)
    # The engine's own view of the full weights, for --verify and the tests.
    module = engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=stage == 3):
        gathered = {k: v.detach().clone() for k, v in module.state_dict().items()}
    if rank == 0:
        torch.save(gathered, root / name / "gathered.pt")
        # What the trainer writes next to the tags for biomedgpt-consolidate.
        config.save_pretrained(ckpt)
        tokenizer.save_pretrained(ckpt / "tokenizer")
        (ckpt / TAG / "COMPLETE").write_text(json.dumps({"step": 2}))  # as biomedgpt.train.checkpointing does
    dist.barrier()


def _make_checkpoints(root: Path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import deepspeed
    import torch

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    for name, (stage, freeze, groups) in VARIANTS.items():
        _make_variant(root, name, stage, freeze, groups)


@pytest.fixture(scope="session")
def zero_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``root/<variant>/ckpt`` and ``root/<variant>/gathered.pt`` for every entry of ``VARIANTS``;
    ``root/variants.json`` lists them with the tag."""
    from training_jobs import torchrun_script

    root = tmp_path_factory.mktemp("zero_ckpts")
    torchrun_script(__file__, root)
    (root / "variants.json").write_text(json.dumps({"tag": TAG, "variants": VARIANTS}))
    return root


@pytest.fixture
def small_config() -> Any:
    """The model config of the checkpoints (vocabulary of the packaged tokenizer)."""
    from biomedgpt.tokenizer import BiomedGPTTokenizer

    return small_model_config(len(BiomedGPTTokenizer.default()))


if __name__ == "__main__":
    from biomedgpt.runtime.process_exit import exit_without_teardown

    _make_checkpoints(Path(sys.argv[1]))
    exit_without_teardown(0)  # as the training entry point does: no 2-3 s interpreter teardown per rank
