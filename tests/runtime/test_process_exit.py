"""A training rank leaves with ``exit_without_teardown``: what Python's shutdown would finish must still finish."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROGRAM = """
import atexit, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from biomedgpt.runtime.process_exit import exit_without_teardown

out = Path(sys.argv[1])
atexit.register(lambda: (out / "atexit").write_text("ran"))

def late_writer():
    time.sleep(0.5)
    (out / "thread").write_text("joined")

threading.Thread(target=late_writer).start()  # not a daemon: the exit waits for it
pool = ThreadPoolExecutor(max_workers=1)  # an idle worker is woken by threading's shutdown hooks, not joined forever
pool.submit(lambda: None).result()
sys.stdout.write("buffered, no newline")
exit_without_teardown(3)
"""


def test_exit_joins_threads_runs_atexit_flushes_and_keeps_the_code(tmp_path: Path) -> None:
    # Block-buffered stdout, as a rank's is under a launcher, so that only the explicit flush can bring it out.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    proc = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(tmp_path)], capture_output=True, text=True, timeout=60, env=env
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "buffered, no newline"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "joined"
