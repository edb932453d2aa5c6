"""Run parameters for experiment tracking: flattening, MLflow-safe keys and values, and provenance.

Nothing here imports MLflow, so ranks other than 0 (and tools that only want the flattened config) stay light.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.metadata
import json
import os
import platform
import posixpath
import re
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_KEY_LENGTH",
    "MAX_PARAM_VALUE_LENGTH",
    "MAX_TAG_VALUE_LENGTH",
    "TRACKED_PACKAGES",
    "collect_run_params",
    "flatten_params",
    "git_info",
    "package_versions",
    "sanitize_key",
    "stringify_value",
]

# MLflow 3.x limits (mlflow/utils/validation.py). Hard-coded so this module does not import MLflow; the server
# rejects a whole log_batch when one entry breaks them, so we truncate client-side instead.
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000

# Distributions whose versions decide whether two runs are comparable.
TRACKED_PACKAGES = ("torch", "deepspeed", "transformers", "mosaicml-streaming", "mlflow", "biomedgpt-train")

_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")  # MLflow allows alphanumerics, _ - . / space and colon in names


def sanitize_key(key: str) -> str:
    """Make ``key`` a valid MLflow metric/param/tag name (bad characters become ``_``; no ``..``, no leading ``/``)."""
    key = _BAD_KEY_CHARS.sub("_", str(key))[:MAX_KEY_LENGTH]
    # MLflow refuses names that normalise to a different path ("a//b", "./a", "a/", "/a", "../a").
    norm = posixpath.normpath(key).lstrip("/") if key else ""
    key = "/".join("_" if part in ("", ".", "..") else part for part in norm.split("/"))
    return key or "_"


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _plain(value: Any) -> Any:
    """Dataclasses and enums to plain data, so configs given as objects flatten like dicts."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, enum.Enum):
        return value.value
    return value


def stringify_value(value: Any, limit: int = MAX_PARAM_VALUE_LENGTH) -> str:
    """A param/tag value as MLflow stores it: scalars via ``str``, containers as compact JSON; truncated."""
    value = _plain(value)
    if isinstance(value, (Mapping, list, tuple)):
        text = json.dumps(value, default=str, separators=(",", ":"), sort_keys=isinstance(value, Mapping))
    elif isinstance(value, os.PathLike):
        text = os.fspath(value)
    else:
        text = str(value)
    return _truncate(text, limit)


def flatten_params(params: Mapping[str, Any] | Any, prefix: str = "", sep: str = ".") -> dict[str, str]:
    """Flatten nested mappings (and dataclasses) to ``{"a.b.c": "value"}`` with MLflow-valid keys and values.

    Lists of scalars stay one JSON value (``"[1,2]"``); lists that contain mappings are flattened by index
    (``tasks.0.name``), because a task mixture written as one JSON string is unreadable in the MLflow UI.
    """
    out: dict[str, str] = {}

    def visit(node: Any, key: str) -> None:
        node = _plain(node)
        if isinstance(node, Mapping):
            if not node and key:
                out[sanitize_key(key)] = "{}"
            for k, v in node.items():
                visit(v, f"{key}{sep}{k}" if key else str(k))
        elif isinstance(node, (list, tuple)) and any(isinstance(_plain(v), Mapping) for v in node):
            for i, v in enumerate(node):
                visit(v, f"{key}{sep}{i}" if key else str(i))
        elif key:
            out[sanitize_key(key)] = stringify_value(node)

    visit(params, prefix)
    return out


def git_info(path: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """``{"commit": sha or "unknown", "dirty": "True"/"False"/"unknown"}`` for the checkout holding ``path``.

    Defaults to this package's source tree: the code that runs matters, not the directory the job started in.
    """
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    info = {"commit": "unknown", "dirty": "unknown"}
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
        if res.returncode != 0:
            return info
        info["commit"] = res.stdout.strip()
        res = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if res.returncode == 0:
            info["dirty"] = str(bool(res.stdout.strip()))
    except (OSError, subprocess.SubprocessError):
        pass  # no git binary, or a hung filesystem: provenance is best effort
    return info


def package_versions(packages: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str]:
    """Installed versions of ``packages`` (``"not installed"`` when absent) plus the Python version."""
    versions: dict[str, str] = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["python"] = platform.python_version()
    return versions


def collect_run_params(
    config: Mapping[str, Any] | Any,
    ds_config: Mapping[str, Any] | None = None,
    world_size: int | None = None,
    *,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Everything a run should record as MLflow params, flattened.

    Keys: ``config.*`` (the resolved run config), ``deepspeed.*`` (the DeepSpeed config as passed to the
    engine), ``world_size``, ``git.commit``, ``git.dirty``, ``versions.<package>``, ``versions.python``,
    ``hostname``, and ``extra`` flattened as given.
    """
    params: dict[str, str] = {}
    params.update(flatten_params(config, prefix="config"))
    if ds_config is not None:
        params.update(flatten_params(ds_config, prefix="deepspeed"))
    if world_size is not None:
        params["world_size"] = str(int(world_size))
    params.update(flatten_params(git_info(), prefix="git"))
    params.update(flatten_params(package_versions(), prefix="versions"))
    params["hostname"] = socket.gethostname()
    if extra:
        params.update(flatten_params(extra))
    return params
