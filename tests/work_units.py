"""How ``make test`` divides the suite between its pytest-xdist workers (``-n 2 --dist loadfile``).

* One test module is one unit of work, so its module fixtures are built once.
* Modules that share a session fixture too costly to build once per worker form one unit (``SAME_WORKER``). The
  controller that hands out the units sees only node ids, not fixtures, so the pairs are written down here; each
  worker checks at collection that every module using such a fixture is in the unit it names.
* The units with the most slow tests go first, so that no long unit starts last while the other worker has nothing
  left to do.

xdist's own ``--dist loadgroup`` with ``xdist_group`` marks would do the grouping, but with pytest 9.2 it silently
does nothing (pytest-dev/pytest-xdist#1386: it renames node ids, which pytest 9.2 no longer allows), so the unit of
a module is decided here instead, by a scheduler that differs from ``loadfile`` only in that.
"""

from __future__ import annotations

from collections import defaultdict

import pytest

SHARED_SESSION_FIXTURES = ("demo_reference",)
# module -> the module whose unit it joins (node-id paths, relative to the repository)
SAME_WORKER = {"tests/train/test_two_nodes.py": "tests/train/test_training_runs.py"}


def module_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def unit_of(nodeid: str) -> str:
    module = module_of(nodeid)
    return SAME_WORKER.get(module, module)


def check_shared_fixtures_stay_on_one_worker(items: list[pytest.Item]) -> None:
    """A usage error naming the module when a costly session fixture would be built on more than one worker."""
    for name in SHARED_SESSION_FIXTURES:
        units = defaultdict(list)
        for item in items:
            if name in getattr(item, "fixturenames", ()):
                units[unit_of(item.nodeid)].append(module_of(item.nodeid))
        if len(units) > 1:
            modules = sorted({module for unit_modules in units.values() for module in unit_modules})
            raise pytest.UsageError(
                f"the session fixture {name!r} is used by {', '.join(modules)}, which tests/work_units.py puts in "
                f"different work units ({', '.join(sorted(units))}): each parallel worker would build it again. "
                "Add the modules to SAME_WORKER there, all joining one of them."
            )


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    check_shared_fixtures_stay_on_one_worker(items)
    slow_tests: dict[str, int] = defaultdict(int)
    for item in items:
        slow_tests[unit_of(item.nodeid)] += item.get_closest_marker("slow") is not None
    # Stable: within a unit, and among units with as many slow tests, the collection order stays.
    items.sort(key=lambda item: -slow_tests[unit_of(item.nodeid)])


class XdistWorkUnits:
    """Registered only where pytest-xdist is installed: its hook is unknown to pytest without it."""

    @staticmethod
    def pytest_xdist_make_scheduler(config: pytest.Config, log):  # xdist's Producer and Scheduling types
        if config.getvalue("dist") != "loadfile":
            return None  # another --dist: xdist's own scheduler
        from xdist.scheduler import LoadFileScheduling

        # Hand out the units in the order pytest_collection_modifyitems left them, not xdist's (most tests first).
        config.option.loadscopereorder = False

        class LoadUnitScheduling(LoadFileScheduling):
            def _split_scope(self, nodeid: str) -> str:
                return unit_of(nodeid)

        return LoadUnitScheduling(config, log)


def register_scheduler(config: pytest.Config) -> None:
    """Call from ``pytest_configure``."""
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(XdistWorkUnits(), "biomedgpt-work-units")
