"""Typed, strict configuration loading for nested dataclasses.

The trainer describes its configuration as a tree of ``@dataclass`` es (value-combination checks live in their
``__post_init__``). This module turns plain dicts coming from YAML/JSON files, presets and ``dotted.key=value``
command-line overrides into that tree, and back.

Why strict: a typo in a config key (``optimizer.lr_rate``) that is silently ignored costs a whole SLURM job, so
unknown keys are errors that name the key, where it came from, and the closest valid keys (the same idea as
llm-foundry's "Unused parameters" check and DeepSpeed's pydantic ``extra="forbid"``).

Typical use::

    cfg = load_config(TrainConfig, "configs/demo.yaml", ["optimizer.lr=1e-4", "run_name=no"], presets=PRESETS)
    dump_config_yaml(cfg, out_dir / "config.yaml")
    mlflow.log_params(flatten_dict(config_to_dict(cfg)))

Type coercion and dataclass building are pydantic's (lax mode, over the plain dataclasses: see
:mod:`biomedgpt.config_types` for why pydantic rather than dacite or OmegaConf, and for the few rules it narrows).
This module owns the raw tree: files, ``base`` chains, overrides and where each key came from.

File format: a mapping whose keys are the dataclass fields. The top-level key ``base`` (a preset name, a path, or a
list of them) is reserved: the named configs are loaded first and this file is deep-merged over them (mappings are
merged key by key, anything else - lists included - is replaced). Relative paths are resolved against the folder of
the file that names them.

Overrides: ``dotted.key=value``, applied in order after the file. The value is read as YAML (``3``, ``1e-4``,
``true``, ``[1, 2]``, ``{a: 1}``, ``null``; ``key=`` is null), except that str, Path, Enum and Literal fields get the
text as typed (``run_name=no`` is the string "no", not False). A mapping value is merged into the existing mapping,
like a file over its base.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import json
import re
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from biomedgpt.config_types import (
    DICT_SOURCE,
    CliScalar,
    build_dataclass,
    dataclass_in,
    did_you_mean,
    field_types,
    init_fields,
    join_key,
    type_name,
    unwrap,
)

__all__ = [
    "BASE_KEY",
    "CLI_SOURCE",
    "ConfigError",
    "config_to_dict",
    "describe_config",
    "dump_config_yaml",
    "flatten_dict",
    "load_config",
    "load_raw_config",
]

T = TypeVar("T")

#: Reserved top-level key of a config file that names the config(s) it inherits from.
BASE_KEY = "base"
#: Source label used in error messages for values given as ``key=value`` overrides.
CLI_SOURCE = "command line"
_FILE_SUFFIXES = (".yaml", ".yml", ".json")
_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A configuration problem the user can fix (bad key, bad value, bad file).

    ``errors`` holds every problem found, so one run reports all typos rather than one per attempt.
    """

    def __init__(self, errors: str | Sequence[str]) -> None:
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        if len(self.errors) == 1:
            message = self.errors[0]
        else:
            message = f"{len(self.errors)} config errors:\n" + "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(message)


# ----------------------------------------------------------------------------------------------------------------------
# Raw (untyped) config trees with per-key origins
# ----------------------------------------------------------------------------------------------------------------------

# Origins map a dotted path ("optimizer.lr") to the label of the source that last set it. Kept beside the tree
# rather than inside it so the tree stays plain dicts/lists.
_Origins = dict[str, str]


def _iter_paths(tree: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in tree.items():
        path = join_key(prefix, key)
        yield path
        if isinstance(value, Mapping):
            yield from _iter_paths(value, path)


def _drop_subtree(origins: _Origins, path: str) -> None:
    for p in [p for p in origins if p == path or p.startswith(path + ".")]:
        del origins[p]


def _merge_into(
    dst: dict[str, Any], dst_origins: _Origins, src: Mapping[str, Any], src_origins: _Origins, prefix: str = ""
) -> None:
    """Deep-merge ``src`` over ``dst`` in place (src wins); origins follow the values."""
    for key, value in src.items():
        path = join_key(prefix, key)
        if isinstance(value, Mapping) and isinstance(dst.get(key), dict):
            if path in src_origins:
                dst_origins[path] = src_origins[path]
            _merge_into(dst[key], dst_origins, value, src_origins, path)
            continue
        _drop_subtree(dst_origins, path)
        dst[key] = copy.deepcopy(value)
        for p, label in src_origins.items():
            if p == path or p.startswith(path + "."):
                dst_origins[p] = label


def _display_path(path: Path) -> str:
    # Short, cwd-relative names read better in error messages; fall back to the absolute path.
    resolved = path.resolve()
    try:
        return str(resolved.relative_to(Path.cwd()))
    except ValueError:
        return str(resolved)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last one, hiding copy-paste mistakes)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # unhashable key: construct_mapping below reports it properly
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _read_file(path: Path) -> dict[str, Any]:
    label = _display_path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {label}")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=_UniqueKeyLoader)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot parse config file {label}: {exc}") from exc
    if data is None:  # an empty file is an empty config
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {label} must contain a mapping at the top level, got {type(data).__name__}")
    return data


