import pytest


@pytest.fixture
def free_port() -> int:
    """A TCP port on localhost that nothing listens on (for process-group rendezvous)."""
    from biomedgpt.train.cli import free_local_port

    return free_local_port()
