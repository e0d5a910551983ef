"""
m2mgw's own MGP/1 test vectors (``docs/test-vectors/mgp1-m2mgw.json``).

The committed file is exactly what :mod:`m2mgw.testvectors` generates, its
keys and draws are its own (none of the reference's), its draws are listed
in the order the implementation makes them, and the generator refuses to
write vectors whose named draws do not match their use.  The conformance
checks proper (codec, key schedule, gateway and module client, byte for
byte) run over this file and the reference alike: see
``tests/test_protocol_vectors_codec.py``, ``tests/test_keyschedule_vectors.py``,
``tests/test_protocol_engine_vectors.py`` and ``tests/test_client_vectors.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from m2mgw import testvectors
from m2mgw.protocol.engine import ModuleController
from tests.codec_helpers import M2MGW_VECTORS_PATH, VECTOR_FILES, h, pss_salt_of, suite_names

OURS = VECTOR_FILES["m2mgw"]
REFERENCE = VECTOR_FILES["reference"]


@pytest.fixture(scope="module")
def generated() -> dict[str, Any]:
    """One generation for the whole module (RSA signing makes it take a second or two)."""
    return testvectors.generate()


# -- the committed file is the generator's output ----------------------------------------------


def test_regenerating_gives_exactly_the_committed_file(generated: dict[str, Any]) -> None:
    committed = M2MGW_VECTORS_PATH.read_text(encoding="utf-8")
    assert testvectors.render(generated) == committed
    assert generated == OURS


def test_check_mode_accepts_the_file_and_names_a_difference(
    generated: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(testvectors, "generate", lambda: generated)
    assert testvectors.main(["--check", "--out", str(M2MGW_VECTORS_PATH)]) == 0

    stale = json.loads(testvectors.render(generated))
    stale["x25519"]["data"]["reply"] = "00"
    path = tmp_path / "stale.json"
    path.write_text(testvectors.render(stale), encoding="utf-8")
    assert testvectors.main(["--check", "--out", str(path)]) == 1
    assert "/x25519/data/reply" in capsys.readouterr().err
    assert testvectors.main(["--check", "--out", str(tmp_path / "missing.json")]) == 1


def test_write_mode_writes_the_file(
    generated: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(testvectors, "generate", lambda: generated)
    path = tmp_path / "docs" / "mgp1-m2mgw.json"
    assert testvectors.main(["--out", str(path)]) == 0
    assert path.read_text(encoding="utf-8") == M2MGW_VECTORS_PATH.read_text(encoding="utf-8")


# -- what the file says about itself, and its own keys -----------------------------------------


def test_about_names_the_generator_and_warns_about_the_keys() -> None:
    about = OURS["_about"]
    assert f"m2mgw.testvectors version {testvectors.GENERATOR_VERSION}" in about["what"]
    assert "TEST KEYS ONLY" in about["keys"] and "Never provision" in about["keys"]
    assert "docs/spec/vectors.json" in about["what"]


def _secret_values(node: Any, name: str = "") -> set[str]:
    """Every PSK, private key and random draw of a vectors tree."""
    found: set[str] = set()
    if isinstance(node, dict):
        for key, child in node.items():
            if key.endswith("_random"):
                found.update(child.values())
            else:
                found |= _secret_values(child, key)
    elif name == "psk" or name.endswith("private"):
        found.add(node)
    return found


def test_keys_and_randomness_are_not_the_references() -> None:
    ours = set().union(*(_secret_values(OURS[suite]) for suite in suite_names("m2mgw")))
    theirs = set().union(*(_secret_values(REFERENCE[suite]) for suite in suite_names("reference")))
    assert len(ours) > 150
    assert ours.isdisjoint(theirs)
    skids = [OURS[suite]["skid"] for suite in suite_names("m2mgw")]
    announced = [OURS[suite]["skey"]["skid"] for suite in suite_names("m2mgw")]
    reference_skids = {REFERENCE[suite]["skid"] for suite in suite_names("reference")}
    assert len(set(skids + announced)) == 10
    assert reference_skids.isdisjoint(skids + announced)


def test_the_seed_derivation_is_hkdf_sha256_as_documented() -> None:
    for suite in suite_names("m2mgw"):
        psk = HKDF(hashes.SHA256(), 32, testvectors.SALT, f"{suite}/psk".encode()).derive(
            testvectors.SEED
        )
        assert h(OURS[suite]["psk"]) == psk
    tok = OURS["p256"]["hello_sig"]["data"]["module_random"]["tok"]
    assert h(tok) == testvectors.derive("p256/hello_sig/data/module/tok", 8)


# -- the draws: every one listed, in the order made ------------------------------------------


def _hello_order(suite: str, step: dict[str, Any]) -> list[str]:
    names = ["z_es", "oaep_seed", "tok"] if suite == "rsa" else ["ephemeral", "tok"]
    return names + (["pss_salt_auth"] if suite == "rsa" and step["method"] == 1 else [])


def _key_order(suite: str, by_key: bool) -> list[str]:
    if suite != "rsa":
        return ["key_material"]
    return ["key_material", *(["pss_salt_proof"] if by_key else []), "pss_salt_pop"]


@pytest.mark.parametrize("suite", suite_names("m2mgw"))
def test_every_draw_is_listed_in_the_order_drawn(suite: str) -> None:
    # The order the module client and the module controller draw in (the
    # client and engine tests feed the draws in this order, by name).
    vectors = OURS[suite]
    rsa = suite == "rsa"
    reply_draws = ["sid", "stok", "alias", *(["pss_salt_reply"] if rsa else [])]
    expected: dict[str, tuple[list[str], list[str]]] = {}
    for name in ("hello_psk", "hello_sig", "hello_sdh", "hello_skey"):
        if name in vectors:
            expected[name] = (_hello_order(suite, vectors[name]), reply_draws)
            if "data" in vectors[name]:
                expected[f"{name}/data"] = (["tok"], [])
    expected["data"] = (["tok"], [])
    expected["keyreg"] = ([*_key_order(suite, by_key=False), "tok"], [])
    hello_keyreg = vectors["hello_keyreg"]
    expected["hello_keyreg"] = (
        _key_order(suite, by_key=True) + _hello_order(suite, hello_keyreg),
        reply_draws,
    )
    expected["skey"] = (["tok"], ["pss_salt_skey"] if rsa else [])
    for path, (module_names, gateway_names) in expected.items():
        step = vectors
        for part in path.split("/"):
            step = step[part]
        assert list(step["module_random"]) == module_names, path
        assert list(step.get("gateway_random", {})) == gateway_names, path


def test_rsa_hello_keyreg_lists_each_salt_under_its_use() -> None:
    """The reference's rsa/hello_keyreg leaves out a salt and misnames one; ours does not."""
    vectors = OURS["rsa"]
    step = vectors["hello_keyreg"]
    drawn = {name: h(value) for name, value in step["module_random"].items()}
    key_1 = h(vectors["keyreg"]["pub"])
    assert pss_salt_of(key_1, h(step["keyreg"]["proof"])) == drawn["pss_salt_proof"]
    assert pss_salt_of(key_1, h(step["auth_value"])) == drawn["pss_salt_auth"]
    key_2 = h(step["keyreg"]["pub"])
    assert pss_salt_of(key_2, h(step["keyreg"]["pop"])) == drawn["pss_salt_pop"]
    server = h(vectors["server_signature_public"])
    assert pss_salt_of(server, h(vectors["skey"]["skey_sig"])) == h(
        vectors["skey"]["gateway_random"]["pss_salt_skey"]
    )


# -- the generator refuses draws that do not match their names ----------------------------------


def test_named_draws_refuse_unexpected_and_missing_draws() -> None:
    draws = testvectors.NamedDraws("p256", "module")
    draws.expect("step", "tok")
    assert draws(8) == testvectors.derive("p256/step/module/tok", 8)
    with pytest.raises(testvectors.VectorError, match="unexpected module draw of 4 bytes"):
        draws(4)
    assert draws.take() == {"tok": testvectors.derive("p256/step/module/tok", 8)}
    draws.expect("other", "sid", "stok")
    draws(6)
    with pytest.raises(testvectors.VectorError, match=r"\['stok'\] were not made"):
        draws.take()


def test_a_gateway_drawing_in_another_order_stops_the_generation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def stok_first(self: ModuleController) -> tuple[bytes, bytes, bytes | None]:
        stok = self._random(16)
        sid = self._random(6)
        return sid, stok, self._random(12)

    monkeypatch.setattr(ModuleController, "_draw_session_randomness", stok_first)
    with pytest.raises(testvectors.VectorError, match="differ from the draws"):
        testvectors.generate(("p256",))