def _resolve_ref(ref: object, presets: Mapping[str, Path] | None, relative_to: Path | None, where: str) -> Path:
    """A preset name or a config file path -> file path. Names with a .yaml/.yml/.json suffix are paths."""
    if isinstance(ref, Path):
        path = ref
    elif isinstance(ref, str) and presets is not None and ref in presets:
        return Path(presets[ref])
    elif isinstance(ref, str) and ref.endswith(_FILE_SUFFIXES):
        path = Path(ref)
    else:
        known = sorted(presets or {})
        hint = did_you_mean(difflib.get_close_matches(str(ref), known, n=3)) if known else ""
        listing = f" (known presets: {', '.join(known)})" if known else " (no presets are registered)"
        raise ConfigError(
            f"unknown config preset {ref!r} in {where}{hint}{listing}; config file paths must end in "
            + "/".join(_FILE_SUFFIXES)
        )
    path = path.expanduser()
    if not path.is_absolute() and relative_to is not None:
        path = relative_to / path
    return path


def _load_file_tree(path: Path, presets: Mapping[str, Path] | None, chain: tuple[Path, ...]) -> tuple[dict, _Origins]:
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(_display_path(p) for p in (*chain, resolved))
        raise ConfigError(f"cycle in config '{BASE_KEY}' chain: {cycle}")
    data = _read_file(path)
    label = _display_path(path)
    return _expand_bases(data, label, path.parent, presets, (*chain, resolved))


def _expand_bases(
    data: Mapping[str, Any],
    label: str,
    folder: Path | None,
    presets: Mapping[str, Path] | None,
    chain: tuple[Path, ...],
) -> tuple[dict, _Origins]:
    data = dict(data)
    bases = data.pop(BASE_KEY, None)
    if bases is None:
        bases = []
    elif isinstance(bases, (str, Path)):
        bases = [bases]
    elif not isinstance(bases, list):
        raise ConfigError(f"'{BASE_KEY}' in {label} must be a preset name, a path or a list of them, got {bases!r}")
    tree: dict[str, Any] = {}
    origins: _Origins = {}
    for ref in bases:  # later bases win over earlier ones, the file itself wins over all of them
        base_tree, base_origins = _load_file_tree(_resolve_ref(ref, presets, folder, label), presets, chain)
        _merge_into(tree, origins, base_tree, base_origins)
    _merge_into(tree, origins, data, {p: label for p in _iter_paths(data)})
    return tree, origins


# ----------------------------------------------------------------------------------------------------------------------
# Command-line overrides
# ----------------------------------------------------------------------------------------------------------------------

_KEY_RE = re.compile(r"^[A-Za-z_][\w-]*(\.[\w-]+)*$")


