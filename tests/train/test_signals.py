import os
import signal
import time

from biomedgpt.train.signals import StopController


def test_wall_clock_budget_requests_a_stop():
    controller = StopController(wall_clock_minutes=0.5 / 60)  # half a second
    assert not controller.should_stop()
    time.sleep(0.6)
    assert controller.should_stop()
    assert "wall-clock budget" in controller.reason


def test_sigusr1_and_sigterm_request_a_stop_and_handlers_are_restored():
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        previous = signal.getsignal(sig)
        controller = StopController().install()
        try:
            assert not controller.should_stop()
            os.kill(os.getpid(), sig)
            assert controller.should_stop()
            assert signal.Signals(sig).name in controller.reason
        finally:
            controller.uninstall()
        assert signal.getsignal(sig) == previous
