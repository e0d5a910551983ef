"""
Contract tests of :class:`m2mgw.interfaces.ICipherSuite`, run against every
suite plugin found, plus the checks specific to one family (EC point
validation, X25519 low-order points, RSA key sizes).
"""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from zope.interface.verify import verifyObject

from m2mgw.crypto.randomness import ScriptedRandom, system_random
from m2mgw.errors import (
    BadKey,
    BadParameters,
    BadPoint,
    BadSignature,
    BadTag,
    CryptoError,
    UnsupportedOperation,
)
from m2mgw.interfaces import ICipherSuite
from m2mgw.registry import all_plugins

SUITES = all_plugins(ICipherSuite)
EC_SUITES = {name: suite for name, suite in SUITES.items() if suite.curve in ("P-256", "P-384")}

# Generating RSA keys is slow: one server key and one module key per suite, shared.
_KEYS: dict[str, tuple[Any, Any]] = {}


def _keys(suite: Any) -> tuple[Any, Any]:
    if suite.name not in _KEYS:
        _KEYS[suite.name] = (suite.generate_server_key(), suite.generate_signing_key())
    return _KEYS[suite.name]


def _params(suite: Any, **changes: Any) -> dict[int, Any]:
    params: dict[int, Any] = {1: suite.name, 5: 86400, 6: bytes(16), 7: 2, 9: 1}
    for key, value in changes.items():
        number = int(key.lstrip("k"))
        if value is None:
            params.pop(number, None)
        else:
            params[number] = value
    return params


@pytest.fixture(params=sorted(SUITES), name="suite")
def _suite(request: pytest.FixtureRequest) -> Any:
    return SUITES[request.param]


