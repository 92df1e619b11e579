"""Device state as data: each device's state is a dataclass that is also its snapshot format.

:func:`to_json` turns such a dataclass into JSON-ready values (bytes as base64) and
:func:`from_json` turns them back, checking every value against the field's declared type
(``int``, ``bool``, ``str``, ``bytes``, ``X | None``, ``list[X]`` and nested state
dataclasses). A snapshot is untrusted input: a wrong type, a missing or unknown field
raises :class:`~kvmm.errors.SnapshotError` naming the field. Range checks belong to the
device that loads the state (:func:`check_range`), through the same paths as guest writes.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import types
import typing
from typing import Any, TypeVar

from .errors import SnapshotError

T = TypeVar("T")


def to_json(state: Any) -> Any:
    """A state dataclass (or a value inside one) as JSON-ready data."""
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return {f.name: to_json(getattr(state, f.name)) for f in dataclasses.fields(state)}
    if isinstance(state, (bytes, bytearray)):
        return base64.b64encode(state).decode("ascii")
    if isinstance(state, (list, tuple)):
        return [to_json(v) for v in state]
    return state


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def prepare(cls: type) -> None:
    """Resolve the type hints of ``cls`` and every state dataclass inside it now (string
    annotations cost an ``eval`` each), so that decoding a snapshot later does not."""
    for tp in _hints(cls).values():
        for inner in (tp, *typing.get_args(tp)):
            if dataclasses.is_dataclass(inner) and isinstance(inner, type):
                prepare(inner)


def from_json(cls: type[T], data: Any, where: str = "") -> T:
    """``data`` (as :func:`to_json` made it) as a ``cls``, every field type-checked."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise SnapshotError(f"{where}: expected an object, found {type(data).__name__}")
    hints = _hints(cls)  # type: ignore[arg-type]
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - names
    if unknown:
        raise SnapshotError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    values = {}
    for name in names:
        if name not in data:
            raise SnapshotError(f"{where}: missing field {name!r}")
        values[name] = _convert(hints[name], data[name], f"{where}.{name}")
    return cls(**values)


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise SnapshotError(f"{where}: expected a list, found {type(value).__name__}")
        return [_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_json(tp, value, where)  # type: ignore[arg-type]
    if tp is bool:
        if not isinstance(value, bool):
            raise SnapshotError(f"{where}: expected true or false, found {value!r:.40}")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise SnapshotError(f"{where}: expected an integer, found {value!r:.40}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise SnapshotError(f"{where}: expected a string, found {value!r:.40}")
        return value
    if tp is bytes:
        if not isinstance(value, str):
            raise SnapshotError(f"{where}: expected base64 data, found {type(value).__name__}")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise SnapshotError(f"{where}: not valid base64") from None
    if tp is Any:
        return value
    raise TypeError(f"state field type {tp!r} is not supported")  # a kvmm bug, not bad input


def check_range(where: str, value: int, low: int, high: int) -> int:
    """``value`` if ``low <= value <= high``, else SnapshotError naming ``where``."""
    if not low <= value <= high:
        raise SnapshotError(f"{where}: {value} is outside [{low}, {high}]")
    return value


def check_length(where: str, data: bytes | list[Any], length: int) -> None:
    if len(data) != length:
        raise SnapshotError(f"{where}: {len(data)} entries, expected {length}")
