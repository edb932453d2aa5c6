import os
import signal
import subprocess
import sys
import time

import psutil

from biomedgpt.runtime.signals import StopController, launcher_pid


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


def test_launcher_pid_is_the_parent_only_under_torchrun_or_the_deepspeed_launcher(monkeypatch):
    for name in ("TORCHELASTIC_RUN_ID", "CROSS_RANK", "LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert launcher_pid() is None  # a plain process may outlive its shell (nohup)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert launcher_pid() == os.getppid()
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.setenv("CROSS_RANK", "0")
    monkeypatch.setenv("LOCAL_SIZE", "2")
    assert launcher_pid() == os.getppid()


WATCH_THE_LAUNCHER = """
import os, sys, time
from biomedgpt.runtime.signals import StopController
controller = StopController(launcher=os.getppid())
print("ready", flush=True)
deadline = time.monotonic() + 60
while not controller.should_stop() and time.monotonic() < deadline:
    time.sleep(0.05)
print(controller.reason, flush=True)
"""

# A stand-in launcher: starts the watching rank in a session of its own, as torchrun does, reports its pid, and
# waits to be killed.
LAUNCHER = """
import subprocess, sys, time
rank = subprocess.Popen([sys.executable, "-c", sys.argv[1]], start_new_session=True)
print(rank.pid, flush=True)
time.sleep(120)
"""


def test_a_rank_stops_when_its_launcher_dies():
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, WATCH_THE_LAUNCHER], stdout=subprocess.PIPE, text=True)
    assert launcher.stdout is not None
    rank_pid = int(launcher.stdout.readline())
    assert launcher.stdout.readline().strip() == "ready"
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait(timeout=30)
    reason = launcher.stdout.readline().strip()  # the rank inherited the pipe
    assert reason == f"the launcher (pid {launcher.pid}) has exited"
    deadline = time.monotonic() + 30
    while not _ended(rank_pid):
        assert time.monotonic() < deadline, f"rank {rank_pid} still running after its launcher died"
        time.sleep(0.1)


def _ended(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # exited, not yet reaped by its new parent
    except psutil.NoSuchProcess:
        return True