class TestCipherSuiteContract:
    """Every ICipherSuite plugin."""

    def test_provides_the_interface(self, suite: Any) -> None:
        assert verifyObject(ICipherSuite, suite)
        assert suite.hash_name in ("SHA-256", "SHA-384")
        assert isinstance(suite.supports_sdh, bool)

    def test_seal_open_round_trip(self, suite: Any) -> None:
        key, nonce = bytes(range(suite.key_len)), bytes(suite.nonce_len)
        sealed = suite.seal(key, nonce, b"aad", b"plaintext")
        assert len(sealed) == len(b"plaintext") + suite.tag_len
        assert suite.open(key, nonce, b"aad", sealed) == b"plaintext"
        assert suite.open(key, nonce, b"", suite.seal(key, nonce, b"", b"")) == b""

    def test_open_refuses_tampering(self, suite: Any) -> None:
        key, nonce = bytes(range(suite.key_len)), bytes(suite.nonce_len)
        sealed = suite.seal(key, nonce, b"aad", b"plaintext")
        flipped = bytes([sealed[0] ^ 1]) + sealed[1:]
        with pytest.raises(BadTag):
            suite.open(key, nonce, b"aad", flipped)
        with pytest.raises(BadTag):
            suite.open(key, nonce, b"aaD", sealed)
        with pytest.raises(BadTag):
            suite.open(key, nonce, b"aad", sealed[:-1])
        with pytest.raises(BadTag):
            suite.open(key, nonce, b"aad", sealed[: suite.tag_len - 1])
        other_nonce = (1).to_bytes(suite.nonce_len, "big")
        with pytest.raises(BadTag):
            suite.open(key, other_nonce, b"aad", sealed)

    def test_aead_sizes_are_enforced(self, suite: Any) -> None:
        key, nonce = bytes(suite.key_len), bytes(suite.nonce_len)
        with pytest.raises(CryptoError):
            suite.seal(key + b"\0", nonce, b"", b"x")
        with pytest.raises(CryptoError):
            suite.seal(key, nonce + b"\0", b"", b"x")

    def test_kdf_and_mac_use_the_suite_hash(self, suite: Any) -> None:
        size = 48 if suite.hash_name == "SHA-384" else 32
        prk = suite.hkdf_extract(b"salt", b"ikm")
        assert len(prk) == size
        assert len(suite.hmac(b"key", b"data")) == size
        okm = suite.hkdf_expand(prk, b"info", 2 * suite.key_len)
        assert okm[: suite.key_len] == suite.hkdf_expand(prk, b"info", suite.key_len)
        with pytest.raises(CryptoError):
            suite.hkdf_expand(prk, b"info", 255 * size + 1)

    def test_sign_and_verify(self, suite: Any) -> None:
        server_key, module_key = _keys(suite)
        for key, public in (
            (module_key, suite.signing_public(module_key)),
            (server_key, suite.server_public(server_key)[1] or suite.server_public(server_key)[0]),
        ):
            signature = suite.sign(key, b"message")
            assert len(signature) == suite.signature_len
            suite.verify(public, signature, b"message")
            with pytest.raises(BadSignature):
                suite.verify(public, signature, b"messagE")
            with pytest.raises(BadSignature):
                suite.verify(public, signature[:-1], b"message")
            with pytest.raises(BadSignature):
                suite.verify(public, bytes([signature[0] ^ 1]) + signature[1:], b"message")

    def test_signing_with_a_random_source(self, suite: Any) -> None:
        _, module_key = _keys(suite)
        public = suite.signing_public(module_key)
        random = ScriptedRandom([bytes(32)] if suite.name == "rsa" else [])
        signature = suite.sign(module_key, b"message", random)
        random.check_exhausted()
        suite.verify(public, signature, b"message")

    def test_sign_refuses_a_foreign_key(self, suite: Any) -> None:
        foreign: Any = ed25519.Ed25519PrivateKey.generate()
        if suite.curve == "Ed25519":
            foreign = ec.generate_private_key(ec.SECP256R1())
        with pytest.raises(BadKey):
            suite.sign(foreign, b"message")

    def test_agree_matches_encapsulate(self, suite: Any) -> None:
        server_key, _ = _keys(suite)
        public, _ = suite.server_public(server_key)
        epk, z_es = suite.encapsulate(public, system_random)
        assert len(z_es) in (32, 48)
        assert suite.agree(server_key, epk) == z_es
        epk_2, z_es_2 = suite.encapsulate(public, system_random)
        assert epk_2 != epk
        assert z_es_2 != z_es

    def test_agree_refuses_garbage(self, suite: Any) -> None:
        server_key, _ = _keys(suite)
        for epk in (b"", b"\x04" + bytes(10), bytes(300)):
            with pytest.raises(CryptoError):
                suite.agree(server_key, epk)

    def test_encapsulate_replays_its_draws(self, suite: Any) -> None:
        server_key, _ = _keys(suite)
        public, _ = suite.server_public(server_key)
        draws: list[bytes] = []

        def recording(n: int) -> bytes:
            draws.append(system_random(n))
            return draws[-1]

        first = suite.encapsulate(public, recording)
        replay = ScriptedRandom(draws)
        assert suite.encapsulate(public, replay) == first
        replay.check_exhausted()
        assert suite.agree(server_key, first[0]) == first[1]

    def test_static_agreement(self, suite: Any) -> None:
        server_key, module_key = _keys(suite)
        server_public, _ = suite.server_public(server_key)
        module_public = suite.signing_public(module_key)
        if not suite.supports_sdh:
            with pytest.raises(UnsupportedOperation):
                suite.static_agree(module_key, server_public)
            with pytest.raises(UnsupportedOperation):
                suite.static_agree(server_key, module_public)
            return
        z_ss = suite.static_agree(module_key, server_public)
        assert suite.static_agree(server_key, module_public) == z_ss

    def test_server_key_round_trip(self, suite: Any) -> None:
        server_key, _ = _keys(suite)
        dumped = suite.dump_server_key(server_key)
        assert dumped.startswith(b"-----BEGIN PRIVATE KEY-----")
        loaded = suite.load_server_key(dumped)
        assert suite.server_public(loaded) == suite.server_public(server_key)
        public, _ = suite.server_public(server_key)
        epk, z_es = suite.encapsulate(public, system_random)
        assert suite.agree(loaded, epk) == z_es

    def test_load_server_key_refuses_other_keys(self, suite: Any) -> None:
        with pytest.raises(BadKey):
            suite.load_server_key(b"not a key")
        with pytest.raises(BadKey):
            suite.load_server_key(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
        for other in SUITES.values():
            if other.name != suite.name and other.curve != suite.curve:
                with pytest.raises(BadKey):
                    suite.load_server_key(other.dump_server_key(_keys(other)[0]))
                break

    def test_signing_key_round_trip(self, suite: Any) -> None:
        _, module_key = _keys(suite)
        dumped = suite.dump_signing_key(module_key)
        loaded = suite.load_signing_key(dumped)
        assert suite.signing_public(loaded) == suite.signing_public(module_key)
        pem = module_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        assert suite.signing_public(suite.load_signing_key(pem)) == suite.signing_public(module_key)
        suite.validate_public_key(suite.signing_public(module_key))
        with pytest.raises(BadKey):
            suite.load_signing_key(b"\x30\x03\x02\x01\x00")

    def test_validate_public_key_refuses_garbage(self, suite: Any) -> None:
        for data in (b"", b"\x04", bytes(31), bytes(500)):
            with pytest.raises(BadKey):
                suite.validate_public_key(data)

    def test_check_params_accepts_a_valid_set(self, suite: Any) -> None:
        suite.check_params(_params(suite))
        optional = _params(suite, k8=suite.hash_name, k99="unknown keys are ignored")
        if suite.curve is not None:
            optional[2] = suite.curve
        if suite.name == "rsa":
            optional[4] = 3072
        suite.check_params(optional)

    @pytest.mark.parametrize(
        ("changes", "reason"),
        [
            ({"k1": "another-suite"}, "suite"),
            ({"k5": None}, "ttl"),
            ({"k5": -1}, "ttl"),
            ({"k5": True}, "ttl"),
            ({"k6": bytes(15)}, "seed"),
            ({"k6": bytes(33)}, "seed"),
            ({"k6": "not bytes"}, "seed"),
            ({"k7": 0}, "kid"),
            ({"k9": None}, "pid"),
            ({"k2": "secp256k1"}, "curve"),
            ({"k3": [23, 1, 1, 1, 1, 29, 1]}, "custom curves not supported by suite"),
            ({"k4": 1024}, "rsa_bits"),
            ({"k8": "SHA-1"}, "hash"),
        ],
    )
    def test_check_params_refuses(self, suite: Any, changes: dict[str, Any], reason: str) -> None:
        with pytest.raises(BadParameters, match=reason):
            suite.check_params(_params(suite, **changes))

    def test_check_params_refuses_a_non_map(self, suite: Any) -> None:
        with pytest.raises(BadParameters):
            suite.check_params([1, 2, 3])

    def test_key_objects_do_not_show_secrets(self, suite: Any) -> None:
        server_key, _ = _keys(suite)
        assert suite.dump_server_key(server_key).split(b"\n")[1].decode() not in repr(server_key)


@pytest.fixture(params=sorted(EC_SUITES), name="ec_suite")
def _ec_suite(request: pytest.FixtureRequest) -> Any:
    return EC_SUITES[request.param]


def _point_and_y(suite: Any) -> tuple[bytes, int]:
    """An uncompressed valid point of the suite's curve, and its y-coordinate."""
    server_key, _ = _keys(suite)
    point, _ = suite.server_public(server_key)
    size = (len(point) - 1) // 2
    return point, int.from_bytes(point[1 + size :], "big")


class TestECPointValidation:
    """SEC1 point handling of the NIST suites (MGP/1 §3)."""

    def test_compressed_points_are_accepted(self, ec_suite: Any) -> None:
        server_key, _ = _keys(ec_suite)
        public, _ = ec_suite.server_public(server_key)
        epk, z_es = ec_suite.encapsulate(public, system_random)
        size = (len(epk) - 1) // 2
        compressed = bytes([2 + (epk[-1] & 1)]) + epk[1 : 1 + size]
        assert ec_suite.agree(server_key, compressed) == z_es
        compressed_server = bytes([2 + (public[-1] & 1)]) + public[1 : 1 + size]
        assert ec_suite.encapsulate(compressed_server, system_random)[0][0] == 4
        ec_suite.validate_public_key(compressed)

    def test_hybrid_points_are_refused(self, ec_suite: Any) -> None:
        server_key, _ = _keys(ec_suite)
        point, y = _point_and_y(ec_suite)
        hybrid = bytes([6 + (y & 1)]) + point[1:]
        with pytest.raises(BadPoint, match="hybrid"):
            ec_suite.agree(server_key, hybrid)
        with pytest.raises(BadPoint):
            ec_suite.validate_public_key(hybrid)
        with pytest.raises(BadPoint):
            ec_suite.encapsulate(hybrid, system_random)

    def test_off_curve_points_are_refused(self, ec_suite: Any) -> None:
        server_key, _ = _keys(ec_suite)
        point, y = _point_and_y(ec_suite)
        size = (len(point) - 1) // 2
        off_curve = point[: 1 + size] + ((y + 1) % (1 << (8 * size))).to_bytes(size, "big")
        with pytest.raises(BadPoint):
            ec_suite.agree(server_key, off_curve)
        with pytest.raises(BadPoint):
            ec_suite.static_agree(server_key, off_curve)
        with pytest.raises(BadPoint):
            ec_suite.verify(off_curve, bytes(ec_suite.signature_len), b"x")

    def test_identity_and_malformed_points_are_refused(self, ec_suite: Any) -> None:
        server_key, _ = _keys(ec_suite)
        point, _ = _point_and_y(ec_suite)
        size = (len(point) - 1) // 2
        malformed = [
            b"\x00",  # the point at infinity
            bytes(len(point)),
            b"\x05" + point[1:],
            point[:-1],
            point + b"\x00",
            b"\x02" + b"\xff" * size,  # x >= p
            b"\x04" + b"\xff" * (2 * size),
        ]
        for data in malformed:
            with pytest.raises(BadPoint):
                ec_suite.agree(server_key, data)

    def test_derivation_reduces_material_mod_n_minus_1(self, ec_suite: Any) -> None:
        size = (len(_point_and_y(ec_suite)[0]) - 1) // 2
        key = ec_suite.generate_signing_key(ScriptedRandom([bytes(size + 8)]))
        assert key.private_numbers().private_value == 1
        order = ec_suite.named_curve.order
        material = (order - 1).to_bytes(size + 8, "big")
        key = ec_suite.generate_signing_key(ScriptedRandom([material]))
        assert key.private_numbers().private_value == 1

    def test_signatures_are_deterministic(self, ec_suite: Any) -> None:
        _, module_key = _keys(ec_suite)
        assert ec_suite.sign(module_key, b"m") == ec_suite.sign(module_key, b"m")


class TestX25519:
    """The ``x25519`` suite's own rules."""

    suite = SUITES["x25519"]

    # A point of order 8 on Curve25519 (RFC 7748 §6.1 / libsodium's blocklist).
    LOW_ORDER = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")

    def test_low_order_epk_is_refused(self) -> None:
        server_key, _ = _keys(self.suite)
        for epk in (self.LOW_ORDER, bytes(32), (1).to_bytes(32, "little")):
            with pytest.raises(BadPoint, match="all zero"):
                self.suite.agree(server_key, epk)

    def test_low_order_server_key_is_refused_by_encapsulate(self) -> None:
        with pytest.raises(BadPoint):
            self.suite.encapsulate(self.LOW_ORDER, system_random)

    def test_server_key_is_two_pairs(self) -> None:
        server_key, _ = _keys(self.suite)
        public, sig_public = self.suite.server_public(server_key)
        assert len(public) == len(sig_public) == 32
        assert public != sig_public
        assert "X25519ServerKey" in repr(server_key)
        assert "PrivateKey" not in repr(server_key).replace("X25519ServerKey", "")

    def test_single_der_key_is_not_a_server_key(self) -> None:
        server_key, _ = _keys(self.suite)
        dumped = self.suite.dump_server_key(server_key)
        first_block = dumped[: dumped.index(b"-----END PRIVATE KEY-----") + 26]
        with pytest.raises(BadKey):
            self.suite.load_server_key(first_block)
        with pytest.raises(BadKey):
            self.suite.load_server_key(first_block + first_block)

    def test_ed25519_key_from_a_seed(self) -> None:
        key = self.suite.generate_signing_key(ScriptedRandom([bytes(range(32))]))
        raw = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        assert raw == bytes(range(32))


class TestRSA:
    """The ``rsa`` suite's own rules."""

    suite = SUITES["rsa"]

    @staticmethod
    def _spki(e: int, n: int) -> bytes:
        return (
            rsa.RSAPublicNumbers(e, n)
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def test_modulus_size_and_exponent_are_enforced(self) -> None:
        _, module_key = _keys(self.suite)
        n = module_key.public_key().public_numbers().n
        self.suite.validate_public_key(self._spki(65537, n))
        for spki in (
            self._spki(65537, (1 << 2047) - 1),  # 2047 bits
            self._spki(65537, (1 << 3072) + 1),  # 3073 bits
            self._spki(3, n),
            self._spki(65539, n),
        ):
            with pytest.raises(BadKey):
                self.suite.validate_public_key(spki)
            with pytest.raises(BadKey):
                self.suite.encapsulate(spki, system_random)
            with pytest.raises(BadKey):
                self.suite.verify(spki, bytes(256), b"x")

    def test_default_key_sizes(self) -> None:
        server_key, module_key = _keys(self.suite)
        assert server_key.key_size == module_key.key_size == 2048
        assert self.suite.signature_len == 256

    def test_module_key_derivation_draws_32_bytes(self) -> None:
        random = ScriptedRandom([bytes(32)])
        key = self.suite.generate_signing_key(random)
        random.check_exhausted()
        assert key.key_size == 2048

    def test_epk_must_transport_32_bytes(self) -> None:
        server_key, _ = _keys(self.suite)
        public = server_key.public_key()
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        oaep = padding.OAEP(
            mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None
        )
        with pytest.raises(CryptoError, match="32 bytes"):
            self.suite.agree(server_key, public.encrypt(bytes(31), oaep))
        assert self.suite.agree(server_key, public.encrypt(bytes(32), oaep)) == bytes(32)
        labelled = padding.OAEP(
            mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=b"x"
        )
        with pytest.raises(CryptoError):
            self.suite.agree(server_key, public.encrypt(bytes(32), labelled))

    def test_scripted_salt_signatures_verify_and_repeat(self) -> None:
        _, module_key = _keys(self.suite)
        public = self.suite.signing_public(module_key)
        salt = bytes(range(32))
        first = self.suite.sign(module_key, b"m", ScriptedRandom([salt]))
        assert self.suite.sign(module_key, b"m", ScriptedRandom([salt])) == first
        self.suite.verify(public, first, b"m")
        other = self.suite.sign(module_key, b"m", ScriptedRandom([bytes(32)]))
        assert other != first
        self.suite.verify(public, other, b"m")

    def test_system_random_signs_with_openssl(self) -> None:
        _, module_key = _keys(self.suite)
        public = self.suite.signing_public(module_key)
        signature = self.suite.sign(module_key, b"m", system_random)
        self.suite.verify(public, signature, b"m")
        assert signature != self.suite.sign(module_key, b"m", system_random)
