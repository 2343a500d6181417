"""Typed messages <-> msgpack bodies.

A message is a frozen dataclass registered with a type code by ``@message(code)``.
Its body is a msgpack array of its fields in declaration order; nested records
(``@record``) are arrays too. Field types allowed: ``int``, ``float``, ``str``,
``bytes``, ``bool``, a record, ``list[T]`` and ``T | None`` of those.

``decode_body`` checks every field's type and each record's own invariants
(``__post_init__``); anything off raises ``ProtocolError(BAD_BODY)``, an unknown
type code ``ProtocolError(BAD_TYPE)``. It never raises anything else.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack

from .framing import ErrorCode, ProtocolError

__all__ = ["MESSAGES", "decode_body", "encode_body", "message", "record", "type_code"]

T = TypeVar("T")

MESSAGES: dict[int, type] = {}
_CODES: dict[type, int] = {}
_RECORDS: set[type] = set()
# Per class: list of (field name, encoder, decoder)
_PLANS: dict[type, list[tuple[str, Callable[[Any], Any], Callable[[Any], Any]]]] = {}

_MAX_LIST = 1_000_000


def _fail(detail: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_BODY, detail)


def _scalar(kind: type) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    def dec(v: Any) -> Any:
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            return float(v)
        if type(v) is not kind:
            raise _fail(f"expected {kind.__name__}, got {type(v).__name__}")
        return v

    return (lambda v: v), dec


def _converters(tp: Any) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    if tp in (int, float, str, bytes, bool):
        return _scalar(tp)
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        ienc, idec = _converters(inner)

        def enc_list(v: Any) -> Any:
            return [ienc(x) for x in v]

        def dec_list(v: Any) -> Any:
            if type(v) is not list or len(v) > _MAX_LIST:
                raise _fail("expected a list")
            return [idec(x) for x in v]

        return enc_list, dec_list
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported union {tp}")
        ienc, idec = _converters(args[0])
        return (lambda v: None if v is None else ienc(v)), (
            lambda v: None if v is None else idec(v)
        )
    if tp in _RECORDS:
        return _encode_obj, lambda v: _decode_obj(tp, v)
    raise TypeError(f"unsupported field type {tp!r}")


def _plan(cls: type) -> list[tuple[str, Callable[[Any], Any], Callable[[Any], Any]]]:
    plan = _PLANS.get(cls)
    if plan is None:
        hints = typing.get_type_hints(cls)
        plan = [(f.name, *_converters(hints[f.name])) for f in dataclasses.fields(cls)]
        _PLANS[cls] = plan
    return plan


def _encode_obj(obj: Any) -> list[Any]:
    return [enc(getattr(obj, name)) for name, enc, _ in _plan(type(obj))]


def _decode_obj(cls: type[T], v: Any) -> T:
    plan = _plan(cls)
    if type(v) is not list or len(v) != len(plan):
        raise _fail(f"{cls.__name__}: expected {len(plan)} fields")
    args = [dec(x) for (_, _, dec), x in zip(plan, v, strict=True)]
    try:
        return cls(*args)
    except (ValueError, TypeError, OverflowError) as exc:
        raise _fail(f"{cls.__name__}: {exc}") from exc


def record(cls: type[T]) -> type[T]:
    """Register a nested record type (encoded as an array, like a message)."""
    _RECORDS.add(cls)
    return cls


def message(code: int) -> Callable[[type[T]], type[T]]:
    """Register a message class under a wire type code (1..255)."""

    def deco(cls: type[T]) -> type[T]:
        if not 0 < code < 256 or code in MESSAGES:
            raise ValueError(f"bad or duplicate message code {code}")
        MESSAGES[code] = cls
        _CODES[cls] = code
        return cls

    return deco


def type_code(msg: object) -> int:
    return _CODES[type(msg)]


def encode_body(msg: object) -> bytes:
    return msgpack.packb(_encode_obj(msg), use_bin_type=True)


def decode_body(code: int, body: bytes) -> object:
    cls = MESSAGES.get(code)
    if cls is None:
        raise ProtocolError(ErrorCode.BAD_TYPE, f"unknown type {code}")
    try:
        raw = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise _fail(f"msgpack: {type(exc).__name__}") from None
    return _decode_obj(cls, raw)
