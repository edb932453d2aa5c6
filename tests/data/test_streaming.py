"""Reading converted Parquet shards through mosaicml-streaming: registration, local and remote directories,
2-rank epochs, mid-epoch resumption, and resumption with a different number of ranks (elastic determinism).

Ranks are separate processes (this file run as a script, see ``_rank_main``) with ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``/``LOCAL_WORLD_SIZE``/``MASTER_*`` set, as torchrun would; streaming itself sets up gloo and its shared
memory from those. Every dataset gets its own ``local`` cache directory so no two share streaming's shared memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

GLOBAL_BATCH = 6  # samples per optimizer step over all ranks; kept fixed across world sizes (elastic determinism)
NUM_GOOD_ROWS = 60  # a multiple of GLOBAL_BATCH * num_canonical_nodes: no padding, so "exactly once" is exact
NUM_CANONICAL_NODES = 2
SHUFFLE_SEED = 1234
SAVE_AFTER_STEPS = 3  # global steps done before the checkpoint


# --------------------------------------------------------------------------------------------- rank process
# Runs in the spawned rank processes; keep it importable without pytest fixtures.


def _collate(batch: list[dict[str, Any]]) -> dict[str, list[Any]]:
    # A dict of lists, so StreamingDataLoader counts samples per batch correctly (len of the first value).
    return {
        "question_id": [s["question_id"] for s in batch],
        "image_sha1": [hashlib.sha1(s["image"]).hexdigest() for s in batch],
    }


def _make_dataset(job: dict[str, Any], phase: str, per_rank_batch: int) -> Any:
    import streaming

    kwargs: dict[str, Any] = {
        "shuffle": True,
        "shuffle_algo": "py1e",
        "shuffle_seed": SHUFFLE_SEED,
        "num_canonical_nodes": NUM_CANONICAL_NODES,
        "batch_size": per_rank_batch,
    }
    if phase == "epoch_local":
        # The converted directory itself, no remote: what `StreamingDataset(local=DIR)` users do.
        return streaming.StreamingDataset(local=job["data"], **kwargs)
    return streaming.StreamingDataset(remote=job["data"], local=os.path.join(job["cache"], phase), **kwargs)


def _run_loader(job: dict[str, Any], phase: str, state: dict | None, stop_after: int | None) -> dict[str, Any]:
    from streaming import StreamingDataLoader

    world_size = int(os.environ["WORLD_SIZE"])
    per_rank = GLOBAL_BATCH // world_size
    dataset = _make_dataset(job, phase, per_rank)
    loader = StreamingDataLoader(
        dataset, batch_size=per_rank, collate_fn=_collate, num_workers=job["num_workers"], drop_last=False
    )
    if state is not None:
        loader.load_state_dict(state)
    batches, saved = [], None
    for step, batch in enumerate(loader):
        batches.append(batch["question_id"])
        if stop_after is not None and step + 1 == stop_after:
            saved = loader.state_dict()
            break
    del loader  # shuts down its workers before the next phase starts its own
    return {"batches": batches, "state": saved}


def _rank_main(job: dict[str, Any]) -> None:
    from biomedgpt.data import register_parquet_reader
    from biomedgpt.runtime.launcher_env import apply_distributed_env

    env = apply_distributed_env()  # before streaming is imported (register_parquet_reader imports it)
    reader = register_parquet_reader()  # before a plain StreamingDataset over converted shards
    import streaming

    result: dict[str, Any] = {"rank": env.rank, "world_size": env.world_size}
    assert streaming.base.format._readers["parquet"] is reader
    if job.get("epoch"):
        dataset = _make_dataset(job, "epoch_local", GLOBAL_BATCH // env.world_size)
        rows = [(s["question_id"], hashlib.sha1(s["image"]).hexdigest()) for s in dataset]
        result["epoch_rows"] = rows
        result["epoch_len"] = len(dataset)
    if job.get("full"):
        result["full"] = _run_loader(job, "full", None, None)["batches"]
    if job.get("save"):
        partial = _run_loader(job, "partial", None, SAVE_AFTER_STEPS)
        result["partial"] = partial["batches"]
        result["state"] = partial["state"]
    if job.get("resume_self"):
        # A fresh dataset and loader resuming from the state this job just saved (same world size).
        result["resumed_self"] = _run_loader(job, "resumed_self", result["state"], None)["batches"]
    if job.get("resume_from"):
        # A state saved by another job, possibly with another world size (elastic resumption).
        state = json.loads(Path(job["resume_from"]).read_text())
        result["resumed"] = _run_loader(job, "resumed", state, None)["batches"]
    Path(job["result"].format(rank=env.rank)).write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------- helpers (pytest)


def _launch(job: dict[str, Any], world_size: int, timeout: float = 240.0) -> list[dict[str, Any]]:
    """Start ``world_size`` rank processes on this "node" and return their results in rank order."""
    from biomedgpt.train.cli import free_local_port

    port = free_local_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ)
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, json.dumps(job)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    deadline = time.monotonic() + timeout
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outputs.append(out)
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} of {world_size} failed:\n{out[-6000:]}"
    return [json.loads(Path(job["result"].format(rank=r)).read_text()) for r in range(world_size)]


def _global_steps(per_rank_batches: list[list[list[str]]]) -> list[list[str]]:
    """Global batch of each step: rank 0's batch, then rank 1's, ... (how DDP consumes them)."""
    steps = len(per_rank_batches[0])
    assert all(len(b) == steps for b in per_rank_batches), "ranks ran different numbers of steps"
    return [[sid for rank in per_rank_batches for sid in rank[t]] for t in range(steps)]


# --------------------------------------------------------------------------------------------- tests


pytestmark = pytest.mark.usefixtures("single_process")  # in-process datasets here are one rank


@pytest.fixture(scope="module")
def vqa_data(tmp_path_factory: pytest.TempPathFactory, tsvkit: Any) -> dict[str, Any]:
    """60 good VQA rows (plus 2 bad ones) converted into 4 shards with uneven row groups."""
    from biomedgpt.data.convert import convert

    root = tmp_path_factory.mktemp("stream")
    rows: list[Any] = [tsvkit.good_row("vqa", i) for i in range(NUM_GOOD_ROWS)]
    rows.insert(5, b"bad\tline")
    rows.insert(30, b"q-x\timg\twhat?\t1|!+yes\t\tnot-base64!")
    tsv = root / "vqa.tsv"
    tsv.write_bytes(tsvkit.tsv_bytes(rows))
    summary = convert(str(tsv), "vqa", str(root / "data"), rows_per_shard=16, row_group_rows=5)
    assert summary.rows_written == NUM_GOOD_ROWS and summary.rows_rejected == 2
    images = {f"q{i}": hashlib.sha1(tsvkit.image_bytes(i)).hexdigest() for i in range(NUM_GOOD_ROWS)}
    return {"root": root, "data": str(root / "data"), "images": images}


def test_plain_streaming_dataset_reads_rows_after_registration(vqa_data: dict[str, Any]) -> None:
    """In a fresh interpreter: importing biomedgpt.data does not import streaming; a plain StreamingDataset(local=DIR)
    over converted shards is refused (streaming knows no "parquet" format) until register_parquet_reader() is
    called, and then yields the rows."""
    code = (
        "import sys, json\n"
        "import biomedgpt.data\n"
        "assert 'streaming' not in sys.modules, 'biomedgpt.data imported streaming eagerly'\n"
        "import streaming\n"
        "try:\n"
        f"    streaming.StreamingDataset(local={vqa_data['data']!r}, shuffle=False, batch_size=1)\n"
        "    raise SystemExit('read without registration')\n"
        "except KeyError as error:\n"
        "    assert 'parquet' in str(error), error\n"
        "biomedgpt.data.register_parquet_reader()\n"
        f"ds = streaming.StreamingDataset(local={vqa_data['data']!r}, shuffle=False, batch_size=1)\n"
        "print(json.dumps([[s['question_id'], s['answers'], s['source_line']] for s in ds]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r[0] for r in rows] == [f"q{i}" for i in range(NUM_GOOD_ROWS)]
    assert all(r[1] == ["liver"] for r in rows)
    # Lines 6 and 32 were the bad ones: source_line skips them.
    assert [r[2] for r in rows][4:7] == [5, 7, 8]


def test_local_dataset_values_and_random_access(vqa_data: dict[str, Any], tmp_path: Path) -> None:
    import streaming

    from biomedgpt.data import register_parquet_reader

    register_parquet_reader()

    ds = streaming.StreamingDataset(local=vqa_data["data"], shuffle=False, batch_size=1)
    assert len(ds) == NUM_GOOD_ROWS
    sample = ds[17]
    assert sample["question_id"] == "q17" and sample["image_id"] == "img17"
    assert sample["question"] == "what organ 17?" and sample["refs"] == "1|!+liver"
    assert sample["answers"] == ["liver"] and sample["answer_confs"] == [1.0]
    assert hashlib.sha1(sample["image"]).hexdigest() == vqa_data["images"]["q17"]
    assert [ds[i]["question_id"] for i in (59, 0, 33, 32)] == ["q59", "q0", "q33", "q32"]

    # The generic Reader API (raw sample bytes, then decode) gives the same row.
    shard = ds.shards[1]
    assert shard.decode_sample(shard.get_sample_data(3)) == shard[3]
    assert [s["question_id"] for s in shard] == [shard[i]["question_id"] for i in range(shard.samples)]
    with pytest.raises(IndexError):
        shard[shard.samples]
    # Shard readers travel to DataLoader workers by pickle; the class is found by its module path.
    blob = pickle.dumps(shard)
    assert b"biomedgpt.data.parquet_shards" in blob and b"ParquetReader" in blob
    assert pickle.loads(blob)[3] == shard[3]


def test_remote_to_local_cache_with_hash_validation_and_eviction(vqa_data: dict[str, Any], tmp_path: Path) -> None:
    """A local path as `remote`: shards are copied into the cache, checked against their sha1, and a cache limit of
    a few shards (streaming's minimum: 4x the largest) forces evictions and re-downloads during the epoch."""
    import streaming

    from biomedgpt.data import register_parquet_reader

    register_parquet_reader()
    from biomedgpt.data.convert import convert
    from biomedgpt.data.parquet_shards import ROW_GROUP_CACHE

    remote = tmp_path / "remote"
    convert(str(vqa_data["root"] / "vqa.tsv"), "vqa", str(remote), rows_per_shard=4, row_group_rows=3)
    index = json.loads((remote / "index.json").read_text())
    assert len(index["shards"]) == 16
    largest = max(s["raw_data"]["bytes"] for s in index["shards"])
    cache = tmp_path / "cache"
    ROW_GROUP_CACHE.clear()
    ds = streaming.StreamingDataset(
        remote=str(remote),
        local=str(cache),
        shuffle=True,
        shuffle_algo="py1e",
        num_canonical_nodes=1,
        batch_size=2,
        validate_hash="sha1",
        cache_limit=4 * largest + (remote / "index.json").stat().st_size,
        # Look ahead less than the cache holds: with streaming's default look-ahead (8 batches, here most shards)
        # its download thread can evict a shard its ready thread waits for, and that thread then waits forever.
        predownload=2,
    )
    # Watchdog: should streaming's threads ever deadlock, its stop event ends the epoch early (and the assertion
    # below fails) instead of hanging the test session.
    watchdog = threading.Timer(120, lambda: getattr(ds, "_event", threading.Event()).set())
    watchdog.start()
    seen = []
    try:
        for sample in ds:
            assert hashlib.sha1(sample["image"]).hexdigest() == vqa_data["images"][sample["question_id"]]
            seen.append(sample["question_id"])
            ROW_GROUP_CACHE.clear()  # make every read touch the file, so evicted shards must be fetched again
    finally:
        watchdog.cancel()
    assert sorted(seen) == sorted(vqa_data["images"])
    cached = sorted((p.name, p.stat().st_size) for p in cache.glob("*"))
    assert len(cached) - 1 < len(index["shards"])  # shards were evicted on the way
    # Streaming's accounting (from the reader's sizes and evictions) matches the disk. (It can overshoot the limit by
    # a shard when its threads race; that is streaming's business.)
    assert sum(size for _, size in cached) == ds.cache_usage <= ds.cache_limit + largest


def test_tampered_shard_fails_hash_validation(vqa_data: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    import streaming

    from biomedgpt.data import register_parquet_reader

    register_parquet_reader()

    remote = tmp_path / "remote"
    shutil.copytree(vqa_data["data"], remote)
    shard = remote / "shard.00000.parquet"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    ds = streaming.StreamingDataset(
        remote=str(remote), local=str(tmp_path / "cache"), shuffle=False, batch_size=1, validate_hash="sha1"
    )
    with pytest.raises(Exception, match="Checksum failure"):
        ds[0]


@pytest.fixture(scope="module")
def rank_runs(vqa_data: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Three launches: A (2 ranks) epoch + full run + save/resume; B (1 rank) full run + save + resume from A's
    state; C (2 ranks) resume from B's state. Different DataLoader worker counts on purpose."""
    root = vqa_data["root"]
    base = {"data": vqa_data["data"]}
    a = _launch(
        {
            **base,
            "cache": str(root / "cache_a"),
            "num_workers": 0,
            "epoch": True,
            "full": True,
            "save": True,
            "resume_self": True,
            "result": str(root / "a{rank}.json"),
        },
        world_size=2,
    )
    state_a = root / "state_a.json"
    state_a.write_text(json.dumps(a[0]["state"]))
    b = _launch(
        {
            **base,
            "cache": str(root / "cache_b"),
            "num_workers": 2,
            "full": True,
            "save": True,
            "resume_self": True,
            "resume_from": str(state_a),
            "result": str(root / "b{rank}.json"),
        },
        world_size=1,
    )
    state_b = root / "state_b.json"
    state_b.write_text(json.dumps(b[0]["state"]))
    c = _launch(
        {
            **base,
            "cache": str(root / "cache_c"),
            "num_workers": 1,
            "resume_from": str(state_b),
            "result": str(root / "c{rank}.json"),
        },
        world_size=2,
    )
    return {"a": a, "b": b, "c": c}


@pytest.mark.slow
def test_two_ranks_read_every_row_exactly_once(rank_runs: dict[str, list[dict[str, Any]]], vqa_data: dict) -> None:
    a = rank_runs["a"]
    per_rank = [[qid for qid, _ in r["epoch_rows"]] for r in a]
    assert [len(p) for p in per_rank] == [NUM_GOOD_ROWS // 2] * 2
    assert all(r["epoch_len"] == NUM_GOOD_ROWS // 2 for r in a)
    union = per_rank[0] + per_rank[1]
    assert sorted(union) == sorted(vqa_data["images"])  # every row, no duplicates
    assert all(vqa_data["images"][qid] == sha for r in a for qid, sha in r["epoch_rows"])  # exact image bytes
    assert per_rank[0] != sorted(per_rank[0])  # py1e actually shuffled
    # The loader-driven full run covers the epoch exactly once as well.
    full = _global_steps([r["full"] for r in a])
    assert sorted(s for step in full for s in step) == sorted(vqa_data["images"])


@pytest.mark.slow
def test_mid_epoch_resume_continues_exactly(rank_runs: dict[str, list[dict[str, Any]]]) -> None:
    for name in ("a", "b"):
        runs = rank_runs[name]
        full = _global_steps([r["full"] for r in runs])
        assert _global_steps([r["partial"] for r in runs]) == full[:SAVE_AFTER_STEPS]
        assert _global_steps([r["resumed_self"] for r in runs]) == full[SAVE_AFTER_STEPS:]
        state = runs[0]["state"]
        assert state["sample_in_epoch"] == SAVE_AFTER_STEPS * GLOBAL_BATCH
        assert state["num_canonical_nodes"] == NUM_CANONICAL_NODES and state["shuffle_seed"] == SHUFFLE_SEED
        assert all(r["state"] == state for r in runs)  # every rank computes the same global state


@pytest.mark.slow
def test_elastic_resume_with_a_different_number_of_ranks(rank_runs: dict[str, list[dict[str, Any]]]) -> None:
    full_2 = _global_steps([r["full"] for r in rank_runs["a"]])
    full_1 = _global_steps([r["full"] for r in rank_runs["b"]])
    # Elastic determinism: the same samples in every global batch whatever the number of ranks (the order inside a
    # global batch follows the rank layout, which a data-parallel step does not see).
    assert [sorted(step) for step in full_1] == [sorted(step) for step in full_2]
    # Saved with 2 ranks, resumed with 1: exactly the rest of an uninterrupted 1-rank run, the same global batches
    # as the rest of the 2-rank run.
    resumed_1 = _global_steps([rank_runs["b"][0]["resumed"]])
    assert resumed_1 == full_1[SAVE_AFTER_STEPS:]
    assert [sorted(s) for s in resumed_1] == [sorted(s) for s in full_2[SAVE_AFTER_STEPS:]]
    # Saved with 1 rank, resumed with 2.
    resumed_2 = _global_steps([r["resumed"] for r in rank_runs["c"]])
    assert resumed_2 == full_2[SAVE_AFTER_STEPS:]
    # Nothing seen twice, nothing skipped, across the interruption.
    seen = [s for step in full_2[:SAVE_AFTER_STEPS] + resumed_2 for s in step]
    assert sorted(seen) == sorted(s for step in full_2 for s in step) and len(set(seen)) == NUM_GOOD_ROWS


if __name__ == "__main__":
    _rank_main(json.loads(sys.argv[1]))
