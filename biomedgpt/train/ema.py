"""Exponential moving average (EMA) of the weights, sharded like ZeRO-3 (the VQA fine-tunes'
``--uses-ema --store-ema --ema-fp32`` in BiomedGPT scripts/vqa/train_vqa_rad_beam_scale.sh; fairseq saves the EMA
under ``extra_state["ema"]``, read back by utils/checkpoint_utils.py ``load_ema_from_checkpoint``).

fairseq keeps a full fp32 copy of the model per GPU. Here each rank averages only its own ZeRO-3 partition of every
parameter (``p.ds_tensor``, ``ceil(numel / world)`` elements), in fp32 whatever the training precision, so the EMA
costs ``4 * params / world`` bytes per rank and training never gathers for it. The full EMA model is assembled only
when asked (``materialize_full_model`` / ``plain_copy``: validation, export), one parameter at a time.

Semantics follow fairseq's EMA (BiomedGPT fairseq/fairseq/models/ema/ema.py): ``ema = d * ema + (1 - d) * value`` for
every floating entry of the state dict (parameters, frozen ones included, and persistent float buffers such as
BatchNorm running statistics); non-float buffers (``num_batches_tracked``) are copied; before ``start_step`` the
decay is 0, so the EMA follows the weights. The EMA starts as a copy of the weights it is built from.

Buffers are not partitioned by ZeRO-3 and BatchNorm statistics are per rank (no SyncBN), so each rank averages its
own buffers, as every fairseq rank did; a checkpoint keeps every rank's, and a resumed rank takes those of the
same rank (rank 0's when the old run had fewer ranks).

DeepSpeed internals relied on (DeepSpeed 0.19, ``runtime/zero/partition_parameters.py``): a ZeRO-3 parameter has
``ds_tensor`` (this rank's flat partition, equal size on all ranks of ``ds_process_group``, the last ones zero- or
garbage-padded), ``ds_numel``, ``ds_shape`` and ``ds_process_group``; rank ``r`` holds elements
``[r * size, (r + 1) * size)`` of the flattened parameter; the optimizer step writes the new weights into
``ds_tensor``. Parameters without ``ds_tensor`` (ZeRO 0-2, no DeepSpeed) are treated as one full partition.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from biomedgpt.runtime.collectives import communication_device, distributed

STATE_FORMAT = "biomedgpt-sharded-ema/1"


@dataclass(frozen=True)
class _Layout:
    """Where this rank's EMA shard of one parameter sits in the full tensor."""

    shape: torch.Size  # full shape
    numel: int  # full number of elements
    partitioned: bool  # ZeRO-3: the shard is a slice; otherwise it is the whole tensor
    rank: int  # rank in the partition group (0 when not partitioned)
    world: int  # size of the partition group (1 when not partitioned)
    size: int  # elements in the shard (padded for partitioned parameters)

    @property
    def valid(self) -> int:
        """Elements of the shard that belong to the parameter (the rest is padding)."""
        return max(0, min(self.size, self.numel - self.rank * self.size))


def _is_partitioned(param: torch.Tensor) -> bool:
    return getattr(param, "ds_tensor", None) is not None


def _group_of(param: torch.Tensor) -> Any:
    return getattr(param, "ds_process_group", None)


def _group_rank_world(group: Any) -> tuple[int, int]:
    if not distributed():
        return 0, 1
    return dist.get_rank(group=group), dist.get_world_size(group=group)


def _global_rank_world() -> tuple[int, int]:
    return _group_rank_world(None)


def _layout_of(param: torch.Tensor) -> _Layout:
    if not _is_partitioned(param):
        return _Layout(param.shape, param.numel(), False, 0, 1, param.numel())
    rank, world = _group_rank_world(_group_of(param))
    size = param.ds_tensor.numel()
    if size * world < param.ds_numel:  # e.g. a partition swapped out to NVMe: nothing to average here
        raise NotImplementedError(
            f"a ZeRO-3 partition of {size} elements on {world} ranks cannot hold {param.ds_numel} (NVMe offload of "
            "parameters is not supported by the EMA)"
        )
    return _Layout(torch.Size(param.ds_shape), int(param.ds_numel), True, rank, world, size)


