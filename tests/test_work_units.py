"""tests/work_units.py with pytest-xdist, on a made-up suite laid out like this one: ``make test``'s two workers
keep each module on one worker, the modules sharing the costly session fixture on the same one, and start with the
units that have slow tests; a module using that fixture outside its unit stops the run with an error naming it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parent

CONFTEST = f"""
import os, sys
sys.path.insert(0, {str(TESTS)!r})
import pytest
from work_units import pytest_collection_modifyitems, register_scheduler

def pytest_configure(config):
    register_scheduler(config)

@pytest.fixture(scope="session")
def demo_reference():
    return 0

@pytest.fixture(autouse=True)
def record_worker(request):
    with open(os.environ["WORKERS_RECORD"], "a") as record:
        record.write(f"{{os.environ.get('PYTEST_XDIST_WORKER', '-')}} {{request.node.nodeid}}\\n")
"""

# (module header, test function, how many tests); the slow module has the fewest, which xdist would hand out last.
SHARING = ("import time\n", "def test_{i}(demo_reference):\n    time.sleep(0.3)\n", 3)
PLAIN = ("", "def test_{i}():\n    pass\n", 3)
SLOW = ("import pytest\n\npytestmark = pytest.mark.slow\n", "def test_{i}():\n    pass\n", 1)
SUITE = {
    "tests/other/test_a.py": PLAIN,
    "tests/other/test_b.py": PLAIN,
    "tests/other/test_c.py": PLAIN,
    "tests/other/test_slow.py": SLOW,
    "tests/train/test_training_runs.py": SHARING,
    "tests/train/test_two_nodes.py": SHARING,
}


def make_suite(root: Path, modules: dict[str, tuple[str, str, int]]) -> None:
    (root / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: slow\n")
    (root / "conftest.py").write_text(CONFTEST)
    for module, (header, test, count) in modules.items():
        path = root / module
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n\n".join([header, *(test.format(i=i) for i in range(count))]))


def run_pytest(root: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict[str, set[str]], list[str]]:
    """pytest in ``root``; the workers each module's tests ran on, and the modules of the tests in starting order."""
    record = root / "workers.txt"
    record.unlink(missing_ok=True)
    env = {**os.environ, "WORKERS_RECORD": str(record)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    workers: dict[str, set[str]] = defaultdict(set)
    started = []
    for line in record.read_text().splitlines() if record.is_file() else []:
        worker, nodeid = line.split(" ", 1)
        workers[nodeid.split("::")[0]].add(worker)
        started.append(nodeid.split("::")[0])
    return proc, workers, started


def test_modules_stay_whole_and_the_sharing_ones_together_slow_units_first(tmp_path):
    make_suite(tmp_path, SUITE)
    proc, workers, started = run_pytest(tmp_path, "-n", "2", "--dist", "loadfile")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert set(workers) == set(SUITE)
    assert all(len(ran_on) == 1 for ran_on in workers.values()), dict(workers)
    assert workers["tests/train/test_training_runs.py"] == workers["tests/train/test_two_nodes.py"]
    assert set().union(*workers.values()) == {"gw0", "gw1"}
    # The slow unit is one of the two the workers start with (its test among the first of the run).
    assert "tests/other/test_slow.py" in started[:4], started

    proc, _, _ = run_pytest(tmp_path, "--collect-only")
    order = [line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line]
    assert order[0] == "tests/other/test_slow.py", order


def test_a_module_sharing_the_fixture_outside_its_unit_is_named(tmp_path):
    make_suite(tmp_path, {**SUITE, "tests/other/test_also_sharing.py": SHARING})
    proc, workers, _ = run_pytest(tmp_path)
    assert proc.returncode != 0 and not workers
    assert "tests/other/test_also_sharing.py" in proc.stderr and "SAME_WORKER" in proc.stderr, proc.stderr