def _wrap_cli_node(node: yaml.Node, loader: yaml.SafeLoader) -> Any:
    if isinstance(node, yaml.ScalarNode):
        return CliScalar(node.value, loader.construct_object(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return [_wrap_cli_node(item, loader) for item in node.value]
    if isinstance(node, yaml.MappingNode):
        # Keys keep their text: config keys are strings even if they look like numbers or booleans.
        return {str(k.value): _wrap_cli_node(v, loader) for k, v in node.value}
    raise TypeError(f"unexpected YAML node {node!r}")


def _parse_cli_value(text: str) -> Any:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:  # "key=" -> empty
            return CliScalar(text, None)
        return _wrap_cli_node(node, loader)
    except yaml.YAMLError:
        # Not valid YAML (e.g. "a: b: c" or "[1,"): take the text literally; a non-str field will reject it.
        return CliScalar(text, text)
    finally:
        loader.dispose()


def _parse_override(item: str) -> tuple[str, Any]:
    """Split ``dotted.key=value`` into the key and its parsed value (wrapped scalars keep their text)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if key.endswith("+"):
        raise ConfigError(f"override {item!r} ({CLI_SOURCE}): 'key+=value' is not supported; use key=[...]")
    if not sep or not _KEY_RE.match(key):
        raise ConfigError(f"override {item!r} ({CLI_SOURCE}) must look like dotted.key=value")
    if key == BASE_KEY or key.startswith(BASE_KEY + "."):
        raise ConfigError(f"override {item!r} ({CLI_SOURCE}): '{BASE_KEY}' can only be set inside a config file")
    return key, _parse_cli_value(text)


def _apply_override(tree: dict[str, Any], origins: _Origins, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    prefix = ""
    for part in parts[:-1]:
        prefix = join_key(prefix, part)
        if not isinstance(node.get(part), dict):
            # e.g. "scheduler: null" in the file and "scheduler.warmup=10" on the command line.
            _drop_subtree(origins, prefix)
            node[part] = {}
        origins.setdefault(prefix, CLI_SOURCE)
        node = node[part]
    new = {parts[-1]: value}
    _merge_into(node, origins, new, {join_key(prefix, p): CLI_SOURCE for p in _iter_paths(new)}, prefix)


def _run_converter(cls: type[T], tree: Mapping[str, Any], origins: _Origins) -> T:
    def origin(path: str) -> str:
        # The nearest recorded ancestor: list items ("a.b[2]") inherit their list's source.
        while path:
            if path in origins:
                return origins[path]
            cut = max(path.rfind("."), path.rfind("["))
            path = path[:cut] if cut > 0 else ""
        return DICT_SOURCE

    built = build_dataclass(cls, tree, origin)
    if built.errors:
        raise ConfigError(built.errors) from built.cause
    return typing.cast(T, built.value)


# ----------------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------------


def _load_tree(
    source: str | Path | Mapping[str, Any] | None, overrides: Sequence[str], presets: Mapping[str, Path] | None
) -> tuple[dict[str, Any], _Origins]:
    if source is None:
        tree, origins = {}, {}
    elif isinstance(source, Mapping):
        tree, origins = _expand_bases(source, DICT_SOURCE, None, presets, ())
    elif isinstance(source, (str, Path)):
        tree, origins = _load_file_tree(_resolve_ref(source, presets, None, "--config"), presets, ())
    else:
        raise TypeError(f"config source must be a preset name, a path, a dict or None, not {type(source).__name__}")
    for item in overrides:
        key, value = _parse_override(item)
        _apply_override(tree, origins, key, value)
    return tree, origins


def load_raw_config(
    source: str | Path | Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    presets: Mapping[str, Path] | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The merged, untyped config tree (bases expanded, overrides applied, YAML readings of override values) and
    the source label of each dotted key. For tools that inspect the raw tree; most callers want :func:`load_config`.
    """
    tree, origins = _load_tree(source, overrides, presets)
    return unwrap(tree), dict(origins)


def load_config(
    cls: type[T],
    source: str | Path | Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    presets: Mapping[str, Path] | None = None,
) -> T:
    """Build ``cls`` (a dataclass) from a preset name, a .yaml/.yml/.json file, a dict (or a ``cls`` instance) or
    nothing (all defaults), then ``dotted.key=value`` overrides.

    Raises :class:`ConfigError` listing every problem found (unknown keys with suggestions, wrong types, missing
    required keys, ``__post_init__`` errors prefixed with the dataclass's dotted path).
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    if dataclasses.is_dataclass(source) and not isinstance(source, type):
        source = config_to_dict(source)
    tree, origins = _load_tree(source, overrides, presets)
    return _run_converter(cls, tree, origins)


def config_to_dict(obj: Any) -> Any:
    """Plain YAML/JSON-ready data: dataclasses -> dicts, Enums -> values, Paths -> str, tuples -> lists.

    Only ``init`` fields are written, so ``load_config(type(x), config_to_dict(x)) == x``.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: config_to_dict(getattr(obj, f.name)) for f in init_fields(type(obj))}
    if isinstance(obj, enum.Enum):
        return config_to_dict(obj.value)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):
        return {k: config_to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [config_to_dict(v) for v in obj]
    return obj


def flatten_dict(d: Mapping[str, Any] | Any, sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (e.g. for MLflow params). Dataclasses are converted first; empty mappings
    are kept as ``{}`` so no key disappears; lists are left as values."""
    if dataclasses.is_dataclass(d) and not isinstance(d, type):
        d = config_to_dict(d)
    flat: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_dict(value, sep, name))
        else:
            flat[name] = value
    return flat


def dump_config_yaml(obj: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (loadable again with :func:`load_config`); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(obj), sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def describe_config(cls: type, prefix: str = "") -> str:
    """One line per key, ``dotted.key: type = default  # help`` (help from ``field(metadata={"help": ...})``).

    Nested dataclasses are expanded into their own dotted keys; meant for a ``--help-config`` option.
    """
    lines: list[str] = []
    declared = field_types(cls)
    for f in init_fields(cls):
        path = join_key(prefix, f.name)
        line = f"{path}: {type_name(declared[f.name])}"
        if f.default is not _MISSING:
            line += f" = {config_to_dict(f.default)!r}"
        elif f.default_factory is not _MISSING:
            made = f.default_factory()
            if not dataclasses.is_dataclass(made):  # a nested dataclass's defaults are listed key by key below
                line += f" = {config_to_dict(made)!r}"
        else:
            line += "  (required)"
        if f.metadata.get("help"):
            line += f"  # {f.metadata['help']}"
        lines.append(line)
        sub = dataclass_in(declared[f.name])
        if sub is not None:
            lines.append(describe_config(sub, path))
    return "\n".join(lines)
