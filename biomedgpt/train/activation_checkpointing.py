"""Activation checkpointing (and optional ``torch.compile``) applied to a built model from outside its code, as
torchtitan's ``apply_ac`` does: each encoder and decoder layer, and with ``layers+resnet`` each ResNet stage, keeps
only its inputs in forward and recomputes its activations in backward.

The modules are not wrapped (``checkpoint_wrapper`` would insert ``_checkpoint_wrapped_module`` into every parameter
name, which ZeRO-3 checkpoints, ``zero_to_fp32`` and the consolidated model would then carry); their ``forward`` is
replaced on the instance, so ``module(...)`` still runs the module's hooks, DeepSpeed ZeRO-3's parameter gathering
included, and the recompute calls the submodules through theirs.

``torch.utils.checkpoint.checkpoint(use_reentrant=False, preserve_rng_state=True)``: the recompute restores the RNG
state of the forward, so dropout and drop-path draw the same masks (torch docs, "torch.utils.checkpoint"); the
non-reentrant form also works with inputs that need no gradient and keyword arguments. BatchNorm layers in train
mode update their running statistics a second time during the recompute; those are put back afterwards.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, Literal, get_args

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

ActivationCheckpointing = Literal["none", "layers", "layers+resnet"]
_MARK = "_biomedgpt_activation_checkpointing"


@contextlib.contextmanager
def _running_statistics_kept(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers of ``module`` get their running statistics back after the block: the recompute updated
    them once more. (Not ``track_running_stats=False`` there: the recompute must save the same tensors as the
    forward, the running statistics among them.) Restored through ``.data``, which leaves the version counters
    that autograd checks for the saved tensors alone."""
    buffers = [
        buffer
        for norm in module.modules()
        if isinstance(norm, nn.modules.batchnorm._BatchNorm)
        for buffer in (norm.running_mean, norm.running_var, norm.num_batches_tracked)
        if buffer is not None
    ]
    kept = [buffer.detach().clone() for buffer in buffers]
    try:
        yield
    finally:
        for buffer, value in zip(buffers, kept, strict=True):
            buffer.data.copy_(value)


def _checkpointed_forward(module: nn.Module, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if not (module.training and torch.is_grad_enabled()):
        return forward(*args, **kwargs)  # evaluation, generation with a cache: nothing to save memory for
    calls = 0

    def run(*inner_args: Any, **inner_kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            return forward(*inner_args, **inner_kwargs)
        with _running_statistics_kept(module):  # the recompute in backward
            return forward(*inner_args, **inner_kwargs)

    return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


def checkpoint_module(module: nn.Module) -> None:
    """Make ``module``'s forward recompute its activations in backward (training only); idempotent."""
    if getattr(module, _MARK, False):
        return
    module.forward = functools.partial(_checkpointed_forward, module, module.forward)  # type: ignore[method-assign]
    setattr(module, _MARK, True)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> list[str]:
    """Checkpoint the encoder/decoder layers (``layers``) and also the ResNet stages (``layers+resnet``) of a
    BiomedGPT model; returns the names of the checkpointed modules (none for ``none``)."""
    if mode not in get_args(ActivationCheckpointing):
        raise ValueError(
            f"model.activation_checkpointing={mode!r}; choose one of {list(get_args(ActivationCheckpointing))}"
        )
    if mode == "none":
        return []
    names = [f"{part}.layers.{i}" for part in ("encoder", "decoder") for i in range(len(getattr(model, part).layers))]
    if mode == "layers+resnet":
        names += [f"encoder.embed_images.layer{stage}" for stage in (1, 2, 3)]
    for name in names:
        checkpoint_module(model.get_submodule(name))
    return names


def compile_layers(model: nn.Module) -> list[str]:
    """``torch.compile`` each encoder/decoder layer in place (``nn.Module.compile``: parameter names and hooks stay
    as they are); returns the compiled modules' names. Applied after checkpointing, so a checkpointed layer runs
    its compiled forward inside the checkpoint."""
    names = [f"{part}.layers.{i}" for part in ("encoder", "decoder") for i in range(len(getattr(model, part).layers))]
    for name in names:
        model.get_submodule(name).compile()
    return names
