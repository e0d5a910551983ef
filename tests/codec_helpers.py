"""
Shared by the MGP/1 codec tests: the conformance vectors and hypothesis strategies.

Two vectors files have the same JSON shape and get the same conformance
tests (:data:`VECTOR_FILES`): the independent reference
(``docs/spec/vectors.json``), the primary one, and m2mgw's own
(``docs/test-vectors/mgp1-m2mgw.json``, written by :mod:`m2mgw.testvectors`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key
from hypothesis import strategies as st

from m2mgw.crypto.rsa import mgf1
from m2mgw.protocol import bodies, cbor, messages

_REPO = Path(__file__).resolve().parents[1]
_CANDIDATES = [
    Path(os.environ.get("MGP1_VECTORS", "/nonexistent")),
    _REPO / "docs" / "spec" / "vectors.json",
    _REPO.parent / "shared" / "spec" / "vectors.json",
]


def _load_vectors() -> dict[str, Any]:
    for path in _CANDIDATES:
        if path.is_file():
            return dict(json.loads(path.read_text()))
    raise FileNotFoundError(f"MGP/1 vectors.json not found in {[str(p) for p in _CANDIDATES]}")


#: m2mgw's own vectors, written by ``python -m m2mgw.testvectors``.
M2MGW_VECTORS_PATH = _REPO / "docs" / "test-vectors" / "mgp1-m2mgw.json"

#: The reference vectors of the independent implementation: the primary ones.
VECTORS = _load_vectors()
#: Every vectors file the conformance tests run over, by name, the reference first.
VECTOR_FILES: dict[str, dict[str, Any]] = {
    "reference": VECTORS,
    "m2mgw": dict(json.loads(M2MGW_VECTORS_PATH.read_text(encoding="utf-8"))),
}
FILES = list(VECTOR_FILES)


def suite_names(file: str = "reference") -> list[str]:
    """The suites of one vectors file, in the file's order."""
    return [name for name in VECTOR_FILES[file] if not name.startswith("_")]


SUITE_NAMES = suite_names()


def file_suites() -> list[Any]:
    """``(file, suite)`` for every suite of every vectors file, as pytest params."""
    return [
        pytest.param(file, suite, id=f"{file}-{suite}")
        for file in FILES
        for suite in suite_names(file)
    ]


#: What each file calls its RSA-PSS salt draws, by use: ``auth`` (a HELLO's SIG,
#: module_random), ``reply`` (a HELLO_REPLY's signature, gateway_random),
#: ``skey`` (the skey signature, gateway_random of the skey step), ``pop`` (the
#: keyreg step's proof of possession), ``hello_pop`` and ``hello_proof`` (the
#: KeyReg of hello_keyreg).  The reference lists its rsa/hello_keyreg pop salt
#: as ``pss_salt_2`` and not the proof's (``None``: recover it from the
#: signature); m2mgw names each salt after its use and lists them all.
PSS_SALTS: dict[str, dict[str, str | None]] = {
    "reference": {
        "auth": "pss_salt",
        "reply": "pss_salt",
        "skey": "pss_salt",
        "pop": "pss_salt",
        "hello_pop": "pss_salt_2",
        "hello_proof": None,
    },
    "m2mgw": {
        "auth": "pss_salt_auth",
        "reply": "pss_salt_reply",
        "skey": "pss_salt_skey",
        "pop": "pss_salt_pop",
        "hello_pop": "pss_salt_pop",
        "hello_proof": "pss_salt_proof",
    },
}


def pss_salt(file: str, use: str) -> str:
    """The draw name of the RSA-PSS salt for ``use`` in ``file`` (see :data:`PSS_SALTS`)."""
    name = PSS_SALTS[file][use]
    assert name is not None, f"{file} does not list the salt of {use}"
    return name


def h(value: str) -> bytes:
    """Bytes from the vectors' lowercase hex."""
    return bytes.fromhex(value)


