"""The module state file (:mod:`m2mgw.client.state`): round trip, atomicity, mode, errors."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from m2mgw.client.module import ModuleEndpoint
from m2mgw.client.state import (
    FORMAT,
    VERSION,
    StateFile,
    StateFileError,
    dumps,
    loads,
    state_to_document,
)
from m2mgw.protocol.bodies import InstructionItem, Payload
from tests.client_helpers import ScriptedGateway, warm_endpoint


def busy_endpoint() -> tuple[ModuleEndpoint, ScriptedGateway]:
    """An endpoint with something in every part of its state."""
    endpoint, gateway, _ = warm_endpoint(execute=lambda kind, body: (0, {"seen": body}))
    outgoing = endpoint.build_data(Payload(data=1, req=("time",)))
    endpoint.handle_data_reply(
        gateway.data_reply(
            outgoing.datagram,
            ins=(InstructionItem(3, "set", b"\x01"),),
            time=1_700_000_123,
            alias=b"a" * 12,
        )
    )
    endpoint.start_key_registration()
    endpoint.build_data()  # unanswered: the outbox and an unanswered ctr
    endpoint.state.gateways = ["127.0.0.1:5740", "[::1]:5740"]
    return endpoint, gateway


def test_every_field_survives_a_round_trip(tmp_path: Path) -> None:
    endpoint, gateway = busy_endpoint()
    state = endpoint.state
    assert state.outbox and state.pending_keyreg and state.pending_confs and state.executed
    store = StateFile(str(tmp_path / "state.json"))
    store.save(state)
    loaded = store.load()
    assert loaded == state
    assert state_to_document(loaded) == state_to_document(state)
    # And it still works: the reloaded module reads the reply to its unanswered DATA.
    again = ModuleEndpoint(loaded, clock=lambda: 1_700_000_000.0)
    outcome = again.handle_data_reply(
        gateway.data_reply(again.resend_outbox().datagram, res={12: [1, 0]})
    )
    assert outcome.accepted and 1 in loaded.keys


def test_the_file_is_json_with_a_format_and_version(tmp_path: Path) -> None:
    endpoint, _ = busy_endpoint()
    document = json.loads(dumps(endpoint.state))
    assert (document["format"], document["version"]) == (FORMAT, VERSION)
    assert document["identity"] == endpoint.state.identity
    assert document["psk"] == endpoint.state.psk.hex()  # type: ignore[union-attr]


def test_the_file_is_private_whatever_the_umask(tmp_path: Path) -> None:
    endpoint, _ = busy_endpoint()
    path = tmp_path / "state.json"
    old = os.umask(0)
    try:
        StateFile(str(path)).save(endpoint.state)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        os.chmod(path, 0o644)
        StateFile(str(path)).save(endpoint.state)  # a replacement is a new file: 0600 again
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        os.umask(old)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint, _ = busy_endpoint()
    path = tmp_path / "state.json"
    store = StateFile(str(path))
    store.save(endpoint.state)
    before = path.read_bytes()
    endpoint.state.last_ts += 1

    def refuse(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(StateFileError, match=r"state\.json: cannot write: No space left on device"):
        store.save(endpoint.state)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["state.json"]


def test_saves_are_fsynced_unless_asked_not_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint, _ = busy_endpoint()
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    StateFile(str(tmp_path / "a.json")).save(endpoint.state)
    assert len(synced) == 2  # the file, then its directory
    StateFile(str(tmp_path / "b.json"), durable=False).save(endpoint.state)
    assert len(synced) == 2


def test_create_refuses_an_existing_file(tmp_path: Path) -> None:
    endpoint, _ = busy_endpoint()
    store = StateFile(str(tmp_path / "state.json"))
    store.create(endpoint.state)
    with pytest.raises(StateFileError, match="already exists"):
        store.create(endpoint.state)
    assert sorted(os.listdir(tmp_path)) == ["state.json"]


def test_a_missing_file_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(StateFileError, match=r"no such state file \(create it with m2mgw-module"):
        StateFile(str(tmp_path / "none.json")).load()


def _document() -> dict[str, Any]:
    endpoint, _ = busy_endpoint()
    return state_to_document(endpoint.state)


def _with(**changes: Any) -> bytes:
    document = _document()
    for name, value in changes.items():
        if value is KeyError:
            del document[name]
        else:
            document[name] = value
    return json.dumps(document).encode()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[]", "the state is not a JSON object"),
        (_with(format="other"), "not an m2mgw module state"),
        (_with(version=2), "state format version 2; this m2mgw reads 1"),
        (_with(identity=KeyError), "the state lacks 'identity'"),
        (_with(last_ts=-1), "'last_ts' must be a whole number >= 0"),
        (_with(psk="zz"), "'psk' must be hex text"),
        (_with(skid=999), "the state is inconsistent: no server key with skid 999"),
        (_with(keys=[{"kid": 1}]), "keys[0] lacks 'status'"),
        (_with(pending_confs=[[1, 9, 0, None]]), "pending_confs[0]: status is not a uint in 0..2"),
        (_with(executed=[[1, 2]]), "executed[0] must be a list of 3 items"),
        (_with(session={"sid": "00", "unanswered": []}), "session lacks 'suite'"),
    ],
)
def test_a_corrupt_file_is_refused_with_a_clear_error(
    tmp_path: Path, data: bytes, message: str
) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(data)
    with pytest.raises(StateFileError) as caught:
        StateFile(str(path)).load()
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)
    with pytest.raises(StateFileError):
        loads(data)


def test_an_oversized_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b" " * (1024 * 1024 + 1))
    with pytest.raises(StateFileError, match="larger than"):
        StateFile(str(path)).load()
