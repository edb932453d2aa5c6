"""DeepSpeed's op builds use the Python environment's ninja wherever a job starts from."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from biomedgpt.runtime.build_tools import prefer_environment_ninja

BIN = Path(sys.executable).parent


@pytest.mark.skipif(not os.access(BIN / "ninja", os.X_OK), reason="this environment has no ninja of its own")
def test_the_environment_ninja_goes_first_once(tmp_path: Path) -> None:
    other = tmp_path / "system_bin"
    other.mkdir()
    (other / "ninja").write_text("#!/bin/sh\n")
    (other / "ninja").chmod(0o755)
    environ = {"PATH": f"{other}{os.pathsep}/usr/bin"}
    assert prefer_environment_ninja(environ)
    assert environ["PATH"] == f"{BIN}{os.pathsep}{other}{os.pathsep}/usr/bin"
    assert not prefer_environment_ninja(environ)  # already first: PATH is left as it is
    assert environ["PATH"] == f"{BIN}{os.pathsep}{other}{os.pathsep}/usr/bin"
    empty: dict[str, str] = {}
    assert prefer_environment_ninja(empty) and empty["PATH"] == str(BIN)
