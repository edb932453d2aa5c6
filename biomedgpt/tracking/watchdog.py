"""Terminal status for MLflow runs whose trainer dies without saying so (SIGKILL, OOM killer, SLURM kill).

``MLflowTracker.start()`` spawns ``python -m biomedgpt.tracking.watchdog`` as a child in its own session, with a
pipe on its stdin. The trainer writes ``final <STATUS>`` when it starts finishing and ``done`` once MLflow has the
terminal status. The watchdog notices the trainer's death by end-of-file on the pipe or by being re-parented
(``os.getppid()`` changes: immune to pid reuse, and it still works when a forked DataLoader worker keeps the pipe
open). Then, if the run is still RUNNING and still owned by this session (a requeued job may have reopened it),
it sets the status announced by ``final`` or else KILLED.

It ignores SIGTERM/SIGINT/SIGHUP (from before Python starts: the tracker launches it through ``sh -c "trap '' ...;
exec ..."``): under ``scancel`` SLURM signals every process of the step, and the watchdog must outlive the trainer's
own graceful shutdown. Only when both are SIGKILLed at once (the end of SLURM's KillWait) is
the run left RUNNING; nothing in the job can prevent that.

MLflow is imported only when needed, so an idle watchdog costs a few MB.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import signal
import sys
import time

# Not imported by the package itself (runpy would warn when run with -m); the tracker module imports only stdlib.
from biomedgpt.tracking.mlflow_tracker import SESSION_TAG, TERMINATED_BY_TAG

__all__ = ["main", "mark_run_terminated", "watch"]

_TERMINAL = ("FINISHED", "FAILED", "KILLED")


def _say(msg: str) -> None:
    with contextlib.suppress(OSError, ValueError):  # the job's log may already be gone
        print(f"[biomedgpt.tracking.watchdog] {msg}", file=sys.stderr, flush=True)


def mark_run_terminated(tracking_uri: str, run_id: str, session: str | None, status: str) -> bool:
    """Set ``status`` on ``run_id`` if it is RUNNING and (when ``session`` is given) owned by ``session``.

    Returns whether the status was changed.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    if run.info.status != "RUNNING":
        return False
    if session is not None and run.data.tags.get(SESSION_TAG) != session:
        return False  # another job reopened the run since; it is that job's to finish
    client.set_tag(run_id, TERMINATED_BY_TAG, "watchdog")
    client.set_terminated(run_id, status=status)
    return True


def _parent_alive(parent_pid: int) -> bool:
    # Re-parenting is the reliable signal; os.kill(pid, 0) alone could be fooled by pid reuse.
    return os.getppid() == parent_pid


def watch(parent_pid: int, poll_s: float) -> str | None:
    """Block until the parent dies (returns the announced final status, or None) or says ``done`` (returns "")."""
    final: str | None = None
    buf = b""
    fd = sys.stdin.fileno()
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    eof_at: float | None = None
    while True:
        if eof_at is None:
            if sel.select(timeout=poll_s):
                chunk = os.read(fd, 4096)
                if not chunk:
                    eof_at = time.monotonic()  # write end closed: the parent is exiting (or has exited)
                    sel.unregister(fd)
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    words = line.decode(errors="replace").split()
                    if words[:1] == ["done"]:
                        return ""
                    if words[:1] == ["final"] and len(words) > 1 and words[1] in _TERMINAL:
                        final = words[1]
        else:
            # The kernel closes the pipe a moment before it re-parents us: poll fast for a while after EOF.
            time.sleep(0.05 if time.monotonic() - eof_at < 10.0 else poll_s)
        if not _parent_alive(parent_pid):
            return final


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tracking-uri", required=True)
    ap.add_argument("--run-id", required=True)
    ap.add_argument("--parent-pid", type=int, required=True)
    ap.add_argument("--session", default=None)
    ap.add_argument("--poll", type=float, default=2.0, help="seconds between checks of the parent pid")
    args = ap.parse_args(argv)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # normally already ignored by the launching shell (see the tracker)
    if not _parent_alive(args.parent_pid):
        final: str | None = None  # the parent died before we even started
    else:
        final = watch(args.parent_pid, args.poll)
        if final == "":
            return 0
    status = final or "KILLED"
    try:
        if mark_run_terminated(args.tracking_uri, args.run_id, args.session, status):
            _say(f"trainer (pid {args.parent_pid}) exited without finishing MLflow run {args.run_id}; marked {status}")
    except Exception as exc:  # report and exit, there is nobody to raise to
        _say(f"could not mark MLflow run {args.run_id} {status}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
