"""
The MGP/1 conformance vectors, reproduced byte for byte with the cipher
suites and :mod:`m2mgw.protocol.keyschedule`: the independent reference
(``vectors.json``) and m2mgw's own (``docs/test-vectors/``).

Every suite and every step of both files is checked, on the gateway side
(``Z_es`` from the server key, decryption of the module's datagrams, the
replies rebuilt from the same random draws) and on the module side (``epk``
and ``Z_es`` from the scripted draws, the ``auth`` values, key registrations).
The AAD and body bytes are taken from the vectors (building them is the
message codec's job); every TBS and info structure is rebuilt from its parts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from m2mgw.crypto.primitives import load_private_key, pkcs8_pem
from m2mgw.crypto.randomness import ScriptedRandom
from m2mgw.interfaces import ICipherSuite
from m2mgw.protocol import keyschedule as ks
from m2mgw.protocol.cbor import decode, encode
from m2mgw.registry import lookup
from tests.codec_helpers import (
    FILES,
    PSS_SALTS,
    VECTOR_FILES,
    file_suites,
    h,
    pss_salt,
    pss_salt_of,
    suite_names,
)

# -- the steps of the vectors, found by walking them ------------------------------------


def _steps(file: str, suite_name: str) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """``(kind, path, step)`` for every step of one suite of ``file``; unknown steps fail."""
    for name, step in VECTOR_FILES[file][suite_name].items():
        if not isinstance(step, dict):
            continue
        if name.startswith("hello_"):
            yield "hello", name, step
            for sub_name, sub in step.items():
                if sub_name == "data":
                    yield "data", f"{name}/data", sub
                elif sub_name == "keyreg":
                    yield "keyreg", f"{name}/keyreg", sub
                elif isinstance(sub, dict) and not sub_name.endswith("_random"):
                    raise AssertionError(f"unknown vector part {suite_name}/{name}/{sub_name}")
        elif name in ("data", "keyreg", "skey"):
            yield "data", name, step
            if name == "keyreg":
                yield "keyreg", name, step
            if name == "skey":
                yield "skey", name, step
        else:
            raise AssertionError(f"unknown vector step {suite_name}/{name}")


def _cases(kind: str) -> list[Any]:
    return [
        pytest.param(file, suite_name, path, id=f"{file}-{suite_name}-{path}")
        for file in FILES
        for suite_name in suite_names(file)
        for step_kind, path, _ in _steps(file, suite_name)
        if step_kind == kind
    ]


def _step(file: str, suite_name: str, path: str) -> dict[str, Any]:
    node: dict[str, Any] = VECTOR_FILES[file][suite_name]
    for part in path.split("/"):
        node = node[part]
    return node


# -- keys of the vectors -----------------------------------------------------------------


def _suite(suite_name: str) -> Any:
    return lookup(ICipherSuite, suite_name)


def _server_key(suite: Any, holder: dict[str, Any]) -> Any:
    agreement = h(holder["server_agreement_private"])
    signature = h(holder["server_signature_private"])
    if suite.name == "x25519":
        pem = pkcs8_pem(load_private_key(agreement)) + pkcs8_pem(load_private_key(signature))
        return suite.load_server_key(pem)
    assert agreement == signature
    return suite.load_server_key(agreement)


def _hello_server(file: str, suite_name: str, path: str) -> dict[str, Any]:
    """The holder of the server key a HELLO step is addressed to (the setup or the skey one)."""
    vectors = VECTOR_FILES[file][suite_name]
    skid = decode(h(_step(file, suite_name, path)["datagram"]))[4]
    holder: dict[str, Any]
    for holder in (vectors, vectors["skey"]):
        if holder["skid"] == skid:
            return holder
    raise AssertionError(f"no server key with skid {skid}")


def _module_key(file: str, suite: Any, kid: int) -> Any:
    vectors = VECTOR_FILES[file][suite.name]
    holder = vectors["keyreg"] if kid == 1 else vectors["hello_keyreg"]["keyreg"]
    assert holder["kid"] == kid
    return suite.load_signing_key(h(holder["private"]))


def _salt(step: dict[str, Any], name: str, side: str = "module_random") -> ScriptedRandom | None:
    """A scripted source holding one PSS salt for ``rsa``; ``None`` for the deterministic suites."""
    draws = step.get(side, {})
    return ScriptedRandom([h(draws[name])]) if name in draws else None


def _session(file: str, suite_name: str, sid: bytes) -> tuple[Any, dict[str, Any]]:
    """The session keys and HELLO step of the session named ``sid``."""
    suite = _suite(suite_name)
    for kind, _, step in _steps(file, suite_name):
        if kind == "hello" and h(step["sid"]) == sid:
            kid = decode(h(step["body"]))[2]
            keys = ks.session_keys(
                suite,
                h(step["z_es"]),
                h(step["stok"]),
                sid,
                VECTOR_FILES[file][suite_name]["identity"],
                kid,
            )
            return keys, step
    raise AssertionError(f"no HELLO opened session {sid.hex()}")


# -- setup -------------------------------------------------------------------------------


@pytest.mark.parametrize(("file", "suite_name"), file_suites())
def test_server_keys_match_the_vectors(file: str, suite_name: str) -> None:
    suite = _suite(suite_name)
    vectors = VECTOR_FILES[file][suite_name]
    for holder in (vectors, vectors["skey"]):
        public, sig_public = suite.server_public(_server_key(suite, holder))
        assert public == h(holder["server_agreement_public"])
        expected_sig = h(holder["server_signature_public"])
        assert (sig_public or public) == expected_sig
        assert (sig_public is None) == (suite.name != "x25519")
    assert vectors["nonce_len"] == suite.nonce_len


@pytest.mark.parametrize("file", FILES)
def test_every_suite_has_vectors(file: str) -> None:
    assert sorted(suite_names(file)) == ["p256", "p256-ccm8", "p384", "rsa", "x25519"]


# -- HELLO and HELLO_REPLY -------------------------------------------------------------------


def _hello_case(
    file: str, suite_name: str, path: str
) -> tuple[Any, dict[str, Any], dict[str, Any], Any]:
    """``(suite, the suite's vectors, the HELLO step, the holder of its server key)``."""
    step, holder = _step(file, suite_name, path), _hello_server(file, suite_name, path)
    return _suite(suite_name), VECTOR_FILES[file][suite_name], step, holder


@pytest.mark.parametrize(("file", "suite_name", "path"), _cases("hello"))
def test_hello_gateway_side(file: str, suite_name: str, path: str) -> None:
    suite, vectors, step, holder = _hello_case(file, suite_name, path)
    server_key = _server_key(suite, holder)
    epk = h(step["epk"])

    z_es = suite.agree(server_key, epk)
    assert z_es == h(step["z_es"])
    keys = ks.hello_keys(suite, z_es)
    assert keys.prk == h(step["prk_hello"])
    assert keys.k_hello == h(step["k_hello"])
    assert keys.k_hreply == h(step["k_hreply"])

    datagram = decode(h(step["datagram"]))
    aad = h(step["aad"])
    assert encode(datagram[:-1]) == aad
    assert datagram[5] == epk
    plaintext = suite.open(keys.k_hello, ks.zero_nonce(suite), aad, datagram[-1])
    assert plaintext == h(step["plaintext"])
    body, (method, auth_value) = decode(plaintext)
    assert body == h(step["body"])
    assert (method, auth_value) == (step["method"], h(step["auth_value"]))
    tbs = ks.hello_auth_tbs(aad, body)
    assert tbs == h(step["tbs"])
    kid = decode(body)[2]

    if method == 1:
        suite.verify(suite.signing_public(_module_key(file, suite, kid)), auth_value, tbs)
    elif method == 2:
        psk = h(vectors["psk"])
        assert ks.psk_key(psk, epk) == h(step["k_psk"])
        assert ks.verify_mac(ks.psk_mac(psk, epk, tbs), auth_value)
    else:
        module_public = suite.signing_public(_module_key(file, suite, kid))
        z_ss = suite.static_agree(server_key, module_public)
        assert z_ss == h(step["z_ss"])
        assert ks.sdh_key(suite, z_ss, epk) == h(step["k_sdh"])
        assert ks.verify_mac(ks.sdh_mac(suite, z_ss, epk, tbs), auth_value)

    # The reply, rebuilt from the gateway's draws.
    sid, stok = h(step["gateway_random"]["sid"]), h(step["gateway_random"]["stok"])
    assert (sid, stok) == (h(step["sid"]), h(step["stok"]))
    reply = decode(h(step["reply"]))
    reply_aad = h(step["reply_aad"])
    assert encode(reply[:-1]) == reply_aad
    reply_body = h(step["reply_body"])
    reply_tbs = ks.reply_tbs(aad, reply_aad, reply_body)
    assert reply_tbs == h(step["reply_tbs"])
    salt = _salt(step, pss_salt(file, "reply"), "gateway_random")
    sig = suite.sign(server_key, reply_tbs, salt)
    assert sig == h(step["sig"])
    if salt is not None:
        salt.check_exhausted()
    suite.verify(h(holder["server_signature_public"]), sig, reply_tbs)
    reply_plaintext = encode([reply_body, sig])
    assert reply_plaintext == h(step["reply_plaintext"])
    assert suite.seal(keys.k_hreply, ks.zero_nonce(suite), reply_aad, reply_plaintext) == reply[-1]

    # The session.
    identity = vectors["identity"]
    assert ks.session_info(sid, identity, kid) == h(step["session_info"])
    session = ks.session_keys(suite, z_es, stok, sid, identity, kid)
    assert session.prk_s == h(step["prk_s"])
    assert session.k_up == h(step["k_up"])
    assert session.k_down == h(step["k_down"])


@pytest.mark.parametrize(("file", "suite_name", "path"), _cases("hello"))
def test_hello_module_side(file: str, suite_name: str, path: str) -> None:
    suite, vectors, step, holder = _hello_case(file, suite_name, path)
    drawn = step["module_random"]
    names = ["z_es", "oaep_seed"] if suite.name == "rsa" else ["ephemeral"]
    random = ScriptedRandom([h(drawn[name]) for name in names])

    epk, z_es = suite.encapsulate(h(holder["server_agreement_public"]), random)
    random.check_exhausted()
    assert epk == h(step["epk"])
    assert z_es == h(step["z_es"])
    if "ephemeral_private" in step and suite.name != "x25519":
        ephemeral = suite.generate_signing_key(ScriptedRandom([h(drawn["ephemeral"])]))
        assert isinstance(ephemeral, ec.EllipticCurvePrivateKey)
        private_value = ephemeral.private_numbers().private_value
        assert private_value == int(step["ephemeral_private"], 16)

    keys = ks.hello_keys(suite, z_es)
    tbs = ks.hello_auth_tbs(h(step["aad"]), h(step["body"]))
    kid = decode(h(step["body"]))[2]
    if step["method"] == 1:
        salt = _salt(step, pss_salt(file, "auth"))
        assert suite.sign(_module_key(file, suite, kid), tbs, salt) == h(step["auth_value"])
    elif step["method"] == 2:
        assert ks.psk_mac(h(vectors["psk"]), epk, tbs) == h(step["auth_value"])
    else:
        z_ss = suite.static_agree(
            _module_key(file, suite, kid), h(holder["server_agreement_public"])
        )
        assert z_ss == h(step["z_ss"])
        assert ks.sdh_mac(suite, z_ss, epk, tbs) == h(step["auth_value"])

    datagram = decode(h(step["datagram"]))
    sealed = suite.seal(keys.k_hello, ks.zero_nonce(suite), h(step["aad"]), h(step["plaintext"]))
    assert sealed == datagram[-1]

    reply = decode(h(step["reply"]))
    reply_plaintext = suite.open(
        keys.k_hreply, ks.zero_nonce(suite), h(step["reply_aad"]), reply[-1]
    )
    reply_body, sig = decode(reply_plaintext)
    suite.verify(
        h(holder["server_signature_public"]),
        sig,
        ks.reply_tbs(h(step["aad"]), h(step["reply_aad"]), reply_body),
    )


# -- DATA and DATA_REPLY ---------------------------------------------------------------------


@pytest.mark.parametrize(("file", "suite_name", "path"), _cases("data"))
def test_data_exchange(file: str, suite_name: str, path: str) -> None:
    suite = _suite(suite_name)
    step = _step(file, suite_name, path)
    datagram = decode(h(step["datagram"]))
    session, _ = _session(file, suite_name, datagram[2])
    nonce = ks.nonce_for_ctr(suite, step["ctr"])
    assert nonce == h(step["nonce"])
    assert datagram[3] == step["ctr"]
    aad = h(step["aad"])
    assert encode(datagram[:-1]) == aad

    body = suite.open(session.k_up, nonce, aad, datagram[-1])
    assert body == h(step["body"])
    assert suite.seal(session.k_up, nonce, aad, body) == datagram[-1]

    reply = decode(h(step["reply"]))
    assert reply[3] == step["ctr"]
    reply_aad = encode(reply[:-1])
    sealed = suite.seal(session.k_down, nonce, reply_aad, h(step["reply_body"]))
    assert sealed == reply[-1]
    assert suite.open(session.k_down, nonce, reply_aad, reply[-1]) == h(step["reply_body"])


# -- key registration --------------------------------------------------------------------------


@pytest.mark.parametrize(("file", "suite_name", "path"), _cases("keyreg"))
def test_keyreg(file: str, suite_name: str, path: str) -> None:
    suite = _suite(suite_name)
    vectors = VECTOR_FILES[file][suite_name]
    identity = vectors["identity"]
    step = _step(file, suite_name, path)
    in_hello = path.startswith("hello_")
    carrier = _step(file, suite_name, path.split("/")[0])
    drawn = carrier["module_random"]

    private = suite.load_signing_key(h(step["private"]))
    pub = suite.signing_public(private)
    assert pub == h(step["pub"])
    suite.validate_public_key(pub)
    assert suite.signing_public(suite.load_signing_key(suite.dump_signing_key(private))) == pub

    derived_from = ScriptedRandom([h(drawn["key_material"])])
    derived = suite.generate_signing_key(derived_from)
    derived_from.check_exhausted()
    if suite.name == "rsa":
        # MGP/1 defines no RSA key derivation: the draw is consumed, the key is fresh.
        assert derived.key_size == 2048
    else:
        assert suite.signing_public(derived) == pub

    keyreg = decode(h(carrier["body"]))[5][12]
    kid, pid = step["kid"], keyreg[4]
    assert (keyreg[1], keyreg[2], keyreg[3]) == (kid, pub, suite.name)
    assert (keyreg[5], keyreg[6]) == (h(step["proof"]), h(step["pop"]))
    tbs_k = ks.keyreg_tbs(identity, kid, pub, suite.name, pid)
    assert tbs_k == h(step["tbs_k"])

    if in_hello:
        # Vouched for by the HELLO's key (kid 1).
        previous = _module_key(file, suite, kid - 1)
        suite.verify(suite.signing_public(previous), h(step["proof"]), tbs_k)
        salt = None
        if suite.name == "rsa":
            # The reference lists no draw for this salt (see the report): recover it.
            recovered = pss_salt_of(suite.signing_public(previous), h(step["proof"]))
            listed = PSS_SALTS[file]["hello_proof"]
            if listed is not None:
                assert h(drawn[listed]) == recovered
            salt = ScriptedRandom([recovered])
        assert suite.sign(previous, tbs_k, salt) == h(step["proof"])
        pop_salt = _salt(carrier, pss_salt(file, "hello_pop"))
    else:
        psk = h(vectors["psk"])
        assert ks.psk_keyreg_key(psk, identity) == h(step["k_psk_keyreg"])
        assert ks.verify_mac(ks.psk_keyreg_proof(psk, identity, tbs_k), h(step["proof"]))
        pop_salt = _salt(carrier, pss_salt(file, "pop"))

    suite.verify(pub, h(step["pop"]), tbs_k)
    assert suite.sign(private, tbs_k, pop_salt) == h(step["pop"])


def test_rsa_hello_keyreg_salt_naming() -> None:
    """
    Pins the inconsistency of rsa/hello_keyreg/module_random: ``pss_salt``
    is the salt of the HELLO's SIG auth (drawn last), and the salt of the
    KeyReg proof (drawn second) is missing from the list.
    """
    step = VECTOR_FILES["reference"]["rsa"]["hello_keyreg"]
    module_public = h(VECTOR_FILES["reference"]["rsa"]["keyreg"]["pub"])
    drawn = step["module_random"]
    assert pss_salt_of(module_public, h(step["auth_value"])) == h(drawn["pss_salt"])
    proof_salt = pss_salt_of(module_public, h(step["keyreg"]["proof"]))
    assert proof_salt not in {h(value) for value in drawn.values()}
    new_public = h(step["keyreg"]["pub"])
    assert pss_salt_of(new_public, h(step["keyreg"]["pop"])) == h(drawn["pss_salt_2"])


# -- server key announcement ---------------------------------------------------------------------


@pytest.mark.parametrize(("file", "suite_name", "path"), _cases("skey"))
def test_skey(file: str, suite_name: str, path: str) -> None:
    suite = _suite(suite_name)
    vectors = VECTOR_FILES[file][suite_name]
    step = _step(file, suite_name, path)
    announced = _server_key(suite, step)
    pub, sig_pub = suite.server_public(announced)
    assert step["suite"] == suite.name
    assert step["skid"] == vectors["skid"] + 100

    tbs = ks.skey_tbs(step["skid"], suite.name, pub, sig_pub)
    assert tbs == h(step["skey_tbs"])
    salt = _salt(step, pss_salt(file, "skey"), "gateway_random")
    sig = suite.sign(_server_key(suite, vectors), tbs, salt)
    assert sig == h(step["skey_sig"])
    suite.verify(h(vectors["server_signature_public"]), sig, tbs)

    body: dict[int, Any] = {1: step["skid"], 2: suite.name, 3: pub, 5: sig}
    if sig_pub is not None:
        body[4] = sig_pub
    instruction = encode([1, "skey", body])
    assert instruction == h(step["instruction"])
    assert decode(h(step["reply_body"]))[5] == [decode(instruction)]
