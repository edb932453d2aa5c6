"""The sharded EMA of the weights (``biomedgpt.train.ema``).

Fast tests check the update rule (fairseq's: parameters, BatchNorm statistics, copied integer buffers, the start step)
and the plain copy without DeepSpeed. The slow test runs this file as a 2-rank job (torchrun, gloo, CPU) with a real
DeepSpeed ZeRO-3 engine and checks the gathered weights, the EMA against a reference computed from fully gathered
weights, and resharding the EMA state 2 ranks -> 1 rank and 1 -> 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from model_configs import TEST_VOCAB as VOCAB
from model_configs import small_test_config
from training_jobs import torchrun_script

from biomedgpt.model import BiomedGPTConfig, BiomedGPTForConditionalGeneration
from biomedgpt.train.ema import ShardedEMA, materialize_full_model, plain_copy

REPO = Path(__file__).resolve().parents[2]
DECAY = 0.9  # far from 1, so a few steps move the EMA visibly away from the weights
START_STEP = 2  # step 1 only copies the weights
STEPS = 4


def tiny_config_with_padding(**overrides: Any) -> BiomedGPTConfig:
    # Three heads make the relative-position tables and c_attn odd-sized, so ZeRO-3 pads their partitions.
    return small_test_config(d_model=48, layers=1, heads=3, ffn_dim=48, **overrides)


def make_batch(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(4, 2000, (2, 8), generator=generator),
        "patch_images": torch.randn(2, 3, 32, 32, generator=generator),
        "patch_masks": torch.tensor([True, False]),
        "labels": torch.randint(4, VOCAB, (2, 5), generator=generator),
    }


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


# ---------------------------------------------------------------------- without DeepSpeed


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 4)
        self.norm = torch.nn.BatchNorm1d(4)  # running stats (float) and num_batches_tracked (int64)
        self.frozen = torch.nn.Parameter(torch.randn(2), requires_grad=False)
        self.register_buffer("scratch", torch.zeros(3), persistent=False)


def test_update_follows_fairseq_rule_for_params_bn_stats_and_int_buffers():
    torch.manual_seed(0)
    net = _Net().train()
    ema = ShardedEMA(net, decay=DECAY, start_step=START_STEP)
    assert set(ema.buffers) == {"norm.running_mean", "norm.running_var", "norm.num_batches_tracked"}
    reference = {k: v.double().clone() for k, v in net.state_dict().items() if v.is_floating_point()}
    for step in range(1, STEPS + 1):
        with torch.no_grad():
            for param in net.parameters():
                param.add_(torch.randn_like(param))
        net.norm(net.linear(torch.randn(8, 3)))  # moves the running statistics
        net.scratch.fill_(float(step))
        ema.update(net, step)
        decay = 0.0 if step < START_STEP else DECAY
        for name, value in net.state_dict().items():
            if value.is_floating_point():
                reference[name] = decay * reference[name] + (1 - decay) * value.double()
        averaged = plain_copy_of(net, ema)
        if step == 1:  # before the start step the EMA is a copy of the weights
            for name, value in net.state_dict().items():
                assert torch.equal(averaged[name], value), name
        for name, expected in reference.items():
            torch.testing.assert_close(averaged[name].double(), expected, rtol=0, atol=1e-6, msg=name)
        assert averaged["norm.num_batches_tracked"].item() == step  # integer buffers are copied, not averaged
    assert not torch.allclose(averaged["linear.weight"], net.linear.weight)  # the test moved something
    assert not torch.allclose(averaged["norm.running_mean"], net.norm.running_mean)


def plain_copy_of(net: torch.nn.Module, ema: ShardedEMA) -> dict[str, torch.Tensor]:
    target = _Net()
    materialize_full_model(net, target, ema)
    assert torch.equal(target.scratch, net.scratch)  # non-persistent buffers come from the module
    return full_state(target)


def test_bf16_weights_keep_an_fp32_average():
    torch.manual_seed(0)
    net = _Net().to(torch.bfloat16)
    ema = ShardedEMA(net, decay=DECAY)
    assert all(shard.dtype == torch.float32 for shard in ema.shards.values())
    reference = net.linear.weight.double()
    for step in range(1, 4):
        with torch.no_grad():
            net.linear.weight.add_(torch.randn_like(net.linear.weight))
        ema.update(net, step)
        reference = DECAY * reference + (1 - DECAY) * net.linear.weight.double()
    target = _Net()  # fp32: holds the average without rounding it to bf16
    materialize_full_model(net, target, ema)
    torch.testing.assert_close(target.linear.weight.double(), reference, rtol=1e-6, atol=1e-7)
    assert not torch.equal(target.linear.weight, target.linear.weight.bfloat16().float())


def test_state_dict_round_trip_and_mismatch_names_the_parameter():
    torch.manual_seed(0)
    net = _Net()
    ema = ShardedEMA(net, decay=0.5)
    with torch.no_grad():
        net.linear.weight.add_(1.0)
    ema.update(net, 3)
    state = ema.state_dict()
    assert state["world_size"] == 1 and state["rank"] == 0 and state["num_updates"] == 3
    fresh = ShardedEMA(_Net(), decay=0.5)
    fresh.load_state_dicts([state])
    assert fresh.num_updates == 3
    assert plain_copy_of(net, fresh).keys() == plain_copy_of(net, ema).keys()
    for name, value in plain_copy_of(net, ema).items():
        assert torch.equal(plain_copy_of(net, fresh)[name], value), name

    class Wider(_Net):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(3, 5)
            self.norm = torch.nn.BatchNorm1d(5)

    with pytest.raises(ValueError, match=r"linear\.weight.*shape \(4, 3\).*\(5, 3\)"):
        ShardedEMA(Wider(), decay=0.5).load_state_dicts([state])
    extra = _Net()
    extra.more = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"missing from the checkpoint: more\.bias, more\.weight"):
        ShardedEMA(extra, decay=0.5).load_state_dicts([state])
    with pytest.raises(ValueError, match="ranks \\[0\\].*2 ranks"):
        ShardedEMA(net, decay=0.5).load_state_dicts([{**state, "world_size": 2}])


def test_plain_copy_of_biomedgpt_is_equal_tied_and_runs_the_same():
    torch.manual_seed(0)
    model = BiomedGPTForConditionalGeneration(tiny_config_with_padding()).eval()
    copy = plain_copy(model, "cpu")
    assert not copy.training
    assert copy.decoder.output_projection.weight is copy.encoder.embed_tokens.weight
    assert copy.decoder.embed_tokens is copy.encoder.embed_tokens
    assert copy.decoder.token_rp_bucket is copy.encoder.token_rp_bucket  # shared as in the module
    expected = {**full_state(model), **dict(model.named_buffers())}  # the non-persistent buckets too
    got = {**full_state(copy), **dict(copy.named_buffers())}
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    batch = make_batch(0)
    with torch.no_grad():
        assert torch.equal(copy(**batch).logits, model(**batch).logits)
    half = plain_copy(model, "cpu", dtype=torch.bfloat16)
    assert half.encoder.embed_tokens.weight.dtype == torch.bfloat16
    assert half.decoder.token_rp_bucket.dtype == torch.int64


# ---------------------------------------------------------------------- real DeepSpeed ZeRO-3, 2 ranks


def _gathered(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full parameters (through DeepSpeed's own gathering, independent of ema.py) and persistent buffers."""
    import deepspeed

    out: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            out[name] = param.detach().clone()
    persistent = module.state_dict().keys()
    out.update({name: b.detach().clone() for name, b in module.named_buffers() if name in persistent})
    return out