def pss_salt_of(public_der: bytes, signature: bytes) -> bytes:
    """The salt of an RSA-PSS (SHA-256, 32-byte salt) signature, recovered with the public key."""
    public = load_der_public_key(public_der)
    assert isinstance(public, rsa.RSAPublicKey)
    numbers = public.public_numbers()
    em_bits = numbers.n.bit_length() - 1
    em_len = (em_bits + 7) // 8
    em = pow(int.from_bytes(signature, "big"), numbers.e, numbers.n).to_bytes(em_len, "big")
    masked_db, digest = em[:-33], em[-33:-1]
    db = bytearray(a ^ b for a, b in zip(masked_db, mgf1(digest, len(masked_db)), strict=True))
    db[0] &= 0xFF >> (8 * em_len - em_bits)
    return bytes(db[-32:])


def vector_nodes(kind: str, file: str = "reference") -> list[tuple[str, dict[str, Any]]]:
    """
    Every vector step of one file holding ``kind`` fields, as ``(id, step)``.

    :param kind: ``"hello"`` (steps with a HELLO and its reply), ``"data"``
        (steps with a DATA and its reply), ``"keyreg"`` (steps with keyreg
        fields) or ``"skey"``.
    :param file: a name of :data:`VECTOR_FILES`.
    """
    found: list[tuple[str, dict[str, Any]]] = []

    marker = {"hello": "epk", "data": "ctr", "keyreg": "pop", "skey": "instruction"}[kind]

    def walk(path: str, node: dict[str, Any]) -> None:
        if marker in node:
            found.append((path, node))
        for name, child in node.items():
            if isinstance(child, dict) and not name.endswith("_random"):
                walk(f"{path}/{name}", child)

    for suite in suite_names(file):
        walk(suite, VECTOR_FILES[file][suite])
    return found


def vector_fields(*names: str, file: str = "reference") -> list[bytes]:
    """Every value of the named hex fields of one file, across all suites and steps."""
    values: list[bytes] = []

    def walk(node: dict[str, Any]) -> None:
        for name, child in node.items():
            if isinstance(child, dict):
                walk(child)
            elif name in names and isinstance(child, str):
                values.append(h(child))

    for suite in suite_names(file):
        walk(VECTOR_FILES[file][suite])
    return values


# --- strategies ----------------------------------------------------------------

uints = st.integers(min_value=0, max_value=messages.MAX_UINT)


def utf8_text(max_bytes: int, min_bytes: int = 0) -> st.SearchStrategy[str]:
    """Text whose UTF-8 encoding is ``min_bytes``-``max_bytes`` long."""
    return st.text(max_size=max_bytes).filter(
        lambda text: (
            min_bytes <= len(text.encode("utf-8", "surrogatepass")) <= max_bytes
            and text.isprintable()
        )
    )


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.binary(max_size=24),
    st.text(max_size=12),
)

#: Any CBOR value the codec round-trips with ``==``: no NaN, bignum tags
#: decode to ``int``, and tags hold scalars only (``cbor2`` decodes a tag's
#: array or map content as a tuple or frozendict, equal in CBOR but not in
#: Python; the byte-level tests cover those).
cbor_values: st.SearchStrategy[Any] = st.recursive(
    st.one_of(
        _scalars,
        st.builds(
            cbor.Tag,
            st.integers(min_value=0, max_value=2**32).filter(lambda tag: tag not in (2, 3)),
            _scalars,
        ),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(st.integers(-100, 100), st.text(max_size=6)), children, max_size=4
        ),
    ),
    max_leaves=8,
)

sids = st.binary(min_size=messages.MIN_SID, max_size=messages.MAX_SID)
hints = st.one_of(st.binary(max_size=messages.MAX_HINT), utf8_text(messages.MAX_HINT))

