"""Free the shared memory that killed training runs leave in ``/dev/shm``, and only that.

A run killed by SIGKILL, the OOM killer or a node failure leaves two kinds of POSIX shared memory behind:

* mosaicml-streaming's blocks (``NNNNNN_locals``, ``NNNNNN_barrier``, ...). A stale ``_locals`` block makes the next
  run on the same cache directory fail ("reused local directory"), so they must go before a dataset opens.
* DeepSpeed's CPU all-reduce buffers (``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``, about 70 MB each),
  which otherwise hold RAM until the node reboots.

streaming's own ``clean_stale_shared_memory()`` unlinks every block from prefix 0 upwards whether or not its job is
alive, which breaks another job running on the same node (SLURM packs jobs onto shared nodes). Here a block is stale
only when no process has it open or mapped (``/proc/*/fd`` and ``/proc/*/maps``), judged per job: one live block
keeps all the blocks of its job. Only blocks owned by this user are touched.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch.distributed as dist

__all__ = ["SHM_DIR", "free_stale_shared_memory", "shared_memory_in_use", "stale_shared_memory"]

SHM_DIR = Path("/dev/shm")
PROC_DIR = Path("/proc")

_STREAMING_BLOCK = re.compile(r"(\d{6})_([a-z_]+)")
_DEEPSPEED_BUFFER = re.compile(r"(deepspeed_allreduce_buffer_\d+_.+_\d+)_\d+")


def _streaming_block_names() -> frozenset[str]:
    from streaming.base.constant import SHM_TO_CLEAN

    return frozenset(SHM_TO_CLEAN)


def _job_of(name: str, streaming_names: frozenset[str]) -> str | None:
    """The job a block belongs to (all its blocks share the key), or None for blocks this module never frees."""
    if (match := _STREAMING_BLOCK.fullmatch(name)) and match.group(2) in streaming_names:
        return f"streaming prefix {match.group(1)}"
    if match := _DEEPSPEED_BUFFER.fullmatch(name):
        return match.group(1)
    return None


def shared_memory_in_use(shm_dir: Path = SHM_DIR, proc_dir: Path = PROC_DIR) -> set[str]:
    """Names of the blocks in ``shm_dir`` that a process this user may inspect has open or mapped."""
    prefix = f"{shm_dir}/"
    in_use: set[str] = set()

    def note(path: str) -> None:
        if path.startswith(prefix):
            in_use.add(path[len(prefix) :].removesuffix(" (deleted)"))

    for process in proc_dir.iterdir():
        if not process.name.isdigit():
            continue
        try:
            for descriptor in (process / "fd").iterdir():
                try:
                    note(os.readlink(descriptor))
                except OSError:  # closed meanwhile
                    continue
            with open(process / "maps", encoding="utf-8", errors="replace") as maps:
                for line in maps:
                    start = line.find(prefix)
                    if start >= 0:
                        note(line[start:].rstrip("\n"))
        except OSError:  # another user's process (no permission) or one that has exited
            continue
    return in_use


def stale_shared_memory(shm_dir: Path = SHM_DIR, proc_dir: Path = PROC_DIR) -> list[Path]:
    """This user's streaming blocks and DeepSpeed buffers of jobs none of whose blocks any process holds."""
    streaming_names = _streaming_block_names()
    uid = os.getuid()
    candidates: dict[Path, str] = {}
    # Listed before /proc is read: a block created after the listing is not a candidate, and one created before
    # it is already open in its creator when /proc is read (shm_open returns the descriptor that creates it).
    for entry in shm_dir.iterdir():
        job = _job_of(entry.name, streaming_names)
        try:
            if job is not None and entry.lstat().st_uid == uid:
                candidates[entry] = job
        except FileNotFoundError:
            continue
    if not candidates:
        return []
    in_use = shared_memory_in_use(shm_dir, proc_dir)
    live_jobs = {job for entry, job in candidates.items() if entry.name in in_use}
    return sorted(entry for entry, job in candidates.items() if job not in live_jobs)


def free_stale_shared_memory(local_main: bool, shm_dir: Path = SHM_DIR) -> list[str]:
    """COLLECTIVE when torch.distributed is initialised: the node's local rank 0 (``local_main``) unlinks the stale
    blocks while the other ranks wait. Returns the names unlinked (empty on the other ranks).

    Without ``/proc`` and ``/dev/shm`` (macOS) it falls back to streaming's ``clean_stale_shared_memory()``, which
    frees every streaming block on the machine: run one training job at a time there.
    """
    if not (PROC_DIR / "self" / "maps").is_file() or not shm_dir.is_dir():
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()  # collective itself
        return []
    removed: list[str] = []
    if local_main:
        for path in stale_shared_memory(shm_dir):
            try:
                path.unlink()
            except FileNotFoundError:  # another job's start freed it first
                continue
            removed.append(path.name)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return removed