def _local_values(param: torch.Tensor) -> torch.Tensor:
    """This rank's flat partition of ``param`` (ZeRO-3), or the whole tensor flattened."""
    return param.ds_tensor.reshape(-1) if _is_partitioned(param) else param.detach().reshape(-1)


def _persistent_buffers(module: torch.nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """The buffers ``state_dict`` holds (fairseq's EMA runs over the state dict); non-persistent ones, like the
    relative-position buckets, are rebuilt from the config and never averaged."""
    for name, buffer in module.named_buffers():
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if leaf not in getattr(owner, "_non_persistent_buffers_set", ()):
            yield name, buffer


def _describe_names(names: Iterable[str], limit: int = 5) -> str:
    names = sorted(names)
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _all_gather_flat(part: torch.Tensor, group: Any, numel: int) -> torch.Tensor:
    """Concatenate every rank's equal-size flat ``part`` and drop the padding: the full flat tensor."""
    _, world = _group_rank_world(group)
    if world == 1:
        return part[:numel]
    device = part.device if part.device.type != "cpu" else communication_device(group)  # offloaded: via the GPU
    part = part.to(device)
    flat = torch.empty(world * part.numel(), dtype=part.dtype, device=device)
    if dist.get_backend(group) == "nccl":
        dist.all_gather_into_tensor(flat, part, group=group)
    else:  # gloo has no all_gather_into_tensor; gather into views of one buffer instead
        dist.all_gather(list(flat.chunk(world)), part, group=group)
    return flat[:numel]


def _named(module: torch.nn.Module, kind: str) -> Iterable[tuple[str, torch.Tensor]]:
    if kind == "parameter":
        return module.named_parameters(remove_duplicate=False)
    return module.named_buffers(remove_duplicate=False)


def _tie_groups(module: torch.nn.Module, kind: str) -> dict[str, list[str]]:
    """Each parameter (``kind="parameter"``) or buffer (``"buffer"``), under the name ``named_parameters()`` /
    ``named_buffers()`` yields it -> every name it is reachable under (tied or shared)."""
    first: dict[int, str] = {}
    groups: dict[str, list[str]] = {}
    for name, tensor in _named(module, kind):
        key = first.setdefault(id(tensor), name)
        groups.setdefault(key, []).append(name)
    return groups


def _tie_like(module: torch.nn.Module, target: torch.nn.Module) -> None:
    """Make ``target`` share parameters and buffers where ``module`` does: the tied embedding / LM head, and the
    relative-position buckets the encoder and decoder share. ``to_empty`` gives every alias its own tensor."""
    for kind in ("parameter", "buffer"):
        for kept, names in _tie_groups(module, kind).items():
            if len(names) == 1:
                continue
            try:
                tensor = target.get_parameter(kept) if kind == "parameter" else target.get_buffer(kept)
            except AttributeError:
                raise ValueError(f"the target model has no {kind} {kept!r}") from None
            for alias in names[1:]:
                owner_name, _, leaf = alias.rpartition(".")
                owner = target.get_submodule(owner_name) if owner_name else target
                slots = owner._parameters if kind == "parameter" else owner._buffers
                slots[leaf] = tensor  # re-tying needs the owner's own slot


class ShardedEMA:
    """Exponential moving average of the weights, kept on each rank's own ZeRO-3 partition (fp32), so it costs
    1/world of the model per rank and never gathers during training."""

    def __init__(self, module: torch.nn.Module, decay: float, start_step: int = 0) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        self.decay = float(decay)
        self.start_step = int(start_step)
        self.num_updates = 0  # the `step` of the last update (0: only the initial copy)
        self.layouts: dict[str, _Layout] = {}
        self.shards: dict[str, torch.Tensor] = {}
        self.buffers: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, param in module.named_parameters():
                layout = _layout_of(param)
                shard = _local_values(param).to(dtype=torch.float32, copy=True)
                shard[layout.valid :].zero_()  # DeepSpeed's padding may hold anything
                self.layouts[name] = layout
                self.shards[name] = shard
            for name, buffer in _persistent_buffers(module):
                dtype = torch.float32 if buffer.is_floating_point() else buffer.dtype
                self.buffers[name] = buffer.detach().to(dtype=dtype, copy=True)
        groups = {(layout.rank, layout.world) for layout in self.layouts.values() if layout.partitioned}
        if len(groups) > 1:
            raise NotImplementedError(f"parameters partitioned over different process groups {sorted(groups)}")
        self.rank, self.world_size = groups.pop() if groups else _global_rank_world()

    # ------------------------------------------------------------------ training

    def decay_at(self, step: int) -> float:
        return 0.0 if step < self.start_step else self.decay

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        """One EMA step from the current weights; call after each optimizer step with ``step`` = completed optimizer
        steps (1 after the first). Local: no communication."""
        decay = self.decay_at(step)
        emas: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        seen = 0
        for name, param in module.named_parameters():
            layout = self._checked_layout(name, param, cheap=True)
            emas.append(self.shards[name][: layout.valid])
            values.append(_local_values(param)[: layout.valid])
            seen += 1
        if seen != len(self.layouts):
            missing = set(self.layouts) - {name for name, _ in module.named_parameters()}
            raise ValueError(f"the module lacks EMA parameters: {_describe_names(missing)}")
        buffers = dict(_persistent_buffers(module))
        if set(buffers) != set(self.buffers):
            differing = _describe_names(set(buffers).symmetric_difference(self.buffers))
            raise ValueError(f"the module's buffers differ from the EMA's: {differing}")
        for name, buffer in buffers.items():
            if buffer.is_floating_point():
                emas.append(self.buffers[name])
                values.append(buffer.detach())
            else:
                self.buffers[name].copy_(buffer)
        if decay == 0.0:
            # A copy, not 0 * ema + value: an inf or NaN in the old average must not survive.
            for ema, value in zip(emas, values):
                ema.copy_(value)
        else:
            # Same ops as fairseq (mul by d, add (1 - d) * value in fp32); foreach runs them as few kernels.
            # bf16 values are promoted inside the add, without an fp32 copy of the partitions.
            torch._foreach_mul_(emas, decay)
            torch._foreach_add_(emas, values, alpha=1.0 - decay)
        self.num_updates = int(step)

    def _checked_layout(self, name: str, param: torch.Tensor, cheap: bool = False) -> _Layout:
        """The layout of ``name``, checked against ``param``; ``cheap`` (every step) skips the process-group
        queries and compares the partitioning and the shard size only."""
        layout = self.layouts.get(name)
        if layout is None:
            raise ValueError(f"parameter {name!r} is not in the EMA (built from a different model?)")
        if cheap:
            same = layout.partitioned == _is_partitioned(param) and layout.size == _local_values(param).numel()
        else:
            same = layout == _layout_of(param)
        if not same:
            raise ValueError(
                f"parameter {name!r} is partitioned differently than when the EMA was built ({layout} vs "
                f"{_layout_of(param)}); build ShardedEMA from the engine's module, after deepspeed.initialize"
            )
        return layout

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """This rank's shards and what resharding needs. Tensors are the live EMA (not copies): save before the
        next ``update``."""
        return {
            "format": STATE_FORMAT,
            "rank": self.rank,
            "world_size": self.world_size,
            "global_rank": _global_rank_world()[0],
            "decay": self.decay,
            "start_step": self.start_step,
            "num_updates": self.num_updates,
            "params": {
                name: {
                    "shard": self.shards[name],
                    "partitioned": layout.partitioned,
                    "numel": layout.numel,
                    "shape": list(layout.shape),
                }
                for name, layout in self.layouts.items()
            },
            "buffers": dict(self.buffers),
        }

    def saved_alike(self, state: Mapping[str, Any]) -> bool:
        """Whether ``state`` is this rank's own, saved under the same partitioning (the usual resume), so that
        :meth:`load_state_dict` can take it without reading any other rank's file."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            return False
        if (int(state["rank"]), int(state["world_size"])) != (self.rank, self.world_size):
            return False
        saved = state["params"]
        return saved.keys() == self.layouts.keys() and all(
            saved[name]["shard"].numel() == self.shards[name].numel()
            and bool(saved[name]["partitioned"]) == layout.partitioned
            and torch.Size(saved[name]["shape"]) == layout.shape
            for name, layout in self.layouts.items()
        )

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load this rank's own ``state_dict()`` saved under the same partitioning: 1/world of the model read per
        rank instead of the whole. Other layouts need :meth:`load_state_dicts` with every saving rank's state."""
        if not self.saved_alike(state):
            raise ValueError(
                f"the EMA state was not saved by rank {self.rank} of {self.world_size} with this model's partitioning; "
                "load every saving rank's state with load_state_dicts"
            )
        for name, shard in self.shards.items():
            shard.copy_(state["params"][name]["shard"].reshape(shard.shape))
        self._load_buffers([state])
        self.num_updates = int(state.get("num_updates", 0))

    @torch.no_grad()
    def load_state_dicts(self, states: Sequence[Mapping[str, Any]]) -> None:
        """Rebuild this rank's shards from the ``state_dict()`` of every rank of the run that saved them, whatever
        its world size. ``decay`` and ``start_step`` stay those given to the constructor."""
        ordered = self._check_states(states)
        saved_params = ordered[0]["params"]
        unknown = set(saved_params) - set(self.layouts)
        missing = set(self.layouts) - set(saved_params)
        if unknown or missing:
            parts = []
            if missing:
                parts.append(f"missing from the checkpoint: {_describe_names(missing)}")
            if unknown:
                parts.append(f"not parameters of the model: {_describe_names(unknown)}")
            raise ValueError("EMA state does not match the model; " + "; ".join(parts))
        for name, layout in self.layouts.items():
            entry = saved_params[name]
            if torch.Size(entry["shape"]) != layout.shape:
                raise ValueError(
                    f"EMA parameter {name!r} has shape {tuple(entry['shape'])} in the checkpoint but "
                    f"{tuple(layout.shape)} in the model"
                )
            full = self._saved_full(name, [state["params"][name] for state in ordered], layout.numel)
            shard = self.shards[name]
            shard.zero_()
            start = layout.rank * layout.size if layout.partitioned else 0
            piece = full[start : start + layout.valid]
            shard[: piece.numel()].copy_(piece)
        self._load_buffers(ordered)
        self.num_updates = int(ordered[0].get("num_updates", 0))

    def _check_states(self, states: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        if not states:
            raise ValueError("no EMA states given")
        for state in states:
            if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
                raise ValueError(f"not a ShardedEMA state dict (expected format {STATE_FORMAT!r})")
        world = int(states[0]["world_size"])
        by_rank = {int(state["rank"]): state for state in states}
        consistent = all(int(state["world_size"]) == world for state in states) and len(states) == world
        if not consistent or sorted(by_rank) != list(range(world)):
            ranks = sorted(int(state["rank"]) for state in states)
            raise ValueError(f"EMA states of ranks {ranks} given, but the run that saved them had {world} ranks")
        return [by_rank[rank] for rank in range(world)]

    @staticmethod
    def _saved_full(name: str, entries: list[Mapping[str, Any]], numel: int) -> torch.Tensor:
        """The full flat EMA of one parameter from the saving ranks' entries."""
        if not entries[0]["partitioned"]:
            full = entries[0]["shard"].reshape(-1)  # every rank held the whole tensor
        else:
            full = torch.cat([entry["shard"].reshape(-1).to(entries[0]["shard"].device) for entry in entries])
        if full.numel() < numel:
            raise ValueError(f"EMA parameter {name!r}: the checkpoint holds {full.numel()} of its {numel} elements")
        return full[:numel]

    def _load_buffers(self, ordered: list[Mapping[str, Any]]) -> None:
        # Buffers are per rank: take the same rank's, or rank 0's when the saving run was smaller.
        global_rank = _global_rank_world()[0]
        source = next((s for s in ordered if int(s.get("global_rank", s["rank"])) == global_rank), ordered[0])
        saved = source["buffers"]
        if set(saved) != set(self.buffers):
            differing = _describe_names(set(saved).symmetric_difference(self.buffers))
            raise ValueError(f"EMA buffers do not match the model: {differing}")
        for name, buffer in self.buffers.items():
            if tuple(saved[name].shape) != tuple(buffer.shape):
                raise ValueError(
                    f"EMA buffer {name!r} has shape {tuple(saved[name].shape)} in the checkpoint but "
                    f"{tuple(buffer.shape)} in the model"
                )
            buffer.copy_(saved[name])

    # ------------------------------------------------------------------ gathering

    def _full_param(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """COLLECTIVE for partitioned parameters: the full EMA of ``name`` (fp32, flat)."""
        layout = self._checked_layout(name, param)
        if not layout.partitioned:
            return self.shards[name]
        return _all_gather_flat(self.shards[name], _group_of(param), layout.numel)


def _full_live_param(param: torch.Tensor) -> torch.Tensor:
    """COLLECTIVE for ZeRO-3 parameters: the full current weights, flat."""
    if not _is_partitioned(param):
        return param.detach().reshape(-1)
    return _all_gather_flat(param.ds_tensor.reshape(-1), _group_of(param), int(param.ds_numel))


@torch.no_grad()
def materialize_full_model(module: torch.nn.Module, target: torch.nn.Module, ema: ShardedEMA | None = None) -> None:
    """COLLECTIVE (every rank, same order): copy the full weights of ``module`` (ZeRO-3-partitioned or ordinary) into
    ``target``, an ordinary model of the same class and config, on every rank; with ``ema``, the EMA weights and EMA
    float buffers instead. Gathers one parameter at a time, so the extra memory is about one parameter. Buffers come
    from ``module`` (replicated under ZeRO-3, per rank for BatchNorm) unless the EMA averages them."""
    _tie_like(module, target)
    target_params = dict(target.named_parameters(remove_duplicate=False))
    for name, param in module.named_parameters():  # tied parameters once, under the name the EMA uses
        shape = torch.Size(param.ds_shape) if _is_partitioned(param) else param.shape
        destination = target_params.get(name)
        if destination is None:
            raise ValueError(f"the target model has no parameter {name!r}")
        if destination.shape != shape:
            raise ValueError(
                f"parameter {name!r}: shape {tuple(shape)} in the module, {tuple(destination.shape)} in the target"
            )
        full = ema._full_param(name, param) if ema is not None else _full_live_param(param)
        destination.copy_(full.view(shape))
        del full  # release the gathered copy before the next one
    target_buffers = dict(target.named_buffers(remove_duplicate=False))
    for name, buffer in module.named_buffers():  # shared buffers once; _tie_like shared them in the target too
        destination = target_buffers.get(name)
        if destination is None:
            raise ValueError(f"the target model has no buffer {name!r}")
        source = ema.buffers.get(name, buffer) if ema is not None else buffer
        if destination.shape != source.shape:
            raise ValueError(
                f"buffer {name!r}: shape {tuple(source.shape)} in the module, {tuple(destination.shape)} in the target"
            )
        if destination is not source:  # a model built in this process may share the cached buckets with `module`
            destination.copy_(source)


def broadcast_buffers(model: torch.nn.Module, src: int = 0) -> None:
    """COLLECTIVE: give every rank's ``model`` the persistent buffers of rank ``src``. BatchNorm statistics drift
    apart per rank (DeepSpeed does not broadcast buffers as DDP does), and checkpoints keep rank 0's."""
    if distributed() and dist.get_world_size() > 1:
        for _, buffer in _persistent_buffers(model):
            dist.broadcast(buffer, src=src)


def plain_copy(
    module: torch.nn.Module,
    device: torch.device | str,
    ema: ShardedEMA | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """COLLECTIVE: an ordinary (non-partitioned) model of ``module``'s class and config on ``device``, holding the
    full weights of ``module`` (or of ``ema``), in eval mode. Built on the meta device, so no random init is paid.

    ``dtype`` casts the floating parameters and buffers of the copy; by default they keep the dtype a fresh model has
    (fp32), which holds the fp32 EMA exactly and upcasts bf16 live weights.
    """
    config = copy.deepcopy(module.config)
    with torch.device("meta"):
        target = type(module)(config)
    if dtype is not None:
        target.to(dtype=dtype)
    # Uninitialised memory: every parameter and buffer (the non-persistent buckets too) is overwritten below.
    target.to_empty(device=device)
    materialize_full_model(module, target, ema)  # also re-ties what to_empty untied
    return target.eval()
