"""Output directories a tool owns: the one rule every command that takes ``--overwrite`` follows.

A tool writes its output directory whole (under a temporary sibling name, then renamed into place) together with a
manifest, ``.biomedgpt-output.json``, naming the tool and every file it wrote. Before writing it checks the
directory it was given:

* an output that is the input, or contains it, is refused (replacing it would delete the input);
* an output holding anything that the manifest does not list (files the tool did not write, another tool's output,
  or a directory older than manifests) is refused, with or without ``--overwrite``: a tool never deletes what it
  did not write;
* a previous output of the same tool is replaced only with ``overwrite``, and then only the entries its manifest
  lists are removed.

Tools that fill their directory in place over several runs (the converter, which resumes shard by shard) pass
their own ``owned`` rule instead of a manifest: a predicate on the entry names they write.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = [
    "MANIFEST_NAME",
    "OutputDirError",
    "check_output_dir",
    "claim_output_dir",
    "foreign_entries",
    "read_manifest",
    "replace_output_dir",
    "staging_dir",
]

MANIFEST_NAME = ".biomedgpt-output.json"
_SHOWN = 5  # entries named in a message


class OutputDirError(ValueError):
    """The output directory cannot be written without harm; the message says why and what to do."""


def read_manifest(directory: Path) -> dict[str, object] | None:
    """The manifest of ``directory``, or None when there is none (or it is not one of ours)."""
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("entries"), list):
        return None
    return manifest


def _entries(directory: Path) -> list[str]:
    return sorted(entry.name for entry in directory.iterdir())


def _files(directory: Path) -> list[str]:
    """Every file (or link) below ``directory``, as relative POSIX paths."""
    found = []
    for root, dirs, files in os.walk(directory):
        base = Path(root).relative_to(directory)
        found += [(base / name).as_posix() for name in files]
        found += [(base / name).as_posix() for name in dirs if (Path(root) / name).is_symlink()]
    return sorted(found)


def foreign_entries(directory: Path, owned: Callable[[str], bool]) -> list[str]:
    """Top-level entries of ``directory`` that ``owned`` does not claim (the manifest itself is always owned)."""
    return [name for name in _entries(directory) if name != MANIFEST_NAME and not owned(name)]


def _named(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _is_within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def check_output_dir(
    output: str | os.PathLike[str],
    *,
    tool: str,
    inputs: Iterable[str | os.PathLike[str]] = (),
    overwrite: bool = False,
    owned: Callable[[str], bool] | None = None,
) -> None:
    """Raise :class:`OutputDirError` unless ``tool`` may write ``output`` (see the module docstring).

    ``owned`` claims entry names for tools without a manifest; by default the manifest of ``tool`` decides.
    """
    out = Path(output)
    resolved = out.resolve()
    for source in inputs:
        source_path = Path(source).resolve()
        if _is_within(source_path, resolved):
            what = "is" if source_path == resolved else "contains"
            raise OutputDirError(
                f"output directory {out} {what} the input {source}; writing there would replace the input. "
                "Choose an output directory outside the input."
            )
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output {out} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if owned is None:
        manifest = read_manifest(out)
        if manifest is None:
            raise OutputDirError(
                f"output directory {out} holds files that {tool} did not write ({_named(_entries(out))}); "
                "it leaves them alone even with --overwrite. Choose a new or empty directory, or remove them yourself."
            )
        if manifest.get("tool") != tool:
            raise OutputDirError(
                f"output directory {out} holds the output of {manifest.get('tool')}, not of {tool}; "
                f"{tool} leaves it alone even with --overwrite. Choose another directory."
            )
        listed = {str(name) for name in manifest["entries"]}  # type: ignore[union-attr]
        foreign = [name for name in _files(out) if name != MANIFEST_NAME and name not in listed]
    else:
        foreign = foreign_entries(out, owned)
    if foreign:
        raise OutputDirError(
            f"output directory {out} holds files that {tool} did not write ({_named(foreign)}); it leaves them "
            "alone even with --overwrite. Choose a new or empty directory, or move them away."
        )
    if not overwrite:
        raise OutputDirError(
            f"output directory {out} holds an earlier output of {tool}; pass --overwrite to replace it"
        )


def staging_dir(output: str | os.PathLike[str]) -> Path:
    """An empty sibling of ``output`` (same file system, so the final rename is atomic), owned by this process."""
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    if staging.exists():  # our own leftover: the name carries this process's id and the dot-prefix of ours
        shutil.rmtree(staging)
    staging.mkdir()
    return staging


def _remove_files(directory: Path, names: Iterable[str]) -> None:
    """Remove the listed files, then the folders they leave empty (never a folder that still holds anything)."""
    folders = set()
    for name in names:
        path = directory / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        folders.update(parent for parent in path.parents if _is_within(parent, directory) and parent != directory)
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def replace_output_dir(staging: Path, output: str | os.PathLike[str], *, tool: str, overwrite: bool = False) -> None:
    """Write the manifest of ``staging`` and move it to ``output``.

    An earlier output of ``tool`` there is removed first, entry by entry as its manifest lists them, after the
    checks of :func:`check_output_dir` are made again (the directory may have changed while the tool worked).
    """
    out = Path(output)
    manifest = {"tool": tool, "entries": [name for name in _files(staging) if name != MANIFEST_NAME]}
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    if out.is_dir():
        check_output_dir(out, tool=tool, overwrite=overwrite)
        previous = read_manifest(out)
        _remove_files(out, [str(name) for name in previous["entries"]] if previous else [])  # type: ignore[index]
        if (out / MANIFEST_NAME).exists():
            (out / MANIFEST_NAME).unlink()
        out.rmdir()  # fails, and keeps everything, if anything unlisted appeared meanwhile
    staging.rename(out)


def claim_output_dir(output: str | os.PathLike[str], *, tool: str, owned: Iterable[str]) -> Path:
    """For a tool that fills ``output`` in place over several steps (the demo): refuse a non-empty directory that
    ``tool`` did not mark as its own, or that holds entries other than ``owned``; then mark it."""
    out = Path(output)
    names = sorted(owned)
    if out.is_dir() and any(out.iterdir()):
        manifest = read_manifest(out)
        if manifest is None or manifest.get("tool") != tool:
            raise OutputDirError(
                f"{out} is not empty and was not written by {tool} ({_named(_entries(out))}); {tool} would replace "
                "parts of it. Choose a new or empty directory."
            )
        foreign = foreign_entries(out, set(names).__contains__)
        if foreign:
            raise OutputDirError(f"{out} holds files that {tool} did not write ({_named(foreign)}); move them away")
    elif out.exists() and not out.is_dir():
        raise OutputDirError(f"output {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).write_text(json.dumps({"tool": tool, "entries": names}, indent=1) + "\n", encoding="utf-8")
    return out
