"""Ending a training rank without Python's interpreter teardown.

Once a rank has returned from training, Python's own shutdown joins the non-daemon threads, runs the ``atexit``
handlers and flushes the standard streams, and then tears down every module and object one by one. With torch,
DeepSpeed, transformers and MLflow loaded that last part takes 2-3 s of CPU per rank (measured with strace: the
process makes no system call between its last ``atexit`` handler and ``exit_group``), and it writes nothing: every
file the run writes is closed by then and every library that buffers (MLflow, logging, mosaicml-streaming's
shared memory) finishes in an ``atexit`` handler. So a rank does the first three steps itself, in the same order,
and then leaves with ``os._exit``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading


def exit_without_teardown(code: int) -> None:
    """Join the non-daemon threads, run the ``atexit`` handlers, flush stdout and stderr, then ``os._exit(code)``.
    Called from the main thread."""
    # The interpreter's own two first steps, by the functions it calls itself: threading's shutdown also runs the
    # hooks that wake idle thread-pool workers (mosaicml-streaming's) before joining them; no public API does either.
    threading._shutdown()  # noqa: SLF001
    atexit._run_exitfuncs()  # noqa: SLF001
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe: nothing more can reach it
            stream.flush()
    os._exit(code)
