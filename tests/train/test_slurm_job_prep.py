"""slurm/job_prep.py's warning about an SQLite MLflow store on a network filesystem, read from mount tables in the
format of /proc/mounts (the one this machine has, and written ones for NFS/Lustre layouts it does not have)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def job_prep():
    spec = importlib.util.spec_from_file_location("job_prep", REPO / "slurm" / "job_prep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mounts_file(tmp_path: Path, *entries: tuple[str, str]) -> Path:
    lines = ["/dev/root / ext4 rw,relatime 0 0", "tmpfs /tmp tmpfs rw 0 0"]
    lines += [f"server:/export {point} {kind} rw,relatime 0 0" for point, kind in entries]
    path = tmp_path / "mounts"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_filesystem_is_that_of_the_deepest_mount_above_the_path(job_prep, tmp_path):
    mounts = mounts_file(tmp_path, ("/shared", "nfs4"), ("/shared/scratch", "lustre"), ("/my\\040projects", "gpfs"))
    assert job_prep.filesystem_type(Path("/shared/runs/mlruns.db"), mounts) == "nfs4"
    assert job_prep.filesystem_type(Path("/shared/scratch/a/b"), mounts) == "lustre"
    assert job_prep.filesystem_type(Path("/shared-not/x"), mounts) == "ext4"  # a prefix of the name is no parent
    assert job_prep.filesystem_type(Path("/my projects/run"), mounts) == "gpfs"  # /proc/mounts escapes the space
    assert job_prep.filesystem_type(Path("/shared"), mounts) == "nfs4"


def test_an_sqlite_store_on_a_network_filesystem_is_warned_about(job_prep, tmp_path):
    mounts = mounts_file(tmp_path, ("/shared", "nfs4"), ("/scratch", "beegfs"))
    warning = job_prep.sqlite_store_warning("sqlite:////shared/project/mlruns.db", mounts)
    assert warning is not None and "nfs4 (network) filesystem" in warning and "MLFLOW_TRACKING_URI=http" in warning
    assert "beegfs" in job_prep.sqlite_store_warning("sqlite:////scratch/mlruns.db?timeout=30", mounts)
    assert job_prep.sqlite_store_warning("sqlite:////local/mlruns.db", mounts) is None
    assert job_prep.sqlite_store_warning("http://mlflow:5000", mounts) is None  # a server is the advice, not a risk
    assert job_prep.sqlite_store_warning("sqlite:///:memory:", mounts) is None


def test_this_machines_mount_table_is_read(job_prep, tmp_path):
    proc_mounts = Path("/proc/mounts")
    if not proc_mounts.is_file():
        pytest.skip("no /proc/mounts here")
    points = {Path(line.split()[1]): line.split()[2] for line in proc_mounts.read_text().splitlines()}
    assert job_prep.filesystem_type(Path("/")) == points[Path("/")]
    deepest = max(
        (point for point in points if point == tmp_path or point in tmp_path.parents), key=lambda p: len(p.parts)
    )
    assert job_prep.filesystem_type(tmp_path / "not-yet" / "mlruns.db") == points[deepest]
