"""Typed config sections, driver options and API parameters on msgspec, every problem at once.

msgspec converts a whole mapping in C and stops at its first error; a technician fixing a config
file, or an integrator fixing a request, wants every problem with its key path. `convert` takes
the fast path (one `msgspec.convert` of the whole) and only when that fails walks the Struct field
by field, converting each value on its own, to collect them all: unknown keys (with the close
match for a typo), missing ones ("required"), each bad value, and a section's own cross-field
check once its fields are right. The config (agent/config.py), every driver's options and the
API's params all go through this one function.

What msgspec cannot say in a type is said with two small hooks:
- `Check(fn)` in a field's `Annotated[...]`: `fn(value)` after conversion returns the value to
  keep (normalised, say) or raises ValueError with a message a technician understands. On a
  member of a union (`Annotated[str, Check(fn)] | None`), only a value of that member's type is
  checked.
- `Custom`: a type msgspec does not know (a secret, a duration "24h"), made by its `decode`
  classmethod from the TOML/JSON value; `Path` is made from a string.

Modules that define these Structs do not use `from __future__ import annotations`: msgspec
would compile and evaluate every annotation string at a class's first use (a third of the config's
load at the daemon's start); written annotations are objects already.

Like agent.model, this module depends on nothing else of scanbox: drivers may import it.
"""

import enum
import functools
import re
import types
from pathlib import Path
from typing import (Annotated, Any, Callable, Iterable, Literal, Mapping, TypeVar, Union, dataclass_transform, get_args,
                    get_origin)

import msgspec

T = TypeVar("T")

# msgspec ends each message with where it happened, relative to what it converted: the path
# is ours (the key path in the user's file), so the suffix is taken apart and the rest kept
_AT = re.compile(r"^(?P<message>.*) - at `\$(?P<where>[^`]*)`$", re.DOTALL)
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]|\[\.\.\.\]")


