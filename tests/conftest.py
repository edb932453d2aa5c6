import socket

import pytest


@pytest.fixture
def free_port() -> int:
    """A TCP port on localhost that nothing listens on (for process-group rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