def _compare(got: torch.nn.Module, expected: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Largest absolute difference over ``expected``'s names, the largest relative to ``max(1, |expected|)`` (fp32
    rounding of values like BatchNorm variances of ~30), and the names that differ at all."""
    state = full_state(got)
    absolute: dict[str, float] = {}
    relative: dict[str, float] = {}
    for name, value in expected.items():
        diff = (state[name].double() - value.double()).abs()
        absolute[name] = float(diff.max())
        relative[name] = float((diff / value.double().abs().clamp(min=1.0)).max())
    return {
        "max_diff": max(absolute.values()),
        "max_rel": max(relative.values()),
        "differ": sorted(n for n, d in absolute.items() if d > 0)[:10],
    }


def _ds_config(world: int) -> dict[str, Any]:
    ds = json.loads((REPO / "biomedgpt" / "train" / "ds_configs" / "zero3_cpu.json").read_text())
    ds.update(
        train_batch_size=2 * world,
        train_micro_batch_size_per_gpu=2,
        gradient_accumulation_steps=1,
        gradient_clipping=1.0,
    )
    return ds


def _worker(out: Path) -> None:
    """One rank of the 2-rank job; writes ``out/result_<rank>.json`` for the test to assert on."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import deepspeed
    import torch.distributed as dist

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    ds = _ds_config(world)
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=dict(ds)):
        model = BiomedGPTForConditionalGeneration(tiny_config_with_padding())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=dict(ds))
    module = engine.module
    result: dict[str, Any] = {"rank": rank, "world": world}

    # 1. The plain copy of the live model: same weights and buffers, still tied, same forward.
    module.eval()
    live = _gathered(module)
    copy = plain_copy(module, "cpu")
    result["copy"] = _compare(copy, live)
    result["copy_buffers_equal"] = all(torch.equal(copy.get_buffer(n), b) for n, b in module.named_buffers())
    result["copy_tied"] = copy.decoder.output_projection.weight is copy.encoder.embed_tokens.weight
    result["copy_eval"] = not copy.training
    result["padded"] = sorted(n for n, p in module.named_parameters() if p.ds_numel % world)[:3]
    batch = make_batch(7)
    with torch.no_grad():
        engine_logits = module(**batch).logits
        copy_logits = copy(**batch).logits
    result["forward_max_diff"] = float((engine_logits - copy_logits).abs().max())
    del copy

    # 2. A few real optimizer steps (different data per rank): EMA against a float64 reference of gathered weights.
    ema = ShardedEMA(module, decay=DECAY, start_step=START_STEP)
    result["ema_shard_fraction"] = sum(s.numel() for s in ema.shards.values()) / sum(t.numel() for t in live.values())
    reference = {name: value.double() for name, value in live.items() if value.is_floating_point()}
    engine.train()
    for step in range(1, STEPS + 1):
        loss = engine(**make_batch(100 * rank + step)).loss
        engine.backward(loss)
        engine.step()
        ema.update(module, step)
        live = _gathered(module)
        decay = 0.0 if step < START_STEP else DECAY
        reference = {name: decay * value + (1 - decay) * live[name].double() for name, value in reference.items()}
        if step == 1:
            result["before_start"] = _compare(plain_copy(module, "cpu", ema), live)
    averaged = plain_copy(module, "cpu", ema)
    result["ema"] = _compare(averaged, reference)
    result["ema_vs_live"] = _compare(averaged, {n: v for n, v in live.items() if v.is_floating_point()})
    state = full_state(averaged)
    result["num_batches_tracked"] = int(state["encoder.embed_images.bn1.num_batches_tracked"])
    result["ema_tied"] = averaged.decoder.output_projection.weight is averaged.encoder.embed_tokens.weight
    torch.save(ema.state_dict(), out / f"ema_rank{rank}.pt")
    torch.save(state, out / f"ema_full_rank{rank}.pt")
    dist.barrier()

    # 3. Same partitioning (the usual resume): this rank's own file alone restores the shards, buffers and count.
    own_state = torch.load(out / f"ema_rank{rank}.pt")
    resumed = ShardedEMA(module, decay=DECAY, start_step=START_STEP)
    result["own_state_alike"] = resumed.saved_alike(own_state)
    result["other_rank_state_alike"] = resumed.saved_alike(torch.load(out / f"ema_rank{1 - rank}.pt"))
    resumed.load_state_dict(own_state)
    result["own_state_load"] = _compare(plain_copy(module, "cpu", resumed), state)
    result["own_state_updates"] = resumed.num_updates
    del own_state, resumed

    # 3a. 2 ranks -> 1 rank: a model partitioned over a process group of this rank alone (a real 1-rank ZeRO-3
    # layout) loads both ranks' EMA states.
    solo_groups = [dist.new_group([r]) for r in range(world)]
    with deepspeed.zero.Init(config_dict_or_path=dict(ds), data_parallel_group=solo_groups[rank]):
        solo = BiomedGPTForConditionalGeneration(tiny_config_with_padding())
    solo_ema = ShardedEMA(solo, decay=DECAY, start_step=START_STEP)
    result["solo_layout"] = [
        solo_ema.rank,
        solo_ema.world_size,
        all(hasattr(p, "ds_tensor") for p in solo.parameters()),
    ]
    solo_ema.load_state_dicts([torch.load(out / f"ema_rank{r}.pt") for r in range(world)])
    result["two_to_one"] = _compare(plain_copy(solo, "cpu", solo_ema), state)
    result["two_to_one_updates"] = solo_ema.num_updates
    if rank == 0:
        torch.save(solo_ema.state_dict(), out / "ema_solo.pt")
    dist.barrier()

    # 3b. 1 rank -> 2 ranks: rank 0's 1-rank state into the 2-rank engine; rank 1 takes rank 0's buffers.
    grown = ShardedEMA(module, decay=DECAY, start_step=START_STEP)
    grown.load_state_dicts([torch.load(out / "ema_solo.pt")])
    result["one_to_two"] = _compare(plain_copy(module, "cpu", grown), torch.load(out / "ema_full_rank0.pt"))

    # 4. ZeRO-2: full parameters on every rank, so every rank's EMA is whole; its states load into the ZeRO-3 layout.
    torch.manual_seed(0)
    model2 = BiomedGPTForConditionalGeneration(tiny_config_with_padding())
    optimizer2 = torch.optim.AdamW(model2.parameters(), lr=1e-2, weight_decay=0.01)
    ds2 = {**ds, "zero_optimization": {"stage": 2}}
    engine2, _, _, _ = deepspeed.initialize(model=model2, optimizer=optimizer2, config=ds2)
    ema2 = ShardedEMA(engine2.module, decay=DECAY)
    reference2 = {n: v.double() for n, v in full_state(engine2.module).items() if v.is_floating_point()}
    for step in (1, 2):
        engine2.backward(engine2(**make_batch(100 * rank + step)).loss)
        engine2.step()
        ema2.update(engine2.module, step)
        now = full_state(engine2.module)
        reference2 = {name: DECAY * value + (1 - DECAY) * now[name].double() for name, value in reference2.items()}
    result["zero2_copy"] = _compare(plain_copy(engine2.module, "cpu"), full_state(engine2.module))
    averaged2 = plain_copy(engine2.module, "cpu", ema2)
    result["zero2_ema"] = _compare(averaged2, reference2)
    torch.save(ema2.state_dict(), out / f"ema2_rank{rank}.pt")
    dist.barrier()
    into_zero3 = ShardedEMA(module, decay=DECAY)
    into_zero3.load_state_dicts([torch.load(out / f"ema2_rank{r}.pt") for r in range(world)])
    result["zero2_to_zero3"] = _compare(plain_copy(module, "cpu", into_zero3), full_state(averaged2))
    (out / f"result_{rank}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def zero3_job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ema_zero3")
    torchrun_script(__file__, out)
    return out


