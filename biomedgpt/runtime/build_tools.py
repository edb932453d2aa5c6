"""Which ninja builds DeepSpeed's just-in-time ops.

DeepSpeed builds its ops (on CPU, the shared-memory collectives) with ninja from PATH into one cache folder per
user. The Python environment ships its own ninja (a DeepSpeed dependency); a system ninja of another version hashes
the build commands differently, so a job started with ``.venv/bin/python`` (system ninja) after one started from an
activated environment (the SLURM templates put ``$VENV/bin`` first) rebuilds the op from scratch: about 30 s per
switch on a 2-core machine. Preferring the environment's ninja, as activating it would, makes every start agree.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import MutableMapping
from pathlib import Path


def prefer_environment_ninja(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Put this interpreter's ``bin`` folder first on ``PATH`` when it holds a ninja that ``PATH`` does not find
    first; True when ``PATH`` changed."""
    bin_dir = Path(sys.executable).parent
    own = bin_dir / "ninja"
    if not os.access(own, os.X_OK):
        return False
    path = environ.get("PATH", "")
    found = shutil.which("ninja", path=path)
    if found is not None and Path(found).resolve() == own.resolve():
        return False
    environ["PATH"] = os.pathsep.join([str(bin_dir), path]) if path else str(bin_dir)
    return True
