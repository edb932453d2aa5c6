"""Building a tree of config dataclasses from a merged, untyped config tree.

pydantic (lax mode, over the plain standard-library dataclasses) does the type coercion, the nesting, the
``__post_init__`` calls and collects every bad value in one pass. This module adds the three things pydantic has no
notion of, which the messages of :mod:`biomedgpt.config_utils` need:

- which source (file or command line) set each key, named in every message;
- unknown keys with the closest valid keys (pydantic ignores extra keys of a standard dataclass);
- command-line values keep their text next to their YAML reading: ``run_name=no`` is the string ``"no"`` for a str
  field and ``shuffle=no`` is False for a bool field. Before validation, each such value is given in the reading its
  declared type asks for.

A few of pydantic's lax rules are narrowed before validation, where a config value is almost certainly a mistake:
a bool is not an int or a float (``max_steps: true``) and an int is not a bool (``shuffle: 1`` in a file). PyYAML
(YAML 1.1) reads ``1e-4`` and ``1e6`` as strings; numeric fields take them as numbers. Enum fields also accept a
member's name (``precision=BF16``).

Why pydantic: it is already installed (DeepSpeed and MLflow validate their own configs with it), it reports every
bad value of a tree at once with its location, it runs ``__post_init__`` only on sections whose fields are valid and
keeps the ``init=False`` fields that ``__post_init__`` computes. dacite stops at the first error and sets
``init=False`` fields back afterwards; OmegaConf would be a new dependency, and its released 2.3 rejects the
``Literal`` annotations every choice of the trainer's config uses.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import pydantic

#: Source label used in error messages for values of a dict given directly (not a file or the command line).
DICT_SOURCE = "<dict>"

_MISSING = dataclasses.MISSING
# pydantic rejects this for every type the conversion puts it in (bool, int, float): the message is then built from
# the value the user gave, which pydantic's lax rules would have accepted.
_REJECTED = object()


@dataclasses.dataclass(frozen=True)
class CliScalar:
    """A scalar from a command-line override: keeps the text next to its YAML reading.

    YAML reads ``no`` as False and ``1.0`` as a float; when the declared type is str (or Path, Enum, Literal of
    strings) the user meant the text, so the conversion picks whichever reading the declared type asks for.
    """

    text: str
    value: Any


# ----------------------------------------------------------------------------------------------------------------------
# Type helpers
# ----------------------------------------------------------------------------------------------------------------------


def join_key(prefix: str, key: object) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The declared type of each ``init`` field (``init=False`` fields are computed by the dataclass itself)."""
    # get_type_hints resolves string annotations (``from __future__ import annotations``) in the class's module.
    try:
        hints = typing.get_type_hints(cls)
    except NameError as exc:  # e.g. a dataclass defined inside a function, referring to another local class
        raise TypeError(f"cannot resolve the type annotations of {cls.__qualname__}: {exc}") from exc
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def init_fields(cls: type) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _strip_annotated(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _optional_inner(tp: Any) -> Any | None:
    """X for ``X | None`` (and only then)."""
    if _is_union(tp):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return None


def enum_value(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def type_name(tp: Any) -> str:
    tp = _strip_annotated(tp)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is type(None):
        return "None"
    if tp is Any:
        return "Any"
    if _is_union(tp):
        return " | ".join(type_name(a) for a in args)
    if origin is Literal:
        return "Literal[" + ", ".join(repr(enum_value(a)) for a in args) + "]"
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return f"tuple[{type_name(args[0])}, ...]"
        return f"{name}[" + ", ".join(type_name(a) for a in args) + "]" if args else name
    if isinstance(tp, type):
        return tp.__name__
    return str(tp)


def dataclass_in(tp: Any) -> type | None:
    """The dataclass a field holds directly or as Optional[...] (these are expanded into dotted keys)."""
    tp = _strip_annotated(tp)
    inner = _optional_inner(tp)
    if inner is not None:
        return dataclass_in(inner)
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


@functools.cache
def all_paths(cls: type, prefix: str = "") -> tuple[str, ...]:
    paths: list[str] = []
    for name, tp in field_types(cls).items():
        path = join_key(prefix, name)
        paths.append(path)
        sub = dataclass_in(tp)
        if sub is not None:
            paths.extend(all_paths(sub, path))
    return tuple(paths)


def _fixed_tuple_args(tp: Any) -> tuple[Any, ...] | None:
    tp = _strip_annotated(tp)
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        return args
    return None


def _choices(tp: Any) -> list[Any] | None:
    """The allowed values of a Literal, or the members of an Enum."""
    tp = _strip_annotated(tp)
    if typing.get_origin(tp) is Literal:
        return list(typing.get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return list(tp)
    return None


def unwrap(value: Any) -> Any:
    """Drop the command-line text wrappers, keeping YAML's reading."""
    if isinstance(value, CliScalar):
        return value.value
    if isinstance(value, dict):
        return {k: unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unwrap(v) for v in value]
    return value


def did_you_mean(matches: Sequence[str]) -> str:
    if not matches:
        return ""
    quoted = [f"'{m}'" for m in matches]
    joined = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
    return f"; did you mean {joined}?"


def _tokens(name: str) -> set[str]:
    return {t for t in re.split(r"[_\-]+", name.lower()) if t}


def closest_keys(unknown: str, candidates: Sequence[str], siblings: Sequence[str], limit: int = 3) -> list[str]:
    """Rank valid dotted keys by closeness to an unknown dotted key.

    Compares leaf names (finds ``optimizer.lr`` for a top-level ``lr`` put in the wrong section), dotted paths
    with their shared prefix removed (``optimizer_lr`` -> ``optimizer.lr``; the shared prefix would make every
    sibling look close), and ``_``-separated words (``lr_rate`` -> ``lr``, which difflib alone scores low).
    Keys need a raw score of 0.6 (difflib's usual cutoff); same-level keys then get a bonus and only keys within
    0.08 of the best are kept, so the hint stays short.
    """
    leaf = unknown.rsplit(".", 1)[-1]
    unknown_parts = unknown.split(".")
    scores: dict[str, float] = {}  # only candidates with a raw score of at least 0.6
    for cand in candidates:
        cand_parts = cand.split(".")
        common = 0
        while common < min(len(cand_parts), len(unknown_parts)) and cand_parts[common] == unknown_parts[common]:
            common += 1
        rest, cand_rest = ".".join(unknown_parts[common:]), ".".join(cand_parts[common:])
        if not cand_rest:  # an ancestor of the unknown key is never the fix
            continue
        cand_leaf = cand_parts[-1]
        words, cand_words = _tokens(leaf), _tokens(cand_leaf)
        score = max(
            difflib.SequenceMatcher(None, leaf, cand_leaf).ratio(),
            difflib.SequenceMatcher(None, rest, cand_rest).ratio(),
            0.75 if words and cand_words and (words <= cand_words or cand_words <= words) else 0.0,
        )
        if score >= 0.6:
            scores[cand] = score + (0.1 if cand in siblings else 0.0)
    if not scores:
        return []
    floor = max(scores.values()) - 0.08
    ranked = sorted((c for c in scores if scores[c] >= floor), key=lambda c: -scores[c])
    return ranked[:limit]


# ----------------------------------------------------------------------------------------------------------------------
# Before validation: unknown keys, and each command-line value in the reading its type asks for
# ----------------------------------------------------------------------------------------------------------------------


def _parse_number(raw: str) -> Any:
    for parse in (int, float):
        try:
            return parse(raw.strip())
        except ValueError:
            pass
    return raw


class _Preparation:
    """Walks the raw tree along the declared types; records unknown keys and returns the data pydantic validates."""

    def __init__(self, root: type, origin: typing.Callable[[str], str]) -> None:
        self.root = root
        self.origin = origin
        self.unknown: list[tuple[tuple[int, ...], str]] = []  # (sort key, message)
        # Their __post_init__ checks ran on defaults in place of the misspelt keys: not worth reporting.
        self.sections_with_unknown_keys: set[str] = set()

    def value(self, tp: Any, raw: Any, path: str, order: tuple[int, ...]) -> Any:
        tp = _strip_annotated(tp)
        if _is_union(tp):
            if unwrap(raw) is None and type(None) in typing.get_args(tp):
                return None
            inner = _optional_inner(tp)
            if inner is not None:
                return self.value(inner, raw, path, order)
            return self.first_member(tp, raw, path, order)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            return self.section(tp, raw, path, order) if isinstance(raw, Mapping) else unwrap(raw)
        choices = _choices(tp)
        if choices is not None:
            return self.choice(choices, raw)
        origin = tp if tp in (list, tuple, dict) else typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin in (list, tuple, Sequence) and isinstance(raw, (list, tuple)):
            fixed = _fixed_tuple_args(tp)
            item_types = list(fixed) if fixed else [args[0] if args else Any] * len(raw)
            return [self.value(t, v, f"{path}[{i}]", (*order, i)) for i, (t, v) in enumerate(zip(item_types, raw))] + [
                unwrap(v) for v in raw[len(item_types) :]
            ]  # items past a fixed tuple's length: pydantic says so
        if origin in (dict, Mapping) and isinstance(raw, Mapping):
            key_type, value_type = args if args else (Any, Any)
            return {
                self.value(key_type, CliScalar(str(k), k), path, order): self.value(
                    value_type, v, join_key(path, k), (*order, i)
                )
                for i, (k, v) in enumerate(raw.items())
            }
        if tp is bool:
            reading = raw.text if isinstance(raw, CliScalar) else raw
            # pydantic would take 1 and 0.0 for a bool: in a config file they are mistakes.
            return _REJECTED if isinstance(reading, (int, float)) and not isinstance(reading, bool) else reading
        if tp in (int, float):
            reading = unwrap(raw)
            if isinstance(reading, bool):  # pydantic would take True for 1
                return _REJECTED
            return _parse_number(reading) if isinstance(reading, str) else reading
        if tp is str or (isinstance(tp, type) and issubclass(tp, Path)):
            return raw.text if isinstance(raw, CliScalar) else raw
        return unwrap(raw)

    @staticmethod
    def choice(choices: list[Any], raw: Any) -> Any:
        """Literal values or Enum members: the command-line text first, then YAML's reading; Enums also by name."""
        for candidate in [raw.text, raw.value] if isinstance(raw, CliScalar) else [raw]:
            for option in choices:
                plain = enum_value(option)
                # The type() check keeps True from matching Literal[1] (bool is an int).
                if (type(candidate) is type(plain) and candidate == plain) or (
                    isinstance(option, enum.Enum) and candidate == option.name
                ):
                    return option
        return _REJECTED  # pydantic's lax Literal/Enum matching would take True for 1 or 1.0 for 1

    def first_member(self, tp: Any, raw: Any, path: str, order: tuple[int, ...]) -> Any:
        """A union: the first member (in declaration order) that takes the value, prepared and validated for it
        alone (so ``str | int`` keeps the command line's ``5`` as text, and a mapping goes to the first dataclass
        member whose keys it has); no member: rejected, reported as the union."""
        for member in typing.get_args(tp):
            if member is type(None):
                continue
            scratch = _Preparation(self.root, self.origin)
            prepared = scratch.value(member, raw, path, order)
            if scratch.unknown or prepared is _REJECTED:
                continue
            try:
                return _adapter(member).validate_python(prepared)
            except pydantic.ValidationError:
                continue
        return _REJECTED

    def section(self, cls: type, raw: Mapping[str, Any], path: str, order: tuple[int, ...]) -> dict[str, Any]:
        types_ = field_types(cls)
        names = list(types_)
        out: dict[str, Any] = {}
        for position, (key, item) in enumerate(raw.items()):
            item_path = join_key(path, key)
            if key in types_:
                out[key] = self.value(types_[key], item, item_path, (*order, position))
                continue
            siblings = [join_key(path, name) for name in names]
            candidates = list(dict.fromkeys([*siblings, *all_paths(self.root)]))
            hint = did_you_mean(closest_keys(item_path, candidates, siblings)) or (
                "; valid keys here: " + ", ".join(names)
            )
            message = f"unknown key '{item_path}' (from {self.origin(item_path)}){hint}"
            self.unknown.append(((*order, position), message))
            self.sections_with_unknown_keys.add(path)
        return out


# ----------------------------------------------------------------------------------------------------------------------
# After validation: pydantic's errors in the loader's words
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Place:
    """Where an error location of pydantic points in the declared config: the dotted path, its declared type, the
    declared type of its parent, and a key that sorts errors in the order the keys were given (keys that were not
    given, such as missing required ones, after those of their section)."""

    path: str
    tp: Any
    parent_tp: Any
    order: tuple[int, ...]
    depth: int  # how many steps of the location lead there


def _locate(root: type, raw: Any, loc: tuple[int | str, ...]) -> _Place:
    path, tp, parent_tp, order, depth = "", root, None, (), 0
    for step in loc:
        plain = _strip_annotated(_optional_inner(tp) or tp)
        # The remaining steps name a member of a union (or a mapping's key): the error is reported where it is.
        if _is_union(plain) or step == "[key]":
            break
        parent_tp = tp
        if isinstance(step, int) and (typing.get_origin(plain) in (list, tuple, Sequence) or plain in (list, tuple)):
            fixed = _fixed_tuple_args(plain)
            args = typing.get_args(plain)
            tp = (fixed[step] if step < len(fixed) else Any) if fixed else (args[0] if args else Any)
            order = (*order, step)
            path = f"{path}[{step}]"
        else:  # a dataclass field or a mapping's key
            if isinstance(plain, type) and dataclasses.is_dataclass(plain):
                declared = list(field_types(plain))
                tp = field_types(plain).get(str(step), Any)
            else:
                declared, args = [], typing.get_args(plain)
                tp = args[1] if len(args) == 2 else Any
            given = list(raw) if isinstance(raw, Mapping) else []
            position = given.index(step) if step in given else len(given) + (declared + [step]).index(step)
            order = (*order, position)
            path = join_key(path, step)
        raw = _child(raw, step)
        depth += 1
    return _Place(path, tp, parent_tp, order, depth)


def _child(raw: Any, step: int | str) -> Any:
    if isinstance(raw, Mapping):
        if step in raw:
            return raw[step]
        # A YAML key such as 1 was given to a dict[str, X] as "1".
        return next((value for key, value in raw.items() if str(key) == str(step)), None)
    if isinstance(raw, (list, tuple)) and isinstance(step, int) and step < len(raw):
        return raw[step]
    return None


def _show(value: Any) -> str:
    return repr(value.text) if isinstance(value, CliScalar) else repr(unwrap(value))


def _expected(tp: Any) -> str:
    plain = _strip_annotated(tp)
    choices = _choices(plain)
    if choices is not None:
        return "one of " + ", ".join(repr(enum_value(c)) for c in choices)
    if isinstance(plain, type) and dataclasses.is_dataclass(plain):
        return f"{plain.__name__} (a mapping of its keys)"
    return type_name(tp)


def _hint(tp: Any) -> str:
    plain = _strip_annotated(_optional_inner(tp) or tp)
    if plain is str:
        return "; quote it in YAML if a string is meant"
    if plain is bool:
        return "; use true/false"
    return ""


@dataclasses.dataclass
class Built:
    """The result of :func:`build_dataclass`: the object, or every problem found (and the first ``__post_init__``
    error, to chain for its traceback)."""

    value: Any
    errors: list[str]
    cause: BaseException | None = None


@functools.cache
def _adapter(cls: type) -> pydantic.TypeAdapter[Any]:
    return pydantic.TypeAdapter(cls)


def build_dataclass(cls: type, tree: Mapping[str, Any], origin: typing.Callable[[str], str]) -> Built:
    """Build dataclass ``cls`` from a raw tree (``CliScalar`` leaves where the command line set a value); ``origin``
    names the source of a dotted key for the messages."""
    preparation = _Preparation(cls, origin)
    data = preparation.section(cls, tree, "", ())
    problems = list(preparation.unknown)
    value, cause = None, None
    try:
        value = _adapter(cls).validate_python(data)
    except pydantic.ValidationError as exc:
        seen: set[str] = set()
        for error in exc.errors(include_url=False):
            loc = tuple(error["loc"])
            key_error = bool(loc) and loc[-1] == "[key]"  # a mapping's key, not its value, is wrong
            if key_error:
                loc = loc[:-1]
            place = _locate(cls, tree, loc)
            # A fixed tuple reports a missing item at the item; the tuple is what was given wrong.
            fixed = _fixed_tuple_args(_optional_inner(place.parent_tp) or place.parent_tp)
            missing_item = error["type"] == "missing" and fixed is not None and isinstance(loc[-1], int)
            if missing_item:
                place = _locate(cls, tree, loc[:-1])
            if place.path in seen:
                continue
            seen.add(place.path)
            raw: Any = tree
            for step in loc[: place.depth]:
                raw = _child(raw, step)
            within_union = place.depth < len(loc) and not missing_item  # cut at a union: the union is reported
            if key_error:
                key_type = typing.get_args(_strip_annotated(_optional_inner(place.parent_tp) or place.parent_tp))
                message = (
                    f"invalid key in '{place.path}': expected {type_name(key_type[0]) if key_type else 'str'}, "
                    f"got {loc[-1]!r} (from {origin(place.path)})"
                )
            elif error["type"] == "missing" and not missing_item and not within_union:
                message = (
                    f"missing required key '{place.path}' (no default): "
                    f"set it in the config file or with {place.path}=..."
                )
            elif (
                error["type"] in ("value_error", "assertion_error")
                and dataclass_in(place.tp) is not None
                and not within_union
            ):
                if place.path in preparation.sections_with_unknown_keys:
                    continue
                # __post_init__ checks know their fields but not where their dataclass sits in the tree.
                cause = cause or error["ctx"]["error"]
                message = f"{place.path or cls.__name__}: {error['ctx']['error']}"
            else:
                length = _fixed_tuple_args(_optional_inner(place.tp) or place.tp)
                wrong_length = length and (missing_item or error["type"] == "too_long")
                hint = f"; needs exactly {len(length)} items" if wrong_length else ""
                message = (
                    f"invalid value for '{place.path or '<root>'}': expected {_expected(place.tp)}, got {_show(raw)}"
                    f" (from {origin(place.path)}){hint or _hint(place.tp)}"
                )
            problems.append((place.order, message))
    problems.sort(key=lambda problem: problem[0])
    return Built(value if not problems else None, [message for _, message in problems], cause)
