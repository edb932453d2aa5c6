"""A real (non-editable) install: the wheel carries every preset, DeepSpeed config and asset, and the installed
package plans the demo run from another directory with the checkout nowhere on its path."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DATA = ("biomedgpt/train/presets", "biomedgpt/train/ds_configs", "biomedgpt/assets")


def _source_copy(destination: Path) -> Path:
    """The checkout's files (tracked, and untracked ones git does not ignore) copied to ``destination``: a build in
    the checkout itself would leave build/ there and reuse what an earlier build put in it."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"], capture_output=True, check=True
    )
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def test_wheel_carries_package_data_and_the_installed_package_plans_the_demo_from_elsewhere(tmp_path: Path) -> None:
    source = _source_copy(tmp_path / "source")
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
         str(wheels), str(source)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("biomedgpt*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        path.relative_to(REPO).as_posix()
        for folder in PACKAGE_DATA
        for path in (REPO / folder).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert expected and not expected - names, sorted(expected - names)

    target = tmp_path / "installed"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # -S: no site processing, so the checkout's editable-install hook (a .pth file) is not loaded; the installed
    # package comes first, the environment's dependencies after it.
    code = (
        "import sys\n"
        f"sys.path[:0] = [{str(target)!r}, {sysconfig.get_paths()['purelib']!r}]\n"
        "import biomedgpt\n"
        f"assert biomedgpt.__file__.startswith({str(target)!r}), biomedgpt.__file__\n"
        "from biomedgpt.train.cli import main\n"
        "sys.exit(main(['--config', 'demo', '--dry-run', '--allow-missing-data']))\n"
    )
    plan = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=elsewhere, capture_output=True, text=True, timeout=600
    )
    assert plan.returncode == 0, (plan.stdout[-2000:], plan.stderr[-3000:])
    assert "zero3_cpu.json" in plan.stdout + plan.stderr  # the DeepSpeed config, read from the installed package
