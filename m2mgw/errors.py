"""
The project's exceptions.

Third-party exceptions (``cryptography``, ``sqlite3``, ``cbor2``) are translated
into these at the module boundary that calls the library, so callers only ever
catch ``m2mgw.errors`` types.
"""


class M2MGWError(Exception):
    """Base class of every m2mgw exception."""


class ConfigError(M2MGWError):
    """
    The configuration is unusable.  The message is one line a person can act
    on; :mod:`m2mgw.tap` turns it into a ``UsageError``.
    """


class UnknownPlugin(ConfigError):
    """A configured name (suite, store, source) matches no installed plugin."""


# --- crypto -----------------------------------------------------------------


class CryptoError(M2MGWError):
    """A cryptographic operation failed on the given input."""


class BadKey(CryptoError):
    """A key could not be parsed, or is not acceptable (size, curve, exponent)."""


class BadPoint(BadKey):
    """An elliptic-curve point is malformed, hybrid, not on the curve, or degenerate."""


class BadSignature(CryptoError):
    """A signature or MAC does not verify."""


class BadTag(CryptoError):
    """AEAD decryption failed: the ciphertext or its associated data was altered."""


class UnsupportedOperation(CryptoError):
    """The suite does not offer this operation (for example SDH on ``x25519``)."""


class BadParameters(CryptoError):
    """A parameter set (curve equation, sizes, hash) failed validation."""


# --- wire format ------------------------------------------------------------


class DecodeError(M2MGWError):
    """Bytes are not a well-formed, deterministically encoded message of the right shape."""


# --- store ------------------------------------------------------------------


class StoreError(M2MGWError):
    """The store could not complete an operation."""


class DuplicateModule(StoreError):
    """A module with this identity already exists."""


class UnknownModule(StoreError):
    """No module has this identity."""


class KeyConflict(StoreError):
    """The module already has a key with this ``kid``."""


class UnknownKey(StoreError):
    """The module has no key with this ``kid``."""


class UnknownInstruction(StoreError):
    """The module has no instruction with this ``iid``."""


class InvalidTransition(StoreError):
    """The requested state change is not allowed from the record's current state."""


class ImportFailed(StoreError):
    """
    A bulk import was refused as a whole.

    :ivar line: the 1-based line number of the first bad row, if known.
    """

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line
