"""Stop requests (SIGTERM, SIGUSR1 = SLURM's warning signal, a wall-clock budget, the launcher's death) agreed on by
all ranks.

A signal may reach only some ranks (SLURM signals the batch shell or each task); the flag is all-reduced once per
step so every rank stops at the same step, saves, and exits 0.

torchrun starts each rank in a session of its own, so ``kill -9`` of torchrun (or of its process group) leaves the
ranks running as orphans that go on training and writing checkpoints beside whatever is started next. A rank whose
launcher has gone therefore stops like one that received SIGTERM.
"""

from __future__ import annotations

import os
import signal
import time
from types import FrameType

from biomedgpt.runtime.collectives import any_rank

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def launcher_pid() -> int | None:
    """The parent process when it is a launcher this rank cannot outlive usefully: torchrun's agent or the deepspeed
    launcher. None otherwise: a plain ``python -m biomedgpt.train`` may outlive its shell (nohup), and srun's ranks
    are ended by SLURM itself."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env or ("CROSS_RANK" in env and "LOCAL_SIZE" in env):
        return os.getppid()
    return None


class StopController:
    def __init__(self, wall_clock_minutes: float | None = None, launcher: int | None = None) -> None:
        self.started = time.monotonic()
        self.budget_seconds = None if wall_clock_minutes is None else wall_clock_minutes * 60.0
        self.launcher = launcher  # pid of the parent launcher to watch (see launcher_pid)
        self.received: int | None = None
        self.reason: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopController:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def local_request(self) -> str | None:
        if self.received is not None:
            return f"received {signal.Signals(self.received).name}"
        if self.budget_seconds is not None and time.monotonic() - self.started >= self.budget_seconds:
            return f"wall-clock budget of {self.budget_seconds / 60:.1f} min reached"
        if self.launcher is not None and os.getppid() != self.launcher:  # re-parented: the launcher has exited
            return f"the launcher (pid {self.launcher}) has exited"
        return None

    def should_stop(self) -> bool:
        """Collective: True on every rank when any rank was asked to stop."""
        local = self.local_request()
        if any_rank(local is not None):
            self.reason = local or "another rank was asked to stop"
            return True
        return False
