"""Freeing the shared memory of killed runs without touching live jobs on the same node."""

from __future__ import annotations

import mmap
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import pytest

from biomedgpt.runtime.shared_memory import SHM_DIR, free_stale_shared_memory, stale_shared_memory

pytestmark = pytest.mark.skipif(not (SHM_DIR.is_dir() and Path("/proc/self/maps").is_file()), reason="Linux only")

# Prefixes far above what streaming hands out (it counts up from 0) and distinct per test process, so these fakes
# meet no real job and no other test session.
_BASE = 900000 + (os.getpid() % 30000) * 3
STALE, LIVE, FOREIGN = (f"{_BASE + offset:06d}" for offset in range(3))
PORT = 10000 + os.getpid() % 50000  # in the fake DeepSpeed buffer names


def _block(name: str, size: int = 16) -> Path:
    """A block nobody holds: what a SIGKILLed process leaves."""
    path = SHM_DIR / name
    path.write_bytes(b"\0" * size)
    return path


def _held(name: str) -> SharedMemory:
    """A block this process holds open and mapped, as a live job does."""
    block = SharedMemory(name=name, create=True, size=16)
    resource_tracker.unregister(block._name, "shared_memory")  # the test unlinks it itself
    return block


def test_only_blocks_no_process_holds_are_freed_job_by_job() -> None:
    uid = os.getuid()
    stale = [_block(f"{STALE}_locals"), _block(f"{STALE}_barrier"), _block(f"{STALE}_epoch_data")]
    stale += [_block(f"deepspeed_allreduce_buffer_{uid}_127.0.0.9_{PORT}_{rank}") for rank in (0, 1)]
    # A live streaming job: one held block keeps its unheld sibling too.
    live = _held(f"{LIVE}_locals")
    sibling = _block(f"{LIVE}_next_epoch")
    # A live DeepSpeed buffer, mapped but with its descriptor closed (DeepSpeed keeps only the mapping).
    mapped = _block(f"deepspeed_allreduce_buffer_{uid}_127.0.0.9_{PORT + 1}_0", size=mmap.PAGESIZE)
    with open(mapped, "r+b") as handle:
        mapping = mmap.mmap(handle.fileno(), mmap.PAGESIZE)
    unrelated = [_block(f"{STALE}_not_a_streaming_block"), _block("someone_elses_block")]
    foreign = []
    if uid == 0:  # only root can give a block to another user
        foreign.append(_block(f"{FOREIGN}_locals"))
        os.chown(foreign[0], 12345, 12345)  # another user's job: never ours to free
    kept = [SHM_DIR / live.name, sibling, mapped, *unrelated, *foreign]
    try:
        candidates = set(stale_shared_memory())
        assert set(stale) <= candidates
        assert not candidates & set(kept)

        assert free_stale_shared_memory(local_main=False) == []  # only the node's local rank 0 frees
        assert all(path.exists() for path in stale)

        freed = free_stale_shared_memory(local_main=True)
        assert {path.name for path in stale} <= set(freed)
        assert not any(path.exists() for path in stale)
        assert all(path.exists() for path in kept)
        assert not {path.name for path in kept} & set(freed)
    finally:
        mapping.close()
        live.close()
        for path in [*stale, *kept]:
            path.unlink(missing_ok=True)


def test_blocks_are_matched_by_inode_not_by_path(tmp_path: Path) -> None:
    """Through a symlink to /dev/shm the paths in /proc do not match, the files do."""
    held = _held(f"{LIVE}_locals")
    stale = _block(f"{STALE}_locals")
    link = tmp_path / "shm"
    link.symlink_to(SHM_DIR)
    try:
        names = [path.name for path in stale_shared_memory(link)]
        assert stale.name in names and held.name not in names
    finally:
        held.close()
        (SHM_DIR / held.name).unlink(missing_ok=True)
        stale.unlink(missing_ok=True)


