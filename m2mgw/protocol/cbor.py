"""
Deterministic CBOR (RFC 8949 §4.2.1, "core deterministic encoding").

MGP/1 requires every message and plaintext to be encoded deterministically:
shortest integer, float and length forms, definite lengths, and map keys
sorted by the bytewise lexicographic order of their encodings (not cbor2's
length-first ``canonical`` order).  :func:`encode` produces exactly that;
:func:`decode` accepts only input that :func:`encode` would produce for the
decoded value, so a non-deterministic or trailing-garbage input is refused.

Decoding uses ``cbor2`` and translates its exceptions to
:class:`m2mgw.errors.DecodeError`.
"""

from __future__ import annotations

import io
import itertools
import math
import operator
import struct
from collections.abc import Mapping
from typing import Any

import cbor2

from m2mgw.errors import DecodeError

__all__ = [
    "DECLINED",
    "Tag",
    "decode",
    "decode_canonical",
    "encode",
    "encode_bytes",
    "encode_text",
    "head",
]

Tag = cbor2.CBORTag

#: Deepest nesting :func:`decode` accepts (MGP/1 structures need fewer than 8).
MAX_DEPTH = 16


#: The one-byte heads of every major type for the values 0-23, by ``major * 24 + value``.
_SMALL_HEADS: tuple[bytes, ...] = tuple(
    bytes(((major << 5) | value,)) for major in range(8) for value in range(24)
)


def _head(major: int, value: int) -> bytes:
    if 0 <= value < 24:
        return _SMALL_HEADS[major * 24 + value]
    mt = major << 5
    if value < 0x100:
        return bytes((mt | 24, value))
    if value < 0x10000:
        return bytes((mt | 25,)) + value.to_bytes(2, "big")
    if value < 0x100000000:
        return bytes((mt | 26,)) + value.to_bytes(4, "big")
    if value < 0x10000000000000000:
        return bytes((mt | 27,)) + value.to_bytes(8, "big")
    raise ValueError("integer too large for a CBOR head")


def head(major: int, value: int) -> bytes:
    """
    The shortest head of major type ``major`` with argument ``value`` (the
    length of a string or array, or an unsigned integer's value).

    :raise ValueError: ``value`` over 64 bits.
    """
    return _head(major, value)


def encode_bytes(value: bytes) -> bytes:
    """``encode(value)`` for a ``bytes`` value: its head and the bytes."""
    return _head(2, len(value)) + value


def encode_text(value: str) -> bytes:
    """``encode(value)`` for a ``str`` value: its head and its UTF-8 bytes."""
    data = value.encode("utf-8")
    return _head(3, len(data)) + data


def _float(value: float) -> bytes:
    if math.isnan(value):
        return b"\xf9\x7e\x00"
    for code, fmt in ((0xF9, ">e"), (0xFA, ">f")):
        try:
            packed = struct.pack(fmt, value)
        except OverflowError:
            continue
        if struct.unpack(fmt, packed)[0] == value:
            return bytes((code,)) + packed
    return b"\xfb" + struct.pack(">d", value)


_first = operator.itemgetter(0)


def _map_key(key: Any) -> bytes:
    """The encoding of a map key (the small unsigned integers MGP/1 uses, at once)."""
    if type(key) is int and 0 <= key < 24:
        return _SMALL_HEADS[key]
    return encode(key)


def _encode(value: Any, out: list[bytes]) -> None:
    # The exact built-in types come first, most frequent first; bool, None,
    # subclasses (IntEnum, ...) and everything else take the general path below.
    kind = type(value)
    if kind is int:
        if 0 <= value < 24:
            out.append(_SMALL_HEADS[value])
            return
        if 0 <= value < 1 << 64:
            out.append(_head(0, value))
            return
    elif kind is bytes:
        out.append(_head(2, len(value)))
        out.append(value)
        return
    elif kind is str:
        raw = value.encode("utf-8")
        out.append(_head(3, len(raw)))
        out.append(raw)
        return
    elif kind is list or kind is tuple:
        out.append(_head(4, len(value)))
        for item in value:
            _encode(item, out)
        return
    elif kind is dict:
        _encode_map(value, out)
        return
    _encode_other(value, out)


def _encode_map(value: Mapping[Any, Any], out: list[bytes]) -> None:
    items = [(_map_key(k), v) for k, v in value.items()]
    if len(items) > 1:
        items.sort(key=_first)
        for (a, _), (b, _) in itertools.pairwise(items):
            if a == b:
                raise ValueError("duplicate map key")
    out.append(_head(5, len(items)))
    for key, item in items:
        out.append(key)
        _encode(item, out)


