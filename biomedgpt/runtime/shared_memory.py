"""Free the shared memory that killed training runs leave in ``/dev/shm``, and only that.

A run killed by SIGKILL, the OOM killer or a node failure leaves two kinds of POSIX shared memory behind:

* mosaicml-streaming's blocks (``NNNNNN_locals``, ``NNNNNN_barrier``, ...). A stale ``_locals`` block makes the next
  run on the same cache directory fail ("reused local directory"), so they must go before a dataset opens.
* DeepSpeed's CPU all-reduce buffers (``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``, about 70 MB each),
  which otherwise hold RAM until the node reboots.

streaming's own ``clean_stale_shared_memory()`` unlinks every block from prefix 0 upwards whether or not its job is
alive, which breaks another job running on the same node (SLURM packs jobs onto shared nodes). Here a block is stale
only when no process has it open or mapped, judged per job: one held block keeps all the blocks of its job. Blocks
are matched to ``/proc/*/fd`` and ``/proc/*/maps`` by device and inode, not by path, and only this user's blocks are
touched. When a Python process of this user cannot be inspected, nothing is freed.

Limits: processes in another PID namespace that shares this ``/dev/shm`` (a container run with ``--ipc=host``) are
invisible here, so their blocks look stale; and a job started after another was killed maps the killed job's
streaming blocks during its prefix search and keeps them, so those are only freed once that job has ended.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch.distributed as dist

from biomedgpt.runtime.collectives import distributed

__all__ = ["SHM_DIR", "free_stale_shared_memory", "held_files", "stale_shared_memory"]

SHM_DIR = Path("/dev/shm")
PROC_DIR = Path("/proc")

_STREAMING_BLOCK = re.compile(r"(\d{6})_([a-z_]+)")
_DEEPSPEED_BUFFER = re.compile(r"(deepspeed_allreduce_buffer_\d+_.+_\d+)_\d+")

FileId = tuple[int, int]  # (st_dev, st_ino)


class UninspectableProcessError(RuntimeError):
    """A process of this user whose open files cannot be read: it might hold any block."""


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


def _mapped_files(maps: Path) -> set[FileId]:
    found: set[FileId] = set()
    with open(maps, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
            if len(fields) >= 5 and fields[4] != "0":
                major, minor = fields[3].split(":")
                found.add((os.makedev(int(major, 16), int(minor, 16)), int(fields[4])))
    return found


def _open_files(fd_dir: Path) -> set[FileId]:
    found: set[FileId] = set()
    for descriptor in fd_dir.iterdir():
        try:
            stat = os.stat(descriptor)  # follows the link to the open file, deleted or not
        except FileNotFoundError:  # closed meanwhile
            continue
        found.add((stat.st_dev, stat.st_ino))
    return found


def held_files(proc_dir: Path = PROC_DIR) -> set[FileId]:
    """Device and inode of every file a process has open or mapped, over the processes this user may inspect.

    Raises :class:`UninspectableProcessError` when a Python process of this user cannot be read.
    """
    uid = os.getuid()
    held: set[FileId] = set()
    for process in proc_dir.iterdir():
        if not process.name.isdigit():
            continue
        try:
            held |= _open_files(process / "fd")
            held |= _mapped_files(process / "maps")
        except PermissionError as error:
            # Only Python processes (training ranks, their data workers) create these blocks; init and system
            # daemons that even root may not inspect in a sandbox cannot hold them.
            if _effective_uid(process) in (uid, None) and _runs_python(process):
                raise UninspectableProcessError(
                    f"cannot read the open files of Python process {process.name} (not dumpable?)"
                ) from error
        except (FileNotFoundError, ProcessLookupError):  # exited meanwhile
            continue
    return held


def _runs_python(process: Path) -> bool:
    """From ``cmdline`` and ``comm``, which anyone may read: torch renames its helpers (``pt_elastic``, ...)."""
    try:
        command = (process / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        name = (process / "comm").read_text().strip()
    except OSError:
        return True  # cannot tell: assume it might
    return "python" in command or name.startswith("pt_")


def _effective_uid(process: Path) -> int | None:
    """From ``status``, which anyone may read; the owner of ``/proc/<pid>`` reads root for a non-dumpable process."""
    try:
        for line in (process / "status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[2])
    except (OSError, ValueError, IndexError):
        return None
    return None


def stale_shared_memory(shm_dir: Path = SHM_DIR, proc_dir: Path = PROC_DIR) -> list[Path]:
    """This user's streaming blocks and DeepSpeed buffers of jobs none of whose blocks any process holds.

    Raises :class:`UninspectableProcessError` when that cannot be told (see :func:`held_files`)."""
    streaming_names = _streaming_block_names()
    uid = os.getuid()
    candidates: dict[Path, tuple[str, FileId]] = {}
    # Listed before /proc is read: a block created after the listing is not a candidate, and one created before
    # it is already open in its creator when /proc is read (shm_open returns the descriptor that creates it).
    for entry in shm_dir.iterdir():
        job = _job_of(entry.name, streaming_names)
        if job is None:
            continue
        try:
            stat = entry.lstat()
        except FileNotFoundError:
            continue
        if stat.st_uid == uid:
            candidates[entry] = (job, (stat.st_dev, stat.st_ino))
    if not candidates:
        return []
    held = held_files(proc_dir)
    live_jobs = {job for job, file_id in candidates.values() if file_id in held}
    return sorted(entry for entry, (job, _) in candidates.items() if job not in live_jobs)


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
        try:
            stale = stale_shared_memory(shm_dir)
        except UninspectableProcessError as error:
            warnings.warn(f"not freeing stale shared memory in {shm_dir}: {error}", stacklevel=2)
            stale = []
        for path in stale:
            try:
                path.unlink()
            except FileNotFoundError:  # another job's start freed it first
                continue
            removed.append(path.name)
    if distributed():
        dist.barrier()
    return removed
