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
import warnings
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
    """Every file (or link) below ``directory``, and every folder holding none, as relative POSIX paths."""
    found = []
    for root, dirs, files in os.walk(directory):
        base = Path(root).relative_to(directory)
        found += [(base / name).as_posix() for name in files]
        found += [(base / name).as_posix() for name in dirs if (Path(root) / name).is_symlink()]
        if not dirs and not files and base != Path("."):
            found.append(base.as_posix() + "/")  # an empty folder is somebody's too
    return sorted(found)


def foreign_entries(directory: Path, owned: Callable[[str], bool]) -> list[str]:
    """Top-level entries of ``directory`` that ``owned`` does not claim (the manifest itself is always owned)."""
    return [name for name in _entries(directory) if name != MANIFEST_NAME and not owned(name)]


def _named(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _is_within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def _no_manifest(out: Path, tool: str) -> OutputDirError:
    return OutputDirError(
        f"output directory {out} is not empty ({_named(_entries(out))}) and has no {MANIFEST_NAME}, the list of "
        f"files {tool} writes with every output: it was made by hand, by another program or by a version of "
        f"{tool} older than that list. {tool} deletes nothing there, even with --overwrite: choose a new or empty "
        "directory, or remove that one yourself."
    )


def _refuse_working_directory(output: str | os.PathLike[str]) -> None:
    if _is_within(Path.cwd().resolve(), Path(output).resolve()):
        raise OutputDirError(f"output directory {output} is the working directory or holds it; name one below it")


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
    _refuse_working_directory(out)
    if resolved.exists() and not resolved.is_dir():
        raise OutputDirError(f"output {out} exists and is not a directory")
    if not resolved.is_dir() or not any(resolved.iterdir()):
        return
    if owned is None:
        manifest = read_manifest(resolved)
        if manifest is None:
            raise _no_manifest(out, tool)
        if manifest.get("tool") != tool:
            raise OutputDirError(
                f"output directory {out} holds the output of {manifest.get('tool')}, not of {tool}; "
                f"{tool} leaves it alone even with --overwrite. Choose another directory."
            )
        listed = {str(name) for name in manifest["entries"]}  # type: ignore[union-attr]
        foreign = [name for name in _files(resolved) if name != MANIFEST_NAME and name not in listed]
    else:
        foreign = foreign_entries(resolved, owned)
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
    """An empty sibling of ``output`` (same file system, so the final rename is atomic), owned by this process.

    Refuses the working directory (or one above it) as ``output``: a directory is replaced by renaming, and the
    working directory cannot be renamed away under the user.
    """
    out = Path(output).resolve()
    _refuse_working_directory(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    if staging.exists():  # our own leftover: the name carries this process's id and the dot-prefix of ours
        shutil.rmtree(staging)
    staging.mkdir()
    return staging


def _remove_listed(directory: Path, names: Iterable[str]) -> list[str]:
    """Remove the listed files that are really there, inside ``directory``, then the folders they leave empty;
    return what is left. Never a folder that still holds anything, never a path outside ``directory``."""
    present = set(_files(directory))
    folders = set()
    for name in names:
        path = directory / name
        if name not in present or name.endswith("/") or not _is_within(path.parent.resolve(), directory.resolve()):
            continue  # gone, a folder, or outside (a manifest entry such as '../x')
        path.unlink()
        folders.update(parent for parent in path.parents if parent != directory and _is_within(parent, directory))
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return [name for name in _files(directory) if name != MANIFEST_NAME]


def replace_output_dir(staging: Path, output: str | os.PathLike[str], *, tool: str, overwrite: bool = False) -> None:
    """Write the manifest of ``staging`` and move it to ``output``.

    An earlier output of ``tool`` there is checked again (it may have changed while the tool worked), renamed aside,
    replaced by ``staging``, and only then emptied of the files its manifest lists. Anything else found there is
    kept under the aside name, which a warning gives; on a failure before the swap the earlier output stays.
    """
    out = Path(output).resolve()
    manifest = {"tool": tool, "entries": [name for name in _files(staging) if name != MANIFEST_NAME]}
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    if not out.is_dir():
        staging.rename(out)
        return
    check_output_dir(out, tool=tool, overwrite=overwrite)
    previous = read_manifest(out)
    aside = out.parent / f".{out.name}.replaced-{os.getpid()}"
    out.rename(aside)
    try:
        staging.rename(out)
    except BaseException:
        aside.rename(out)  # the earlier output back as it was
        raise
    left = _remove_listed(aside, [str(name) for name in previous["entries"]] if previous else [])  # type: ignore[index]
    if left:
        warnings.warn(f"{aside} keeps files that appeared in {out} while {tool} worked: {_named(left)}", stacklevel=2)
        return
    (aside / MANIFEST_NAME).unlink(missing_ok=True)
    aside.rmdir()


def _tool_leftover(name: str, owned: set[str]) -> bool:
    """A staging or replaced copy of an owned entry (``.<entry>.partial-<pid>``) left by a killed tool."""
    for kind in (".partial-", ".replaced-"):
        stem, sep, pid = name.partition(kind)
        if sep and pid.isdigit() and stem.startswith(".") and stem[1:] in owned:
            return True
    return False


def claim_output_dir(output: str | os.PathLike[str], *, tool: str, owned: Iterable[str]) -> Path:
    """For a tool that fills ``output`` in place over several steps (the demo): refuse a non-empty directory that
    ``tool`` did not mark as its own, or that holds entries other than ``owned``; then mark it.

    Staging copies of owned entries left by a killed run of a tool inside ``output`` are owned too.
    """
    out = Path(output)
    names = sorted(owned)
    if out.is_dir() and any(out.iterdir()):
        manifest = read_manifest(out)
        if manifest is None or manifest.get("tool") != tool:
            raise OutputDirError(
                f"{out} is not empty ({_named(_entries(out))}) and was not made by {tool} (no {MANIFEST_NAME} of "
                f"{tool}: made by hand, by another program or by an older version); {tool} would replace parts of "
                "it. Choose a new or empty directory, or remove that one yourself."
            )
        foreign = foreign_entries(out, lambda name: name in names or _tool_leftover(name, set(names)))
        if foreign:
            raise OutputDirError(f"{out} holds files that {tool} did not write ({_named(foreign)}); move them away")
    elif out.exists() and not out.is_dir():
        raise OutputDirError(f"output {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).write_text(json.dumps({"tool": tool, "entries": names}, indent=1) + "\n", encoding="utf-8")
    return out