def _encode_other(value: Any, out: list[bytes]) -> None:
    if value is False:
        out.append(b"\xf4")
    elif value is True:
        out.append(b"\xf5")
    elif value is None:
        out.append(b"\xf6")
    elif isinstance(value, int):
        if value >= 0:
            if value >= 1 << 64:
                big = value.to_bytes((value.bit_length() + 7) // 8, "big")
                out.append(b"\xc2")
                out.append(_head(2, len(big)) + big)
            else:
                out.append(_head(0, value))
        else:
            n = -1 - value
            if n >= 1 << 64:
                big = n.to_bytes((n.bit_length() + 7) // 8, "big")
                out.append(b"\xc3")
                out.append(_head(2, len(big)) + big)
            else:
                out.append(_head(1, n))
    elif isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        out.append(_head(2, len(raw)))
        out.append(raw)
    elif isinstance(value, str):
        raw = value.encode("utf-8")
        out.append(_head(3, len(raw)))
        out.append(raw)
    elif isinstance(value, float):
        out.append(_float(value))
    elif isinstance(value, (list, tuple)):
        out.append(_head(4, len(value)))
        for item in value:
            _encode(item, out)
    elif isinstance(value, Mapping):
        _encode_map(value, out)
    elif isinstance(value, cbor2.CBORTag):
        out.append(_head(6, value.tag))
        _encode(value.value, out)
    elif isinstance(value, cbor2.CBORSimpleValue):
        number = value.value
        out.append(bytes((0xE0 | number,)) if number < 24 else bytes((0xF8, number)))
    elif value is cbor2.undefined:
        out.append(b"\xf7")
    else:
        raise TypeError(f"cannot encode {type(value).__name__} as CBOR")


def encode(value: Any) -> bytes:
    """
    Encode ``value`` deterministically.

    Accepts ``None``, ``bool``, ``int``, ``float``, ``bytes``, ``str``,
    lists/tuples, mappings, :class:`Tag` and ``cbor2`` simple values.

    :raise TypeError: an unsupported type.
    :raise ValueError: a mapping has two keys with the same encoding.
    """
    out: list[bytes] = []
    _encode(value, out)
    return b"".join(out)


#: What :func:`_depth` descends into.
_CONTAINERS = (list, tuple, dict, cbor2.CBORTag)


def _depth(value: Any, limit: int) -> None:
    """
    :raise m2mgw.errors.DecodeError: ``value`` (depth 1) holds an item,
        key or tagged value deeper than ``limit``.
    """
    if limit < 1:
        raise DecodeError("CBOR nesting too deep")
    _depth_below(value, 1, limit)


def _depth_below(item: Any, depth: int, limit: int) -> None:
    """Check the items inside ``item``, which is at ``depth`` (within ``limit``)."""
    children: Any
    if isinstance(item, (list, tuple)):
        children = item
    elif isinstance(item, dict):
        children = itertools.chain(item.values(), item)
    elif isinstance(item, cbor2.CBORTag):
        children = (item.value,)
    else:
        return
    inner = depth + 1
    for child in children:
        if inner > limit:
            raise DecodeError("CBOR nesting too deep")
        if isinstance(child, _CONTAINERS):
            _depth_below(child, inner, limit)


def _opaque_tag(number: int) -> Any:
    def keep(value: Any, immutable: bool) -> Any:
        return cbor2.CBORTag(number, value)

    return keep


#: The tags ``cbor2`` would turn into Python objects (dates, decimals, sets,
#: shared references, ...).  MGP/1 passes every tag in ``data`` on unchanged
#: (§2), and those objects would not re-encode, so they stay :class:`Tag`.
#: Bignums (tags 2 and 3) keep decoding to ``int``: the determinism check
#: then refuses a bignum that fits a plain integer (RFC 8949 §3.4.3).
_OPAQUE_TAGS: tuple[int, ...] = (0, 1, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256)
_OPAQUE_TAGS += (258, 260, 261, 1004, 43000, 55799)


def _decoder_options() -> dict[str, Any]:
    keep = {number: _opaque_tag(number) for number in _OPAQUE_TAGS}
    try:
        cbor2.CBORDecoder(io.BytesIO(b""), semantic_decoders=keep)
    except TypeError:  # cbor2 < 6: tags it knows are decoded and then refused
        return {}
    return {"semantic_decoders": keep}


_DECODER_OPTIONS = _decoder_options()


#: :func:`decode_canonical`'s answer when it leaves ``data`` to the full decoder.
DECLINED: Any = object()


class _Decline(Exception):
    """Internal: the fast decoder leaves this input to the full one."""


def _argument(data: bytes, pos: int, info: int) -> tuple[int, int]:
    """The argument of a head whose additional information is ``info`` >= 24, in shortest form."""
    if info == 24:
        value = data[pos]
        if value < 24:
            raise _Decline
        return value, pos + 1
    if info == 25:
        end, floor = pos + 2, 0x100
    elif info == 26:
        end, floor = pos + 4, 0x10000
    elif info == 27:
        end, floor = pos + 8, 0x100000000
    else:  # 28-30 reserved, 31 indefinite length
        raise _Decline
    if end > len(data):
        raise _Decline
    value = int.from_bytes(data[pos:end], "big")
    if value < floor:
        raise _Decline
    return value, end


#: Simple values the fast decoder reads (false, true, null), by additional information.
_SIMPLE = {20: False, 21: True, 22: None}
#: Half, single and double floats: their sizes and formats, by additional information.
_FLOAT_SIZES = {25: 2, 26: 4, 27: 8}
_FLOAT_FORMATS = {25: ">e", 26: ">f", 27: ">d"}


def _item(data: bytes, pos: int, depth: int) -> tuple[Any, int]:
    """The item at ``pos`` (nested at ``depth``) and the position after it."""
    if depth > MAX_DEPTH:
        raise _Decline
    initial = data[pos]
    major = initial >> 5
    info = initial & 31
    pos += 1
    if major == 7:
        if info in _SIMPLE:
            return _SIMPLE[info], pos
        size = _FLOAT_SIZES.get(info)
        if size is None:
            raise _Decline  # other simple values, break
        end = pos + size
        if end > len(data):
            raise _Decline
        value = struct.unpack(_FLOAT_FORMATS[info], data[pos:end])[0]
        if _float(value) != data[pos - 1 : end]:  # not the shortest exact form
            raise _Decline
        return value, end
    if info < 24:
        arg = info
    else:
        arg, pos = _argument(data, pos, info)
    if major == 0:
        return arg, pos
    if major == 2:
        end = pos + arg
        if end > len(data):
            raise _Decline
        return data[pos:end], end
    if major == 3:
        end = pos + arg
        if end > len(data):
            raise _Decline
        try:
            return data[pos:end].decode("utf-8"), end
        except UnicodeDecodeError:
            raise _Decline from None
    if major == 4:
        items = []
        inner = depth + 1
        for _ in range(arg):
            item, pos = _item(data, pos, inner)
            items.append(item)
        return items, pos
    if major == 5:
        mapping: dict[Any, Any] = {}
        inner = depth + 1
        previous = b""
        for _ in range(arg):
            start = pos
            key, pos = _item(data, pos, inner)
            raw_key = data[start:pos]
            # Keys ascending by their encodings, strictly: sorted and no duplicates.
            if raw_key <= previous or type(key) in (list, dict):
                raise _Decline
            previous = raw_key
            mapping[key], pos = _item(data, pos, inner)
        if len(mapping) != arg:  # keys equal in Python (1 and true): not for this path
            raise _Decline
        return mapping, pos
    if major == 1:
        return -1 - arg, pos
    raise _Decline  # tags


def decode_canonical(data: bytes) -> Any:
    """
    Decode ``data`` quickly if it is one deterministically encoded item made
    of unsigned and negative integers, floats, byte and text strings, arrays,
    maps, ``false``, ``true`` and ``null`` (what MGP/1 messages and SenML
    hold), nested within :data:`MAX_DEPTH`; else return :data:`DECLINED`.

    It checks canonical form while it reads (shortest heads, definite
    lengths, map keys strictly ascending by their encodings), so a value it
    returns is exactly what :func:`decode` returns for ``data``.  Everything
    else -- tags, bignums, other simple values, malformed or non-deterministic
    input -- is declined and left to :func:`decode`, which decides.
    """
    if type(data) is not bytes:
        return DECLINED
    try:
        value, end = _item(data, 0, 1)
    except (_Decline, IndexError, RecursionError):
        return DECLINED
    if end != len(data):
        return DECLINED
    return value


def decode(data: bytes, *, check_deterministic: bool = True) -> Any:
    """
    Decode one CBOR item that spans all of ``data``.

    Arrays decode to ``list``, maps to ``dict`` (unhashable keys are refused),
    tags to :class:`Tag`.

    :raise m2mgw.errors.DecodeError: malformed, trailing bytes, nested deeper
        than :data:`MAX_DEPTH`, or (with ``check_deterministic``) not in
        deterministic encoding.
    """
    if check_deterministic:
        value = decode_canonical(data)
        if value is not DECLINED:
            return value
    stream = io.BytesIO(data)
    try:
        decoder = cbor2.CBORDecoder(stream, str_errors="strict", **_DECODER_OPTIONS)
        value = decoder.decode()
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError, OverflowError) as e:
        raise DecodeError(f"malformed CBOR: {e.__class__.__name__}") from None
    if stream.tell() != len(data):
        raise DecodeError("trailing bytes after the CBOR item")
    _depth(value, MAX_DEPTH)
    if check_deterministic:
        try:
            again = encode(value)
        except (TypeError, ValueError) as e:
            raise DecodeError(f"CBOR not re-encodable: {e}") from None
        if again != data:
            raise DecodeError("CBOR is not deterministically encoded")
    return value