class Check:
    """`Annotated` metadata: a check msgspec's `Meta` cannot express (a code from a spec's table,
    a regular expression that must compile, HOST:PORT). `fn` gets the converted value and
    returns the value to keep, or raises ValueError."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn


def regex(value: str) -> str:
    """A `Check`: a regular expression that compiles (a site's QR forms, a card reader's name)."""
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError("not a regular expression: %s" % exc) from None
    return value


Regex = Annotated[str, Check(regex)]


class Custom:
    """A type made from a TOML or JSON value by `decode` (raising ValueError with the reason),
    written back by `encode` (what `config check` prints)."""

    __slots__ = ()

    @classmethod
    def decode(cls, value: Any) -> Any:
        raise NotImplementedError

    def encode(self) -> Any:
        raise NotImplementedError


class _SchemaMeta(msgspec.StructMeta):
    """Every subclass keyword-only, like the base: msgspec hands frozen and forbid_unknown_fields
    down to subclasses but not kw_only, without which a required field cannot follow one with a
    default (and a section's keys stay in the order a technician reads them)."""

    def __new__(mcls, name: str, bases: tuple[type, ...], namespace: dict[str, Any], **kwargs: Any) -> Any:
        kwargs.setdefault("kw_only", True)
        return super().__new__(mcls, name, bases, namespace, **kwargs)


# what the metaclass and msgspec hand down, said to type checkers
@dataclass_transform(frozen_default=True, kw_only_default=True, field_specifiers=(msgspec.field,))
class Schema(msgspec.Struct, metaclass=_SchemaMeta, frozen=True, forbid_unknown_fields=True):
    """Base of config sections, driver options and API params: unknown keys are errors, values
    are read-only and given by name, each field's `Check`s run on conversion, then `check`
    across fields."""

    def __post_init__(self) -> None:
        for name, checks in _field_checks(type(self)):
            value = kept = getattr(self, name)
            for fn, applies_to in checks:
                if isinstance(kept, applies_to):
                    kept = fn(kept)
            if kept is not value:
                msgspec.structs.force_setattr(self, name, kept)
        self.check()

    def check(self) -> None:
        """Checks across fields (exactly one of two keys set, say): raise ValueError. Runs once
        every field is right; its problem is reported at the section's path."""


class Invalid(ValueError):
    """Every problem of a value: (key path joined with ".", message), in the order found."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("\n".join("%s: %s" % (path or "(top level)", message) for path, message in problems))


def convert(data: Any, type_: type[T], path: tuple[str | int, ...] = (), *, key: str = "key",
            strict: bool = True) -> T:
    """`data` (from TOML or JSON) as `type_`; raises Invalid with every problem, each under
    `path` + its own key path. `key` is what the user calls a key ("parameter" for the API).
    strict=False also takes a number or a boolean written as a string ("5", "true"), as the
    config always has; a boolean is never a number either way."""
    try:
        return msgspec.convert(data, type_, strict=strict, dec_hook=_decode)
    except msgspec.ValidationError as exc:
        problems = _collect(data, type_, path, _Walk(key, strict))
        if not problems:  # the walk sees what the whole saw; should it not, the whole's word stands
            problems = [_problem(path, type_, str(exc))]
        raise Invalid(problems) from None


def encode_hook(value: Any) -> Any:
    """For msgspec.to_builtins and msgspec.json.encode: Custom types and paths as plain data."""
    if isinstance(value, Custom):
        return value.encode()
    if isinstance(value, Path):
        return str(value)
    raise NotImplementedError("cannot encode %s" % type(value).__name__)


def to_builtins(value: Any) -> Any:
    """A Struct (and what it holds) as dicts, lists, strings and numbers; secrets masked."""
    return msgspec.to_builtins(value, enc_hook=encode_hook)


def suggest(word: str, choices: Iterable[str]) -> str:
    """" (did you mean 'x'?)" for the close match of a typo, else ""."""
    import difflib  # only for a key that is wrong

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return " (did you mean %r?)" % close[0] if close else ""


@functools.cache
def fields(cls: type[msgspec.Struct]) -> Mapping[str, msgspec.structs.FieldInfo]:
    """A Struct's fields by the key a user writes; worked out once per class (msgspec evaluates
    every annotation again at each call), read-only."""
    return types.MappingProxyType({f.encode_name: f for f in msgspec.structs.fields(cls)})


def structs_in(annotation: Any) -> list[type[msgspec.Struct]]:
    """The Struct types a field holds directly (itself, or a member of its union)."""
    annotation = _strip(annotation)
    if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
        return [annotation]
    if _is_union(annotation):
        return [s for a in get_args(annotation) for s in structs_in(a)]
    return []


def dict_value_struct(annotation: Any) -> type[msgspec.Struct] | None:
    """T of a `dict[str, T]` field whose values are Structs (tables of tables: api.clients)."""
    annotation = _strip(annotation)
    if get_origin(annotation) is dict:
        args = get_args(annotation)
        if len(args) == 2:
            value = _strip(args[1])
            if isinstance(value, type) and issubclass(value, msgspec.Struct):
                return value
    return None


def types_in(annotation: Any) -> list[Any]:
    """Every type named in an annotation, nested ones included."""
    annotation = _strip(annotation)
    return [annotation] + [t for a in get_args(annotation) for t in types_in(a)]


# --- internals -------------------------------------------------------------------------------

def _decode(type_: Any, value: Any) -> Any:
    if isinstance(type_, type) and isinstance(value, type_):  # made in code, not read from a file
        return value
    if isinstance(type_, type) and issubclass(type_, Custom):
        return type_.decode(value)
    if type_ is Path:
        if isinstance(value, str) and value:
            return Path(value)
        raise ValueError("Expected a path (a non-empty string), got %s" % _describe(value))
    raise NotImplementedError("no conversion to %r" % (type_,))


def _describe(value: Any) -> str:
    return "`%s`" % {bool: "bool", int: "int", float: "float", str: "str", list: "array",
                     dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


# a field's checks: (fn, the type a value must be for fn to apply to it)
_Checks = tuple[tuple[Callable[[Any], Any], Any], ...]
_CHECKS: dict[type, tuple[tuple[str, _Checks], ...]] = {}


def _field_checks(cls: type) -> tuple[tuple[str, _Checks], ...]:
    """(field, checks) of the fields of `cls` that have Checks; worked out on a class's first
    instance (its annotations are only resolvable once its module is loaded)."""
    found = _CHECKS.get(cls)
    if found is None:
        found = tuple((f.name, checks) for f in fields(cls).values() if (checks := _checks_of(f.type)))
        _CHECKS[cls] = found
    return found


def _checks_of(annotation: Any) -> _Checks:
    if get_origin(annotation) is Annotated:
        return tuple((m.fn, object) for m in annotation.__metadata__ if isinstance(m, Check))
    if _is_union(annotation):
        return tuple((m.fn, _runtime_type(a)) for a in get_args(annotation) if get_origin(a) is Annotated
                     for m in a.__metadata__ if isinstance(m, Check))
    return ()


def _runtime_type(annotation: Any) -> Any:
    """What isinstance can test a converted value of `annotation` against."""
    annotation = _strip(annotation)
    if _is_union(annotation):
        return tuple(_runtime_type(a) for a in get_args(annotation))
    if get_origin(annotation) is Literal:
        return tuple({type(v) for v in get_args(annotation)})
    return get_origin(annotation) or annotation


def _strip(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def _is_union(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType)


class _Walk(msgspec.Struct, frozen=True):
    key: str
    strict: bool


def _collect(value: Any, type_: Any, path: tuple[str | int, ...], walk: _Walk) -> list[tuple[str, str]]:
    structs = structs_in(type_)
    if len(structs) == 1 and isinstance(value, dict):
        return _collect_struct(value, structs[0], path, walk)
    inner = dict_value_struct(type_)
    if inner is not None and isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return [p for name, item in value.items() for p in _collect(item, inner, path + (name,), walk)]
    try:
        converted = msgspec.convert(value, type_, strict=walk.strict, dec_hook=_decode)
    except msgspec.ValidationError as exc:
        return [_problem(path, type_, str(exc))]
    for fn, applies_to in _checks_of(type_):
        if isinstance(converted, applies_to):
            try:
                converted = fn(converted)
            except (ValueError, TypeError) as exc:  # what msgspec makes a ValidationError of
                return [(_join(path), str(exc))]
    return []


def _collect_struct(value: dict[Any, Any], cls: type[msgspec.Struct], path: tuple[str | int, ...],
                    walk: _Walk) -> list[tuple[str, str]]:
    known = fields(cls)
    problems = [(_join(path + (name,)), "unknown %s%s" % (walk.key, suggest(str(name), known)))
                for name in value if name not in known]
    for name, field in known.items():
        if name in value:
            problems += _collect(value[name], field.type, path + (name,), walk)
        elif field.required:
            problems.append((_join(path + (name,)), "required"))
    if not problems:  # every field is right: what is left is the section's own check
        try:
            msgspec.convert(value, cls, strict=walk.strict, dec_hook=_decode)
        except msgspec.ValidationError as exc:
            problems.append(_problem(path, cls, str(exc)))
    return problems


def _problem(path: tuple[str | int, ...], type_: Any, text: str) -> tuple[str, str]:
    where: tuple[str | int, ...] = ()
    match = _AT.match(text)
    if match is not None:
        text = match.group("message")
        for step in _STEP.finditer(match.group("where")):
            if step.group(1) is not None:
                where += (step.group(1),)
            elif step.group(2) is not None:
                where += (int(step.group(2)),)
            else:
                break  # a dict's key msgspec does not name: the problem stays at the dict
    if text.startswith("Invalid enum value "):
        choices = _choices(type_)
        if choices:
            text = "%s is not one of %s" % (text[len("Invalid enum value "):], ", ".join(map(repr, choices)))
    return _join(path + where), text


def _choices(annotation: Any) -> list[Any]:
    """The values of the first Literal or Enum in an annotation (for "not one of ...")."""
    for t in types_in(annotation):
        if get_origin(t) is Literal:
            return list(get_args(t))
        if isinstance(t, type) and issubclass(t, enum.Enum):
            return [m.value for m in t]
    return []


def _join(parts: Iterable[Any]) -> str:
    return ".".join(str(p) for p in parts)
