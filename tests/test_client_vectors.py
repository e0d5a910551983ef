"""
The project's module client reproduces the MGP/1 vectors byte for byte.

For every suite of both vectors files (the independent reference, and
m2mgw's own in ``docs/test-vectors/``), one
:class:`~m2mgw.client.module.ModuleEndpoint` provisioned
with the vectors' identity, PSK and server key, on the vectors' clock, fed the
vectors' ``module_random`` draws, runs every step in order (hello_psk, data,
keyreg, hello_sig and its DATA, hello_sdh and its DATA, hello_keyreg, skey,
hello_skey).  Each datagram it builds must equal the vector's, and it must
decrypt and accept each gateway reply of the vectors (HELLO_REPLY signatures
checked with the server public key, the skey instruction verified, stored
and confirmed in the next HELLO), ending in the state the steps imply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from m2mgw.client.module import (
    KeyState,
    ModuleEndpoint,
    ModuleState,
    Outgoing,
    ReplyOutcome,
    ServerPublicKey,
)
from m2mgw.interfaces import ICipherSuite, RandomSource
from m2mgw.protocol import cbor
from m2mgw.protocol.bodies import AuthMethod, ConfEntry, KeyRegStatus, Payload
from tests.codec_helpers import PSS_SALTS, VECTOR_FILES, file_suites, h, pss_salt, pss_salt_of

#: The SenML record the vectors' reports carry (RFC 8428 CBOR labels).
SENML = [{-2: "urn:dev:mgp1-vector:", 0: "temperature", 1: "Cel", 2: 21.5, 6: 0}]


class Draws:
    """A random source loaded with one step's draws at a time; any other draw fails."""

    def __init__(self) -> None:
        self.queue: list[bytes] = []

    def load(self, *draws: bytes) -> None:
        assert self.queue == [], f"{len(self.queue)} draws of the last step were not taken"
        self.queue = list(draws)

    def __call__(self, n: int) -> bytes:
        assert self.queue, f"unexpected draw of {n} bytes"
        value = self.queue.pop(0)
        assert len(value) == n, f"drew {n} bytes where the vectors have {len(value)}"
        return value


def server(holder: dict[str, Any], suite_name: str) -> ServerPublicKey:
    sig_public = h(holder["server_signature_public"]) if suite_name == "x25519" else None
    return ServerPublicKey(
        holder["skid"], suite_name, h(holder["server_agreement_public"]), sig_public
    )


def vector_key_factory(file: str, suite_name: str) -> Callable[[ICipherSuite, RandomSource], Any]:
    """
    RSA keys cannot be derived from draws (MGP/1 defines no derivation): hand
    out the vectors' keys in order, after taking the ``key_material`` draw.
    The other suites derive theirs with the suite's own derivation.
    """
    vectors = VECTOR_FILES[file][suite_name]
    keys = [vectors["keyreg"]["private"], vectors["hello_keyreg"]["keyreg"]["private"]]

    def factory(suite: ICipherSuite, random: RandomSource) -> Any:
        if suite.name != "rsa":
            return suite.generate_signing_key(random)
        random(32)
        return suite.load_signing_key(h(keys.pop(0)))

    return factory


def setup(file: str, suite_name: str) -> tuple[ModuleEndpoint, Draws, dict[str, Any]]:
    vectors = VECTOR_FILES[file][suite_name]
    state = ModuleState(
        identity=vectors["identity"],
        suite=suite_name,
        psk=h(vectors["psk"]),
        server_keys={vectors["skid"]: server(vectors, suite_name)},
        skid=vectors["skid"],
        require_server_signature=True,
    )
    draws = Draws()
    endpoint = ModuleEndpoint(
        state,
        random=draws,
        clock=lambda: float(vectors["clock"]),
        key_factory=vector_key_factory(file, suite_name),
    )
    return endpoint, draws, vectors


