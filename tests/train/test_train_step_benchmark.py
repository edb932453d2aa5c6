"""benchmarks/train_step.py at the smallest size: its JSON must be self-consistent, and a failing variant must be
recorded rather than end the run. Real DeepSpeed engines on CPU (gloo, world size 1), no mocks."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_step.py"
# Tiny shapes: a 64 px image (16 patches, 8 kept), 8 text and 6 target tokens, the packaged tokenizer's vocabulary.
SMALL = ["--sizes", "tiny", "--batch", "2", "--image-size", "64", "--patches", "8", "--text-len", "8",
         "--target-len", "6", "--vocab", "tokenizer"]  # fmt: skip


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_step_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch, free_port: int) -> Iterator[ModuleType]:
    """The script as a module, run in this process as world size 1. Its rank variables are set here, through
    monkeypatch, so that they are removed afterwards (the script's own ``setdefault`` would leak them into later
    tests: a LOCAL_WORLD_SIZE=1 left behind breaks the 2-rank launcher tests). Its world-size-1 process group stays
    up, as the other in-process DeepSpeed tests' groups do: DeepSpeed keeps handles to the first group it sees, so
    destroying it here breaks the next ``deepspeed.initialize`` in this process ("Group ... is not registered")."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the triton variant must fail here, fast
    ranks = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for key, value in ranks.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(free_port))
    yield load_script()


def test_one_step_json_fields_are_consistent_and_a_failing_variant_is_recorded(
    bench: ModuleType, tmp_path: Path
) -> None:  # noqa: E501
    out = tmp_path / "result.json"
    argv = [*SMALL, "--attention", "sdpa,triton", "--zero", "2", "--ckpt", "none", "--warmup", "0", "--steps", "1",
            "--peak-tflops", "0.5", "--json", str(out), "--markdown", str(tmp_path / "result.md")]  # fmt: skip
    status = bench.main(argv)
    results = json.loads(out.read_text())
    assert status == 1, "a failed variant must make the exit status 1"
    eager, triton = results["variants"]
    assert triton["attention"] == "triton" and not triton["ok"] and "TRITON_INTERPRET" in triton["error"]
    assert eager["ok"], eager.get("traceback")

    flops = results["flops"]["tiny"]
    counted, formula = flops["counted_flops_per_step"], flops["formula_flops_per_step"]
    # Two independent counts of the same step (torch's dispatcher vs the closed formula): within 5%.
    assert counted > 0 and abs(counted / formula - 1) < 0.05, flops
    assert eager["flops_per_step"] == counted and eager["flops_source"] == "FlopCounterMode"

    steps_per_s = 1 / eager["timed_seconds"]
    assert math.isclose(eager["steps_per_s"], steps_per_s, rel_tol=1e-9)
    assert eager["tokens_per_step"] == 2 * (8 + 8 + 6)
    assert math.isclose(eager["tokens_per_s"], eager["tokens_per_step"] * steps_per_s, rel_tol=1e-9)
    assert math.isclose(eager["samples_per_s"], 2 * steps_per_s, rel_tol=1e-9)
    assert math.isclose(eager["achieved_tflops"], counted * steps_per_s / 1e12, rel_tol=1e-9)
    assert math.isclose(eager["mfu"], eager["achieved_tflops"] / 0.5, rel_tol=1e-9)
    assert len(eager["losses"]) == 2 and all(math.isfinite(x) for x in eager["losses"])  # timed + profiled step
    assert eager["peak_memory_bytes"] > 2**20 and "profiled step" in eager["memory_kind"]
    assert eager["rss_high_water_bytes"] >= eager["peak_memory_bytes"]
    table = (tmp_path / "result.md").read_text()
    assert "tiny/sdpa+plain/zero2/ckpt=none | yes" in table and "**failed**" in table


@pytest.mark.slow
def test_zero3_save_resume_continues_and_consolidation_equals_the_engine(bench: ModuleType, tmp_path: Path) -> None:
    """What gpu_check.sh's stage 2 runs in bf16 on a GPU, here in fp32: the resumed run repeats the losses the
    saving run had after its save, and the consolidated model's weights are the resumed engine's."""
    common = [*SMALL, "--variants", "eager", "--zero", "3", "--ckpt", "none", "--warmup", "0", "--no-flop-count"]
    ckpt = tmp_path / "ckpt"
    assert bench.main([*common, "--steps", "1", "--save-checkpoint", str(ckpt), "--after-save-steps", "2",
                       "--json", str(tmp_path / "save.json")]) == 0  # fmt: skip
    assert bench.main([*common, "--steps", "2", "--resume", str(ckpt), "--consolidate", str(tmp_path / "model"),
                       "--json", str(tmp_path / "resume.json")]) == 0  # fmt: skip
    saved = json.loads((tmp_path / "save.json").read_text())["variants"][0]
    resumed = json.loads((tmp_path / "resume.json").read_text())["variants"][0]
    # On CPU each variant runs one more, profiled step for its peak memory: 1 timed + 1 profiled before the save.
    assert resumed["resumed_from_step"] == saved["saved_at_step"] == 2
    after_save = saved["losses_after_save"]
    assert len(after_save) == 2 and len(resumed["losses"]) == 3
    assert resumed["losses"][:2] == after_save  # same weights, Adam moments, batch and dropout draws
    consolidation = resumed["consolidation"]
    assert consolidation["equal"] and consolidation["compared_tensors"] > 100, consolidation
