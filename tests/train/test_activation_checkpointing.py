"""Activation checkpointing per encoder/decoder layer and ResNet stage: same losses, gradients and BatchNorm
statistics as without it (dropout and drop-path on), fewer saved activations, unchanged parameter names."""

from __future__ import annotations

import copy

import pytest
import torch
from model_configs import small_test_config

from biomedgpt import BiomedGPTForConditionalGeneration
from biomedgpt.train.activation_checkpointing import apply_activation_checkpointing
from biomedgpt.train.loss import label_smoothed_cross_entropy

PAD = 1


def batch(seed: int = 0, images: bool = True) -> tuple[dict, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 100, (3, 7), generator=gen)
    ids[:, 0], ids[:, -1] = 0, 2
    ids[1, 5:] = PAD
    decoder_ids = torch.randint(4, 100, (3, 6), generator=gen)
    decoder_ids[:, 0] = 0
    target = torch.randint(4, 100, (3, 6), generator=gen)
    target[2, 4:] = PAD
    inputs = dict(
        input_ids=ids, patch_images=torch.randn(3, 3, 64, 64, generator=gen), patch_masks=torch.tensor([1, 0, 1]),
        decoder_input_ids=decoder_ids, sample_patch_num=10,
    )  # fmt: skip
    if not images:  # text only: the transformer layers hold most activations (at this size the ResNet dominates)
        inputs = dict(input_ids=ids, decoder_input_ids=decoder_ids)
    return inputs, target


def saved_bytes_and_step(
    model: torch.nn.Module, images: bool = True
) -> tuple[int, torch.Tensor, dict[str, torch.Tensor]]:
    """Bytes of the activations autograd keeps after one forward (distinct storages, no parameters or buffers),
    the loss and every gradient of one training step."""
    inputs, target = batch(images=images)
    # Parameters and buffers (a slice of a relative-position bucket table is saved by an embedding lookup) are
    # held anyway; activations are what checkpointing is about.
    parameters = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.zero_grad()
    torch.manual_seed(3)  # the same dropout, drop-path and patch draws for both models
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = model(**inputs).logits
    loss = label_smoothed_cross_entropy(logits, target, epsilon=0.1, padding_idx=PAD).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return sum(storages.values()), loss.detach(), grads


@pytest.mark.parametrize("mode", ["layers", "layers+resnet"])
def test_checkpointed_model_gives_the_same_loss_gradients_and_statistics_with_less_saved(mode: str) -> None:
    torch.manual_seed(0)
    config = small_test_config(
        ffn_dim=128, dropout=0.1, attention_dropout=0.1, encoder_drop_path_rate=0.2, decoder_drop_path_rate=0.2,
        resnet_drop_path_rate=0.2,
    )  # fmt: skip
    plain = BiomedGPTForConditionalGeneration(config).train()
    checkpointed = copy.deepcopy(plain)
    names = apply_activation_checkpointing(checkpointed, mode)
    assert len(names) == 2 * 2 + (3 if mode == "layers+resnet" else 0)
    assert [n for n, _ in checkpointed.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()

    images = mode == "layers+resnet"
    plain_saved, plain_loss, plain_grads = saved_bytes_and_step(plain, images)
    saved, loss, grads = saved_bytes_and_step(checkpointed, images)
    assert loss == plain_loss  # bit-equal: the recompute replays the forward with the same RNG state
    assert grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
    # The recompute did not update the BatchNorm running statistics a second time.
    for (name, buffer), (_, plain_buffer) in zip(checkpointed.named_buffers(), plain.named_buffers(), strict=True):
        assert torch.equal(buffer, plain_buffer), name
    if images:  # the ResNet took part: its statistics moved, and equally
        assert not torch.equal(checkpointed.encoder.embed_images.bn1.running_mean, torch.zeros(64))
    assert saved < 0.3 * plain_saved, (saved, plain_saved)  # about 0.2 in both modes

    # Evaluation runs the plain forward (nothing recomputed, nothing to save).
    checkpointed.eval()
    plain.eval()
    inputs, _ = batch(1)
    with torch.no_grad():
        torch.manual_seed(4)
        logits = checkpointed(**inputs).logits
        torch.manual_seed(4)
        torch.testing.assert_close(logits, plain(**inputs).logits)


def test_unknown_mode_is_refused_with_the_config_key() -> None:
    model = BiomedGPTForConditionalGeneration(small_test_config(d_model=32, heads=2))
    with pytest.raises(ValueError, match="model.activation_checkpointing='all'; choose one of"):
        apply_activation_checkpointing(model, "all")
    assert apply_activation_checkpointing(model, "none") == []