def hello_draws(file: str, suite_name: str, step: dict[str, Any]) -> list[bytes]:
    drawn = step["module_random"]
    names = ["z_es", "oaep_seed", "tok"] if suite_name == "rsa" else ["ephemeral", "tok"]
    if suite_name == "rsa" and step["method"] == AuthMethod.SIG:
        names.append(pss_salt(file, "auth"))
    return [h(drawn[name]) for name in names]


def accepted(outcome: ReplyOutcome, what: str) -> ReplyOutcome:
    assert outcome.accepted, f"{what}: reply dropped: {outcome.reason}"
    return outcome


def check_hello(
    endpoint: ModuleEndpoint, name: str, step: dict[str, Any], outgoing: Outgoing
) -> ReplyOutcome:
    assert outgoing.datagram == h(step["datagram"]), f"{name}: HELLO differs"
    assert outgoing.context.hello_aad == h(step["aad"])  # type: ignore[union-attr]
    outcome = accepted(endpoint.handle_hello_reply(h(step["reply"]), outgoing.context), name)  # type: ignore[arg-type]
    session = endpoint.state.session
    assert session is not None
    assert (session.sid, session.k_up, session.k_down) == (
        h(step["sid"]),
        h(step["k_up"]),
        h(step["k_down"]),
    ), name
    assert endpoint.state.alias == h(step["gateway_random"]["alias"])
    return outcome


def check_data(
    endpoint: ModuleEndpoint, name: str, step: dict[str, Any], outgoing: Outgoing
) -> ReplyOutcome:
    assert outgoing.datagram == h(step["datagram"]), f"{name}: DATA differs"
    assert endpoint.state.outbox is not None
    outcome = accepted(endpoint.handle_data_reply(h(step["reply"])), name)
    assert endpoint.state.outbox is None
    return outcome


