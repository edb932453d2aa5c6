import pytest
from work_units import pytest_collection_modifyitems, register_scheduler

from biomedgpt.runtime.build_tools import prefer_environment_ninja

__all__ = ["pytest_collection_modifyitems"]  # make test's parallel workers: see tests/work_units.py


def pytest_configure(config: pytest.Config) -> None:
    # Every DeepSpeed op build of the suite (in process, under torchrun, under SLURM, whose templates put the
    # environment's bin first) uses the same ninja, so none rebuilds what another built: see runtime.build_tools.
    prefer_environment_ninja()
    register_scheduler(config)


@pytest.fixture
def free_port() -> int:
    """A TCP port on localhost that nothing listens on (for process-group rendezvous)."""
    from biomedgpt.train.cli import free_local_port

    return free_local_port()