hellos = st.builds(
    messages.Hello,
    hints,
    utf8_text(messages.MAX_SUITE_NAME),
    uints,
    st.binary(max_size=messages.MAX_EPK),
    st.binary(max_size=600),
)
hello_replies = st.builds(messages.HelloReply, sids, st.binary(max_size=1200))
datas = st.builds(messages.Data, sids, st.integers(1, messages.MAX_UINT), st.binary(max_size=1200))
data_replies = st.builds(
    messages.DataReply, sids, st.integers(1, messages.MAX_UINT), st.binary(max_size=1200)
)
envelopes = st.one_of(hellos, hello_replies, datas, data_replies)

conf_entries = st.builds(
    bodies.ConfEntry,
    uints,
    st.integers(0, 2),
    uints,
    st.one_of(st.just(bodies.MISSING), cbor_values),
)
keyregs = st.builds(
    bodies.KeyReg,
    kid=uints,
    pub=st.binary(max_size=100),
    suite=utf8_text(messages.MAX_SUITE_NAME),
    pid=uints,
    proof=st.binary(max_size=100),
    pop=st.binary(max_size=100),
)
notes = st.builds(
    bodies.Note, st.integers(0, 7), st.text(max_size=10), st.one_of(st.none(), st.text(max_size=10))
)
payloads = st.builds(
    bodies.Payload,
    data=st.one_of(st.just(bodies.MISSING), cbor_values),
    conf=st.lists(conf_entries, max_size=3).map(tuple),
    keyreg=st.one_of(st.none(), keyregs),
    note=st.one_of(st.none(), notes),
    req=st.lists(st.text(max_size=8), max_size=3).map(tuple),
)
hello_bodies = st.builds(
    bodies.HelloBody,
    id=utf8_text(bodies.MAX_ID, 1),
    kid=uints,
    ts=uints,
    tok=st.binary(min_size=8, max_size=32),
    pl=st.one_of(st.none(), payloads),
)
data_bodies = st.builds(
    bodies.DataBody,
    ts=st.one_of(st.none(), uints),
    tok=st.binary(min_size=4, max_size=32),
    pl=st.one_of(st.none(), payloads),
)


@st.composite
def instruction_lists(
    draw: st.DrawFn, max_size: int = 4, max_body: int = 60, structured: bool = True
) -> tuple[bodies.InstructionItem, ...]:
    """Instructions with ascending ``iid`` s; ``structured`` False gives bstr bodies only."""
    count = draw(st.integers(0, max_size))
    iid = draw(st.integers(0, 2**40))
    items = []
    body_values = st.binary(max_size=max_body)
    if structured:
        body_values = st.one_of(cbor_values, body_values)
    for _ in range(count):
        iid += draw(st.integers(1, 2**20))
        body = draw(body_values)
        items.append(
            bodies.InstructionItem(
                iid, draw(st.text(max_size=8)), body, draw(st.one_of(st.none(), uints))
            )
        )
    return tuple(items)


keyreg_results = st.builds(
    bodies.KeyRegResult, uints, st.integers(0, 5), st.one_of(st.none(), st.text(max_size=12))
)


@st.composite
def reply_bodies(draw: st.DrawFn, hello: bool | None = None, max_ins: int = 4) -> bodies.ReplyBody:
    """ReplyBody values; ``hello`` True gives the HELLO_REPLY fields."""
    if hello is None:
        hello = draw(st.booleans())
    res: dict[int, Any] = {}
    if draw(st.booleans()):
        res[12] = draw(keyreg_results).to_cbor()
    return bodies.ReplyBody(
        ack=draw(st.binary(min_size=4, max_size=32)),
        stok=draw(st.binary(min_size=16, max_size=16)) if hello else None,
        exp=draw(uints) if hello else None,
        time=draw(uints) if hello else draw(st.one_of(st.none(), uints)),
        ins=draw(instruction_lists(max_ins)),
        more=draw(st.booleans()),
        alias=draw(st.one_of(st.none(), st.binary(min_size=8, max_size=16))),
        err=tuple(
            draw(
                st.lists(
                    st.builds(bodies.ErrorEntry, st.integers(1, 4), st.text(max_size=20)),
                    max_size=2,
                )
            )
        ),
        res=res,
    )