def _results(out: Path) -> list[dict[str, Any]]:
    return [json.loads((out / f"result_{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.slow
def test_zero3_plain_copy_equals_gathered_weights_and_forward(zero3_job):
    for result in _results(zero3_job):
        assert result["padded"], "the config should give parameters that ZeRO-3 pads"
        assert result["copy"] == {"max_diff": 0.0, "max_rel": 0.0, "differ": []}
        assert result["copy_buffers_equal"] and result["copy_tied"] and result["copy_eval"]
        assert result["forward_max_diff"] == 0.0


@pytest.mark.slow
def test_zero3_ema_matches_reference_of_gathered_weights(zero3_job):
    for result in _results(zero3_job):
        assert 0.45 < result["ema_shard_fraction"] < 0.55  # each rank holds about half the parameters
        assert result["before_start"] == {"max_diff": 0.0, "max_rel": 0.0, "differ": []}
        assert result["ema"]["max_rel"] < 1e-6  # fp32 EMA vs a float64 reference
        assert result["ema_vs_live"]["max_diff"] > 1e-4  # the EMA lags the weights
        assert result["num_batches_tracked"] == STEPS
        assert result["ema_tied"]


@pytest.mark.slow
def test_zero3_ema_resumes_from_the_own_rank_file_alone(zero3_job):
    for result in _results(zero3_job):
        assert result["own_state_alike"] and not result["other_rank_state_alike"]
        assert result["own_state_load"] == {"max_diff": 0.0, "max_rel": 0.0, "differ": []}
        assert result["own_state_updates"] == STEPS


@pytest.mark.slow
def test_zero3_ema_state_reshards_two_to_one_and_one_to_two(zero3_job):
    for result in _results(zero3_job):
        assert result["solo_layout"] == [0, 1, True]
        assert result["two_to_one"] == {"max_diff": 0.0, "max_rel": 0.0, "differ": []}
        assert result["two_to_one_updates"] == STEPS
        assert result["one_to_two"] == {"max_diff": 0.0, "max_rel": 0.0, "differ": []}


@pytest.mark.slow
def test_zero2_full_parameters(zero3_job):
    for result in _results(zero3_job):
        assert result["zero2_copy"] == {"max_diff": 0.0, "max_rel": 0.0, "differ": []}
        assert result["zero2_ema"]["max_rel"] < 1e-6
        assert result["zero2_to_zero3"] == {"max_diff": 0.0, "max_rel": 0.0, "differ": []}


@pytest.mark.slow
def test_zero3_ema_state_loads_into_a_plain_model(zero3_job):
    """2 ZeRO-3 ranks -> one process without DeepSpeed or a process group (a plain fp32 model)."""
    torch.manual_seed(1)
    model = BiomedGPTForConditionalGeneration(tiny_config_with_padding())
    ema = ShardedEMA(model, decay=DECAY)
    ema.load_state_dicts([torch.load(zero3_job / f"ema_rank{r}.pt") for r in (1, 0)])  # any order
    expected = torch.load(zero3_job / "ema_full_rank0.pt")
    got = full_state(plain_copy(model, "cpu", ema))
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    assert not ema.saved_alike(torch.load(zero3_job / "ema_rank0.pt"))  # saved as rank 0 of 2, loaded as 0 of 1
    with pytest.raises(ValueError, match="load every saving rank's state with load_state_dicts"):
        ema.load_state_dict(torch.load(zero3_job / "ema_rank0.pt"))
    with pytest.raises(ValueError, match=r"missing from the checkpoint: .*encoder\.layers\.1\.fc1"):
        ShardedEMA(
            BiomedGPTForConditionalGeneration(tiny_config_with_padding(encoder_layers=2)), decay=DECAY
        ).load_state_dicts([torch.load(zero3_job / f"ema_rank{r}.pt") for r in (0, 1)])


if __name__ == "__main__":
    from biomedgpt.runtime.process_exit import exit_without_teardown

    _worker(Path(sys.argv[1]))
    exit_without_teardown(0)  # as the training entry point does: no 2-3 s interpreter teardown per rank
