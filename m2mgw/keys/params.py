"""
Parameter sets: the named "sets of cryptographic parameters" of MGP/1 §9.

A :class:`ParameterSet` is a Params map without its per-request values (the
server ``seed`` and the ``kid`` the new key must take): suite, named curve or
custom curve, RSA modulus size, key time-to-live and hash, under a ``pid``.
The operator names them in ``[params.NAME]`` sections; every configured suite
without one gets a built-in set named after the suite (``pid``
:data:`BUILTIN_PID`), so ``(suite, pid)`` always names one set.  A ``keygen``
instruction's body is the set's Params with a fresh 32-byte seed and the
``kid``; the store keeps nothing else, since the instruction body *is* the
record of what was asked.

Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key

from m2mgw.interfaces import ICipherSuite, RandomSource
from m2mgw.protocol import cbor
from m2mgw.protocol.bodies import KIND_KEYGEN, Params, instruction_wire_size
from m2mgw.records import NewInstruction

__all__ = [
    "BUILTIN_PID",
    "BUILTIN_RSA_BITS",
    "SEED_BYTES",
    "ParameterSet",
    "builtin_set",
    "complete_sets",
    "default_set",
    "find_set",
    "keygen_instruction",
    "rsa_modulus_bits",
]

#: The ``pid`` of the built-in set of a suite (unique with the suite: a suite
#: has its built-in set only when no set of that suite is configured).
BUILTIN_PID = 1
#: The modulus size of the built-in ``rsa`` set (the largest that fits a HELLO's KeyReg).
BUILTIN_RSA_BITS = 2048
#: Server randomness in every ``keygen`` (MGP/1 §9 allows 16-32 bytes).
SEED_BYTES = 32
#: A placeholder seed for validating a set (its size is what is checked).
_CHECK_SEED = bytes(SEED_BYTES)


@dataclass(frozen=True)
class ParameterSet:
    """
    A named parameter set (MGP/1 §9 Params without ``seed`` and ``kid``).

    :ivar name: its name in the configuration (``[params.NAME]``), or the
        suite's name for a built-in set.
    :ivar pid: the Params ``pid`` (``9``).
    :ivar ttl: the lifetime of keys made from it, in seconds.
    :ivar curve: the named curve, or ``None``.
    :ivar eq: a custom curve ``(p, a, b, gx, gy, n, h)``, or ``None``.
    :ivar rsa_bits: the RSA modulus size, or ``None``.
    :ivar hash: ``"SHA-256"``, ``"SHA-384"`` or ``None``.
    """

    name: str
    pid: int
    suite: str
    ttl: int
    curve: str | None = None
    eq: tuple[int, ...] | None = None
    rsa_bits: int | None = None
    hash: str | None = None

    def params(self, kid: int, seed: bytes) -> Params:
        """
        The Params a ``keygen`` for key ``kid`` carries.

        :raise ValueError: a value out of MGP/1's ranges.
        """
        return Params(
            suite=self.suite,
            ttl=self.ttl,
            seed=seed,
            kid=kid,
            pid=self.pid,
            curve=self.curve,
            eq=self.eq,
            rsa_bits=self.rsa_bits,
            hash=self.hash,
        )

    def check(self, suite: ICipherSuite) -> None:
        """
        Validate the set against its suite (:meth:`ICipherSuite.check_params`:
        curve, custom curve, RSA size, hash).

        :raise m2mgw.errors.BadParameters: with a reason a person can read.
        """
        suite.check_params(self.params(1, _CHECK_SEED).to_cbor())


def builtin_set(suite: ICipherSuite, ttl: int) -> ParameterSet:
    """The built-in set of ``suite``: its own curve and hash, RSA-2048 for ``rsa``."""
    return ParameterSet(
        name=suite.name,
        pid=BUILTIN_PID,
        suite=suite.name,
        ttl=ttl,
        curve=suite.curve,
        rsa_bits=BUILTIN_RSA_BITS if suite.curve is None else None,
        hash=suite.hash_name,
    )


def complete_sets(
    configured: Mapping[str, ParameterSet], suites: Mapping[str, ICipherSuite], ttl: int
) -> dict[str, ParameterSet]:
    """
    The configured sets plus the built-in set of every suite that has none.

    :param ttl: the built-in sets' key lifetime (``[protocol] key_ttl``).
    """
    sets = dict(configured)
    covered = {param_set.suite for param_set in configured.values()}
    for name, suite in suites.items():
        if name not in covered and name not in sets:
            sets[name] = builtin_set(suite, ttl)
    return sets


def default_set(sets: Mapping[str, ParameterSet], suite: str) -> ParameterSet | None:
    """The set a ``keygen`` for a key of ``suite`` uses by default: its lowest ``pid``."""
    candidates = [param_set for param_set in sets.values() if param_set.suite == suite]
    return min(candidates, key=lambda param_set: param_set.pid, default=None)


def find_set(sets: Mapping[str, ParameterSet], text: str) -> ParameterSet:
    """
    A set by name, or by ``pid`` when ``text`` is a number naming exactly one.

    :raise KeyError: no such set (the message lists the known names).
    """
    found = sets.get(text)
    if found is not None:
        return found
    if text.isascii() and text.isdigit():
        matches = [param_set for param_set in sets.values() if param_set.pid == int(text)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            names = ", ".join(sorted(param_set.name for param_set in matches))
            raise KeyError(f"pid {text} names several parameter sets ({names}): give a name")
    known = ", ".join(sorted(sets)) or "none"
    raise KeyError(f"no parameter set {text!r} (known: {known})")


def keygen_instruction(
    module_id: str,
    param_set: ParameterSet,
    kid: int,
    random: RandomSource,
    source: str,
) -> NewInstruction:
    """
    A ``keygen`` instruction for key ``kid`` of ``module_id``, with a fresh
    :data:`SEED_BYTES`-byte seed drawn from ``random``.
    """
    body = param_set.params(kid, random(SEED_BYTES)).to_cbor()
    return NewInstruction(
        module_id=module_id,
        kind=KIND_KEYGEN,
        body=cbor.encode(body),
        wire_size=instruction_wire_size(KIND_KEYGEN, body),
        source=source,
    )


def rsa_modulus_bits(public: bytes) -> int | None:
    """The modulus size of an RSA SubjectPublicKeyInfo, or ``None`` if it is not one."""
    try:
        key = load_der_public_key(public)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    return key.key_size if isinstance(key, rsa.RSAPublicKey) else None