@pytest.mark.parametrize(("file", "suite_name"), file_suites())
def test_the_module_client_reproduces_every_step(file: str, suite_name: str) -> None:
    endpoint, draws, vectors = setup(file, suite_name)
    state = endpoint.state
    clock = vectors["clock"]
    is_rsa = suite_name == "rsa"

    # hello_psk: PSK HELLO with SenML in pl, the identity as hint.
    step = vectors["hello_psk"]
    draws.load(*hello_draws(file, suite_name, step))
    outgoing = endpoint.build_hello(Payload(data=SENML))
    assert state.last_ts == clock
    check_hello(endpoint, "hello_psk", step, outgoing)
    assert state.session is not None and state.session.kid == 0

    # data: SenML and req "time" on the PSK session.
    step = vectors["data"]
    draws.load(h(step["module_random"]["tok"]))
    outcome = check_data(
        endpoint, "data", step, endpoint.build_data(Payload(data=SENML, req=("time",)))
    )
    assert outcome.body is not None and outcome.body.time == clock

    # keyreg: DATA with KeyReg kid 1 vouched for by the PSK.
    step = vectors["keyreg"]
    drawn = step["module_random"]
    draws.load(h(drawn["key_material"]), *([h(drawn[pss_salt(file, "pop")])] if is_rsa else []))
    pending = endpoint.start_key_registration()
    assert (pending.kid, pending.pid, pending.proof_kid) == (1, 0, 0)
    assert pending.pub == h(step["pub"]) and pending.proof == h(step["proof"])
    draws.load(h(drawn["tok"]))
    outcome = check_data(endpoint, "keyreg", step, endpoint.build_data())
    assert outcome.keyreg is not None and outcome.keyreg.status == KeyRegStatus.ACCEPTED
    assert state.keys[1].status == KeyState.REGISTERED and state.pending_keyreg is None

    # hello_sig: the registered key 1 by default, the alias as hint; the PSK goes.
    step = vectors["hello_sig"]
    draws.load(*hello_draws(file, suite_name, step))
    assert endpoint.hello_credential() == (1, AuthMethod.SIG)
    check_hello(endpoint, "hello_sig", step, endpoint.build_hello())
    assert state.keys[1].status.value == "active" and state.psk is None
    draws.load(h(step["data"]["module_random"]["tok"]))
    check_data(endpoint, "hello_sig/data", step["data"], endpoint.build_data(Payload(data=SENML)))

    # hello_sdh (EC suites): SDH with key 1.
    if "hello_sdh" in vectors:
        step = vectors["hello_sdh"]
        draws.load(*hello_draws(file, suite_name, step))
        check_hello(endpoint, "hello_sdh", step, endpoint.build_hello(method=AuthMethod.SDH))
        draws.load(h(step["data"]["module_random"]["tok"]))
        check_data(
            endpoint, "hello_sdh/data", step["data"], endpoint.build_data(Payload(data=SENML))
        )

    # hello_keyreg: SIG HELLO with key 1 carrying KeyReg kid 2, proof by key 1.
    step = vectors["hello_keyreg"]
    drawn = step["module_random"]
    key_draws = [h(drawn["key_material"])]
    if is_rsa:
        # The reference does not list the proof's salt (drawn second): recover it.
        proof_salt = pss_salt_of(h(vectors["keyreg"]["pub"]), h(step["keyreg"]["proof"]))
        proof_name = PSS_SALTS[file]["hello_proof"]
        if proof_name is not None:
            assert h(drawn[proof_name]) == proof_salt
        key_draws += [proof_salt, h(drawn[pss_salt(file, "hello_pop")])]
    draws.load(*key_draws)
    pending = endpoint.start_key_registration()
    assert (pending.kid, pending.proof_kid) == (2, 1)
    assert pending.pub == h(step["keyreg"]["pub"]) and pending.pop == h(step["keyreg"]["pop"])
    draws.load(*hello_draws(file, suite_name, step))
    outcome = check_hello(endpoint, "hello_keyreg", step, endpoint.build_hello(include_keyreg=True))
    assert outcome.keyreg is not None and outcome.keyreg.status == KeyRegStatus.ACCEPTED
    assert state.keys[2].status == KeyState.REGISTERED

    # skey: a DATA whose reply announces server key skid + 100, signed by the session's key.
    step = vectors["skey"]
    draws.load(h(step["module_random"]["tok"]))
    outcome = check_data(endpoint, "skey", step, endpoint.build_data(Payload(data=SENML)))
    assert [(i.iid, i.kind, i.status) for i in outcome.instructions] == [(1, "skey", 0)]
    assert state.server_keys[step["skid"]] == server(step, suite_name)
    assert state.skid == step["skid"]
    assert state.pending_confs == [ConfEntry(1, 0, clock)]

    # hello_skey: SIG HELLO with key 1 to the announced key, confirming the skey in pl.
    step = vectors["hello_skey"]
    draws.load(*hello_draws(file, suite_name, step))
    check_hello(endpoint, "hello_skey", step, endpoint.build_hello(kid=1))
    assert state.pending_confs == []
    assert draws.queue == []
    assert sorted(state.keys) == [1, 2]
    assert state.last_ts == cbor.decode(h(step["body"]))[3]


@pytest.mark.parametrize(("file", "suite_name"), file_suites())
def test_a_vector_reply_with_a_forged_signature_is_dropped(file: str, suite_name: str) -> None:
    endpoint, draws, vectors = setup(file, suite_name)
    step = vectors["hello_psk"]
    draws.load(*hello_draws(file, suite_name, step))
    outgoing = endpoint.build_hello(Payload(data=SENML))
    # Swap in a server key the reply was not signed with: decryption still
    # works (k_hreply comes from Z_es), the signature check must fail.
    other = server(vectors["skey"], suite_name)
    endpoint.state.server_keys[vectors["skid"]] = ServerPublicKey(
        vectors["skid"], suite_name, h(vectors["server_agreement_public"]), other.verify_key
    )
    outcome = endpoint.handle_hello_reply(h(step["reply"]), outgoing.context)  # type: ignore[arg-type]
    assert not outcome.accepted and outcome.reason == "bad server signature"
    assert endpoint.state.session is None