HIDE_A_PROCESS = """
import os, subprocess, sys, time
from biomedgpt.runtime.shared_memory import UninspectableProcessError, held_files  # before losing access to .venv

os.setgid(12345)
os.setuid(12345)
# An execute-only program makes its process non-dumpable: its /proc/<pid>/fd belongs to root from then on.
hidden = subprocess.Popen([sys.argv[1], "60"])
time.sleep(0.5)
try:
    held_files()
    print("inspected")
except UninspectableProcessError as error:
    print("refused:", error)
finally:
    hidden.kill()
"""


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run as another user")
def test_an_uninspectable_python_process_of_the_user_means_nothing_is_freed() -> None:
    folder = Path(tempfile.mkdtemp())
    try:
        folder.chmod(0o755)
        stand_in = folder / "python-stand-in"  # a name that says Python, as a rank's command line does
        shutil.copy(shutil.which("sleep") or "/bin/sleep", stand_in)
        stand_in.chmod(0o111)
        out = subprocess.run(
            [sys.executable, "-c", HIDE_A_PROCESS, str(stand_in)], capture_output=True, text=True, timeout=120
        )
    finally:
        shutil.rmtree(folder)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("refused: cannot read the open files of Python process"), out.stdout


HOLD_A_DATASET = textwrap.dedent(
    """
    import sys
    from streaming import StreamingDataset

    from biomedgpt.data import register_parquet_reader

    register_parquet_reader()

    dataset = StreamingDataset(local=sys.argv[1], batch_size=2, shuffle=False)
    print(f"{dataset._shm_prefix_int:06d}", flush=True)
    sys.stdin.readline()  # the test frees shared memory meanwhile
    print(sum(1 for _ in dataset), flush=True)
    """
)


def _start_holding(data: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "LOCAL_WORLD_SIZE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_A_DATASET, str(data)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    prefix = proc.stdout.readline().strip()
    assert prefix.isdigit(), proc.stderr.read() if proc.stderr else "no output"
    return proc, prefix


@pytest.mark.slow
def test_a_live_streaming_job_survives_while_a_killed_ones_memory_is_freed(tmp_path: Path) -> None:
    from biomedgpt.data.convert import convert
    from biomedgpt.data.sample_corpus import write_sample_corpus

    write_sample_corpus(tmp_path / "corpus", rows=16, seed=0, image_size=32)
    data, rows = {}, {}
    for name in ("vqa_train", "vqa_val"):  # two cache directories: two jobs may not share one
        data[name] = tmp_path / name
        summary = convert(str(tmp_path / "corpus" / f"{name}.tsv"), "vqa", str(data[name]))
        assert summary.rows_rejected == 0
        rows[name] = summary.rows_written

    # The live job starts first: streaming's prefix search in a later job maps the earlier jobs' blocks (and keeps
    # them mapped), so stale blocks met by a live job are only freed after it ends.
    live, live_prefix = _start_holding(data["vqa_train"])
    try:
        killed, killed_prefix = _start_holding(data["vqa_val"])
        # The whole process group, as SLURM or the OOM killer ends a job: Python's resource tracker, which would
        # otherwise unlink the blocks of a process that dies, goes with it.
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait(timeout=60)
        left_behind = sorted(path.name for path in SHM_DIR.glob(f"{killed_prefix}_*"))
        assert killed_prefix != live_prefix and f"{killed_prefix}_locals" in left_behind

        live_blocks = sorted(path.name for path in SHM_DIR.glob(f"{live_prefix}_*"))
        freed = free_stale_shared_memory(local_main=True)
        assert set(left_behind) <= set(freed)
        assert not set(live_blocks) & set(freed)
        assert all((SHM_DIR / name).exists() for name in live_blocks)
        out, err = live.communicate("go\n", timeout=120)
        assert live.returncode == 0, err[-3000:]
        assert int(out.strip()) == rows["vqa_train"]  # the live job reads its whole epoch after the clean-up
    finally:
        if live.poll() is None:
            live.kill()
