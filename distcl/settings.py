"""Settings that validate themselves: a :func:`settings` class is a pydantic dataclass whose fields declare their
type, bounds and choices once (``Annotated[int, Ge(1)]``, ``Literal[...]``), with the rules between its fields in
``__post_init__``. Every error is one :class:`ConfigError` naming the field by its dotted path and the allowed
values; :func:`from_dict` builds settings from YAML mappings. Imports nothing of distcl.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Annotated, Any, Literal

from annotated_types import Ge, Gt, Interval
from pydantic import BeforeValidator, ConfigDict, Strict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass


class ConfigError(ValueError):
    """A config field is wrong. ``str(err)`` reads ``<field>: <what is wrong> (allowed: ...)``."""

    def __init__(self, field_name: str, message: str):
        super().__init__(field_name, message)  # the arguments: copied and pickled as they came (Ray, Tune)
        self.field, self.message = field_name, message

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def check_field(ok: bool, name: str, message: str) -> None:
    """A rule between fields: ConfigError(name, message) unless ``ok``."""
    if not ok:
        raise ConfigError(name, message)


def _yaml_number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string: a number field takes it as the number it spells."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


# Field types as YAML writes them: no silent casts (1 is not true, 2.5 is not an integer, "3" is not a number).
Int = Annotated[int, Strict()]
Real = Annotated[float, Strict(), BeforeValidator(_yaml_number)]
Flag = Annotated[bool, Strict()]
Text = Annotated[str, Strict()]
Count = Annotated[Int, Ge(1)]
Positive = Annotated[Real, Gt(0)]
NonNegative = Annotated[Real, Ge(0)]
Eta = Annotated[Real, Interval(ge=0, le=1)]


def choices(alias: Any) -> tuple[str, ...]:
    """The allowed values of a ``Literal`` field type."""
    return typing.get_args(alias)


def settings(cls: type) -> type:
    """A dataclass whose fields validate themselves (a pydantic dataclass: types, bounds, choices, no unknown
    fields), with the rules between its fields in ``__post_init__``; a bad value is a ConfigError."""
    cls = pydantic_dataclass(cls, config=ConfigDict(extra="forbid"))
    validated_init = cls.__init__

    def __init__(self, *args, **kwargs):
        try:
            validated_init(self, *args, **kwargs)
        except ValidationError as err:
            raise _config_error(err, type(self), "") from None

    cls.__init__ = __init__
    return cls


def from_dict(cls: type, data: Any, prefix: str = ""):
    """Settings ``cls`` from a mapping (nested sections too); a ConfigError names the first wrong field."""
    try:
        return _adapter(cls).validate_python(data)
    except ValidationError as err:
        raise _config_error(err, cls, prefix) from None


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "dataclass_type": "a mapping",
}


def _config_error(err: ValidationError, cls: type, prefix: str) -> ConfigError:
    """The first error of ``err`` as ``<field>: <value> (allowed: ...)``, the field named by its dotted path."""
    first = err.errors()[0]
    if first["type"] == "value_error" and isinstance(first.get("ctx", {}).get("error"), ConfigError):
        return first["ctx"]["error"]  # a rule between fields, raised with its field's name
    name, hint, owner = _field_at(cls, first["loc"])
    name = f"{prefix}{name}".rstrip(".") or prefix.rstrip(".") or "config"
    value = first["input"]
    if first["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        return ConfigError(name, f"unknown field (allowed: {', '.join(f.name for f in dataclasses.fields(owner))})")
    if first["type"] in _EXPECTED:
        return ConfigError(name, f"expected {_EXPECTED[first['type']]}, got {value!r}")
    return ConfigError(name, f"{value!r} (allowed: {_allowed(hint)})")


def _field_at(cls: type, loc: tuple) -> tuple[str, Any, type]:
    """(dotted name, type, owning settings class) of the field at a pydantic error location."""
    names, hint, owner = [], cls, cls
    for part in loc:
        section = _bare(hint)
        if isinstance(part, int) or not dataclasses.is_dataclass(section):
            break
        owner, hint = section, typing.get_type_hints(section, include_extras=True).get(part)
        names.append(part)
    return ".".join(names), hint, owner


def _bare(hint: Any) -> Any:
    """The type inside Optional[...] and Annotated[...]."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return _bare(args[0])
    return typing.get_args(hint)[0] if typing.get_origin(hint) is Annotated else hint


def _allowed(hint: Any) -> str:
    """What a field type allows, in words: its choices or bounds, ``null or ...`` when optional."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        others = " or ".join(_allowed(a) for a in args if a is not type(None))
        return f"null or {others}" if type(None) in args else others
    if typing.get_origin(hint) is Literal:
        return ", ".join(map(str, args))
    meta = args[1:] if typing.get_origin(hint) is Annotated else ()
    if typing.get_origin(_bare(hint)) is list:
        non_empty = "non-empty " if any(getattr(m, "min_length", 0) for m in meta) else ""
        return f"a {non_empty}list of {_allowed(typing.get_args(_bare(hint))[0])}"
    bounds = {}  # e.g. {"ge": 0, "le": 1}
    for m in meta:
        bounds.update({op: getattr(m, op) for op in _OPS if getattr(m, op, None) is not None})
    lower = [(op, bounds[op]) for op in ("gt", "ge") if op in bounds]
    upper = [(op, bounds[op]) for op in ("lt", "le") if op in bounds]
    if lower and upper:  # e.g. 0 <= value <= 1
        (low_op, low), (high_op, high) = lower[0], upper[0]
        return f"{low:g} {_OPS[low_op.replace('g', 'l')]} value {_OPS[high_op]} {high:g}"
    if lower or upper:  # e.g. >= 1
        ((op, bound),) = lower or upper
        return f"{_OPS[op]} {bound:g}"
    return _NAMES.get(_bare(hint), getattr(_bare(hint), "__name__", str(hint)))


_NAMES = {int: "integers", float: "numbers", str: "names", bool: "true or false"}
_OPS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
