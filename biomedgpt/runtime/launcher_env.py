"""Map launcher variables to ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and ``LOCAL_WORLD_SIZE``.

mosaicml-streaming (and torch.distributed's ``env://``) read exactly those names; ``LOCAL_WORLD_SIZE`` matters most:
streaming defaults it to 1, which with several ranks per node makes every rank believe it is a node of its own
(wrong partitioning, shared memory clashes). Launchers spell these differently:

* torchrun: sets all four (and ``MASTER_ADDR``/``MASTER_PORT``).
* deepspeed launcher: ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and ``LOCAL_SIZE`` (not ``LOCAL_WORLD_SIZE``),
  ``CROSS_RANK`` = node index.
* Open MPI (``mpirun``, deepspeed's MPI runners): ``OMPI_COMM_WORLD_{RANK,LOCAL_RANK,SIZE,LOCAL_SIZE}``.
* SLURM ``srun``: ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NTASKS``, ``SLURM_NODEID`` and tasks per node as
  ``SLURM_NTASKS_PER_NODE`` (only when requested) or ``SLURM_TASKS_PER_NODE`` (``"4(x2),3"``); the first host of
  ``SLURM_JOB_NODELIST`` becomes ``MASTER_ADDR``.

Values already in the environment always win: an ``sbatch`` script that runs torchrun has SLURM variables *and*
torchrun's, and torchrun's are the right ones for its children.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

__all__ = [
    "DistributedEnv",
    "apply_distributed_env",
    "detect_distributed_env",
    "distributed_env_updates",
    "first_slurm_host",
    "slurm_tasks_on_node",
]

# SLURM_STEP_ID is unset outside steps; the batch/extern steps get these special ids (SLURM_BATCH_SCRIPT etc.).
_NOT_SRUN_STEPS = (None, "", "batch", "extern", "4294967294", "4294967295")


@dataclass(frozen=True)
class DistributedEnv:
    """The resolved topology of this process."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    launcher: str  # "env" (already set / torchrun), "deepspeed", "mpi", "slurm" or "none"

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def slurm_tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Tasks on node ``node_id`` from SLURM's compressed list, e.g. ``"4(x2),3"`` -> 4, 4, 3."""
    counts: list[int] = []
    for item in tasks_per_node.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise ValueError(f"cannot parse SLURM tasks per node {tasks_per_node!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    if node_id < len(counts):
        return counts[node_id]
    if len(counts) == 1:
        # A single plain number (how SLURM_NTASKS_PER_NODE is written) applies to every node.
        return counts[0]
    raise ValueError(f"SLURM node id {node_id} is beyond the tasks-per-node list {tasks_per_node!r}")


def _num_listed_nodes(tasks_per_node: str) -> int:
    return sum(int(m.group(2) or 1) for m in re.finditer(r"(\d+)(?:\(x(\d+)\))?", tasks_per_node))


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM host list: ``"gpu[003-004,007],cpu1"`` -> ``"gpu003"``."""
    nodelist = nodelist.strip()
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]  # keeps zero padding: "003"
    return prefix + first


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def distributed_env_updates(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to add to ``environ`` (never ones it already has) so every rank sees the standard names."""
    env = environ
    found: dict[str, int | str] = {}
    launcher = _launcher(env)

    if launcher == "deepspeed":
        found.update(LOCAL_WORLD_SIZE=_int(env, "LOCAL_SIZE"), NODE_RANK=_int(env, "CROSS_RANK"))
    elif launcher == "mpi":
        found.update(
            RANK=_int(env, "OMPI_COMM_WORLD_RANK"),
            LOCAL_RANK=_int(env, "OMPI_COMM_WORLD_LOCAL_RANK"),
            WORLD_SIZE=_int(env, "OMPI_COMM_WORLD_SIZE"),
            LOCAL_WORLD_SIZE=_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE"),
            NODE_RANK=_int(env, "OMPI_COMM_WORLD_NODE_RANK"),
        )
    elif launcher == "slurm":
        node_id = _int(env, "SLURM_NODEID") or 0
        per_node = (
            env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
        )
        if per_node and len({slurm_tasks_on_node(per_node, n) for n in range(_num_listed_nodes(per_node))}) > 1:
            raise ValueError(
                f"SLURM tasks per node {per_node!r} differ between nodes; mosaicml-streaming needs the same number "
                "of ranks on every node (use --ntasks-per-node)"
            )
        found.update(
            RANK=_int(env, "SLURM_PROCID"),
            LOCAL_RANK=_int(env, "SLURM_LOCALID"),
            WORLD_SIZE=_int(env, "SLURM_NTASKS") or _int(env, "SLURM_NPROCS"),
            LOCAL_WORLD_SIZE=slurm_tasks_on_node(per_node, node_id) if per_node else None,
            NODE_RANK=node_id,
        )
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if nodelist:
            found["MASTER_ADDR"] = first_slurm_host(nodelist)
        job_id = _int(env, "SLURM_JOB_ID")
        if job_id is not None:
            # Same port on every rank of the job without communication; varies between jobs sharing a node.
            found["MASTER_PORT"] = 15000 + job_id % 20000

    # torchrun sets GROUP_RANK (node index); a single-node run has node 0.
    if "NODE_RANK" not in env and found.get("NODE_RANK") is None and _int(env, "GROUP_RANK") is not None:
        found["NODE_RANK"] = _int(env, "GROUP_RANK")
    return {k: str(v) for k, v in found.items() if v is not None and k not in env}


def _launcher(env: Mapping[str, str]) -> str:
    if "RANK" in env and "WORLD_SIZE" in env:
        # torchrun or a deepspeed-launched rank (the latter lacks LOCAL_WORLD_SIZE but has LOCAL_SIZE).
        return "deepspeed" if "LOCAL_SIZE" in env else "env"
    if "OMPI_COMM_WORLD_RANK" in env:
        return "mpi"
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
    if "SLURM_PROCID" in env and ("SLURM_NTASKS" in env or "SLURM_NPROCS" in env) and step not in _NOT_SRUN_STEPS:
        # Only `srun` steps are the job's ranks; a batch script run with --ntasks=8 is one process, not rank 0 of 8.
        return "slurm"
    return "none"


def detect_distributed_env(environ: Mapping[str, str] | None = None) -> DistributedEnv:
    """Resolve the topology from ``environ`` (default ``os.environ``) without modifying it."""
    env = dict(os.environ if environ is None else environ)
    return _detect(env, _launcher(env))


def _detect(env: dict[str, str], launcher: str) -> DistributedEnv:
    env.update(distributed_env_updates(env))
    world_size = _int(env, "WORLD_SIZE") or 1
    rank = _int(env, "RANK") or 0
    local_rank = _int(env, "LOCAL_RANK")
    local_world_size = _int(env, "LOCAL_WORLD_SIZE")
    if local_world_size is None:
        if world_size > 1:
            warnings.warn(
                f"WORLD_SIZE={world_size} but no launcher variable gives the ranks per node; assuming one rank per "
                "node (set LOCAL_WORLD_SIZE if several ranks share a node)",
                stacklevel=3,
            )
        local_world_size = 1
    if local_rank is None:
        local_rank = rank % local_world_size
    node_rank = _int(env, "NODE_RANK")
    if node_rank is None:
        node_rank = rank // local_world_size
    result = DistributedEnv(rank, local_rank, world_size, local_world_size, node_rank, launcher)
    _check(result)
    return result


def _check(d: DistributedEnv) -> None:
    if not 0 <= d.rank < d.world_size:
        raise ValueError(f"RANK={d.rank} is outside [0, WORLD_SIZE={d.world_size})")
    if not 0 <= d.local_rank < d.local_world_size:
        raise ValueError(f"LOCAL_RANK={d.local_rank} is outside [0, LOCAL_WORLD_SIZE={d.local_world_size})")
    if d.world_size % d.local_world_size:
        # streaming assumes the same number of ranks on every node (num_nodes = WORLD_SIZE // LOCAL_WORLD_SIZE).
        raise ValueError(
            f"WORLD_SIZE={d.world_size} is not a multiple of LOCAL_WORLD_SIZE={d.local_world_size}: "
            "mosaicml-streaming needs the same number of ranks on every node"
        )


def apply_distributed_env(environ: MutableMapping[str, str] | None = None) -> DistributedEnv:
    """Add the standard variables to ``environ`` (default ``os.environ``) and return the resolved topology.

    Nothing already set is overwritten. Call it in every rank before building a ``StreamingDataset``.
    """
    env = os.environ if environ is None else environ
    launcher = _launcher(env)  # before the update, which makes every launcher look like torchrun
    for key, value in distributed_env_updates(env).items():
        env[key] = value
    return _detect(dict(env), launcher)
