"""
A module's state on disk: one JSON file, written atomically, mode 0600.

The file holds private keys, the PSK and session keys, so it is created
with mode 0600 and replaced atomically: a new file in the same directory,
written, fsynced, renamed over the old one, and the directory fsynced.  A
module that loses power mid-write finds either the old state or the new
one, never a mix — which is what keeps ``ts`` and ``ctr`` increasing across
reboots.

The format is JSON (readable by a person debugging a device), byte strings
as lowercase hex, versioned::

    {"format": "m2mgw-module-state", "version": 1, "identity": "...", ...}

:func:`loads` refuses anything else with a :class:`StateFileError` that
names the file and the field.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from contextlib import suppress
from typing import Any, Final, TypeVar

from m2mgw.client.module import (
    Executed,
    KeyState,
    ModuleKeyPair,
    ModuleSession,
    ModuleState,
    Outbox,
    PendingKeyReg,
    ServerPublicKey,
)
from m2mgw.errors import DecodeError, M2MGWError
from m2mgw.protocol import cbor
from m2mgw.protocol.bodies import MISSING, ConfEntry

__all__ = [
    "FORMAT",
    "MAX_STATE_BYTES",
    "VERSION",
    "StateFile",
    "StateFileError",
    "dumps",
    "loads",
    "state_from_document",
    "state_to_document",
]

#: The ``format`` marker and the version this code writes and reads.
FORMAT: Final = "m2mgw-module-state"
VERSION: Final = 1
#: The largest state file read (a few KiB in practice; RSA keys are the bulk).
MAX_STATE_BYTES: Final = 1024 * 1024
_TEMP_PREFIX: Final = ".tmp-state-"
_ROOT: Final = "the state"

T = TypeVar("T")


class StateFileError(M2MGWError):
    """A state file cannot be read or written; the message names the file and the problem."""


# -- to JSON ------------------------------------------------------------------------------------


def _hex(value: bytes | None) -> str | None:
    return None if value is None else value.hex()


def state_to_document(state: ModuleState) -> dict[str, Any]:
    """The JSON document of ``state`` (secrets included: keep it private)."""
    session = state.session
    pending = state.pending_keyreg
    outbox = state.outbox
    return {
        "format": FORMAT,
        "version": VERSION,
        "identity": state.identity,
        "suite": state.suite,
        "psk": _hex(state.psk),
        "keys": [
            {
                "kid": key.kid,
                "suite": key.suite,
                "private": key.private.hex(),
                "status": key.status.value,
                "pid": key.pid,
                "not_after": key.not_after,
            }
            for key in sorted(state.keys.values(), key=lambda key: key.kid)
        ],
        "server_keys": [
            {
                "skid": server.skid,
                "suite": server.suite,
                "public": server.public.hex(),
                "sig_public": _hex(server.sig_public),
            }
            for server in sorted(state.server_keys.values(), key=lambda server: server.skid)
        ],
        "skid": state.skid,
        "require_server_signature": state.require_server_signature,
        "hello_method": state.hello_method,
        "hint_mode": state.hint_mode,
        "gateways": list(state.gateways),
        "last_ts": state.last_ts,
        "session": None
        if session is None
        else {
            "sid": session.sid.hex(),
            "suite": session.suite,
            "skid": session.skid,
            "kid": session.kid,
            "k_up": session.k_up.hex(),
            "k_down": session.k_down.hex(),
            "expires_at": session.expires_at,
            "next_ctr": session.next_ctr,
            "unanswered": [[ctr, tok.hex()] for ctr, tok in sorted(session.unanswered.items())],
        },
        "executed": [[entry.iid, entry.status, entry.ts] for entry in state.executed],
        "alias": _hex(state.alias),
        "gateway_time": state.gateway_time,
        "gateway_time_at": state.gateway_time_at,
        "pending_confs": [
            [
                conf.iid,
                conf.status,
                conf.ts,
                None if conf.result is MISSING else cbor.encode(conf.result).hex(),
            ]
            for conf in state.pending_confs
        ],
        "pending_keyreg": None
        if pending is None
        else {
            "kid": pending.kid,
            "suite": pending.suite,
            "private": pending.private.hex(),
            "pub": pending.pub.hex(),
            "pid": pending.pid,
            "proof": pending.proof.hex(),
            "pop": pending.pop.hex(),
            "proof_kid": pending.proof_kid,
            "ttl": pending.ttl,
            "keygen_iid": pending.keygen_iid,
            "hello_carriers": pending.hello_carriers,
        },
        "outbox": None
        if outbox is None
        else {
            "tok": outbox.tok.hex(),
            "body": outbox.body.hex(),
            "conf_iids": list(outbox.conf_iids),
            "keyreg_kid": outbox.keyreg_kid,
        },
    }


def dumps(state: ModuleState) -> bytes:
    """The state file's bytes for ``state``."""
    text = json.dumps(state_to_document(state), indent=1, sort_keys=False)
    return (text + "\n").encode("utf-8")


# -- from JSON ---------------------------------------------------------------------------------


class _Reader:
    """Typed access to one JSON object, with errors that name the field."""

    def __init__(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise StateFileError(f"{where} is not a JSON object")
        self.value = value
        self.where = where

    def _get(self, name: str, optional: bool) -> Any:
        if name not in self.value:
            if optional:
                return None
            raise StateFileError(f"{self.where} lacks {name!r}")
        return self.value[name]

    def _problem(self, name: str, what: str) -> StateFileError:
        return StateFileError(f"{self.where}: {name!r} must be {what}")

    def integer(self, name: str, *, optional: bool = False, minimum: int = 0) -> Any:
        value = self._get(name, optional)
        if value is None and optional:
            return None
        if type(value) is not int or value < minimum:
            raise self._problem(name, f"a whole number >= {minimum}")
        return value

    def number(self, name: str, *, optional: bool = False) -> Any:
        value = self._get(name, optional)
        if value is None and optional:
            return None
        if type(value) not in (int, float):
            raise self._problem(name, "a number")
        return float(value)

    def text(self, name: str) -> str:
        value = self._get(name, False)
        if not isinstance(value, str) or not value:
            raise self._problem(name, "a non-empty string")
        return value

    def flag(self, name: str) -> bool:
        value = self._get(name, False)
        if not isinstance(value, bool):
            raise self._problem(name, "true or false")
        return value

    def hexbytes(self, name: str, *, optional: bool = False) -> Any:
        value = self._get(name, optional)
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise self._problem(name, "hex text")
        try:
            return bytes.fromhex(value)
        except ValueError:
            raise self._problem(name, "hex text") from None

    def array(self, name: str) -> list[Any]:
        value = self._get(name, False)
        if not isinstance(value, list):
            raise self._problem(name, "a list")
        return value

    def child(self, name: str) -> _Reader | None:
        value = self._get(name, True)
        where = name if self.where == _ROOT else f"{self.where}.{name}"
        return None if value is None else _Reader(value, where)


def _items(reader: _Reader, name: str, read: Callable[[_Reader], T]) -> list[T]:
    return [read(_Reader(item, f"{name}[{i}]")) for i, item in enumerate(reader.array(name))]


def _row(value: Any, where: str, size: tuple[int, ...]) -> list[Any]:
    if not isinstance(value, list) or len(value) not in size:
        raise StateFileError(f"{where} must be a list of {' or '.join(map(str, size))} items")
    return value


def _uint(value: Any, where: str) -> int:
    if type(value) is not int or value < 0:
        raise StateFileError(f"{where} must be a whole number >= 0")
    return value


def _unhex(value: Any, where: str) -> bytes:
    if isinstance(value, str):
        try:
            return bytes.fromhex(value)
        except ValueError:
            pass
    raise StateFileError(f"{where} must be hex text")


def _key(r: _Reader) -> ModuleKeyPair:
    status = r.text("status")
    try:
        state = KeyState(status)
    except ValueError:
        raise StateFileError(f"{r.where}: unknown key status {status!r}") from None
    return ModuleKeyPair(
        kid=r.integer("kid", minimum=1),
        suite=r.text("suite"),
        private=r.hexbytes("private"),
        status=state,
        pid=r.integer("pid"),
        not_after=r.integer("not_after", optional=True),
    )


def _server(r: _Reader) -> ServerPublicKey:
    return ServerPublicKey(
        skid=r.integer("skid"),
        suite=r.text("suite"),
        public=r.hexbytes("public"),
        sig_public=r.hexbytes("sig_public", optional=True),
    )


def _session(r: _Reader) -> ModuleSession:
    unanswered = {}
    for i, item in enumerate(r.array("unanswered")):
        ctr, tok = _row(item, f"{r.where}.unanswered[{i}]", (2,))
        where = f"{r.where}.unanswered[{i}]"
        unanswered[_uint(ctr, where)] = _unhex(tok, where)
    return ModuleSession(
        sid=r.hexbytes("sid"),
        suite=r.text("suite"),
        skid=r.integer("skid"),
        kid=r.integer("kid"),
        k_up=r.hexbytes("k_up"),
        k_down=r.hexbytes("k_down"),
        expires_at=r.number("expires_at"),
        next_ctr=r.integer("next_ctr", minimum=1),
        unanswered=unanswered,
    )


def _pending(r: _Reader) -> PendingKeyReg:
    return PendingKeyReg(
        kid=r.integer("kid", minimum=1),
        suite=r.text("suite"),
        private=r.hexbytes("private"),
        pub=r.hexbytes("pub"),
        pid=r.integer("pid"),
        proof=r.hexbytes("proof"),
        pop=r.hexbytes("pop"),
        proof_kid=r.integer("proof_kid"),
        ttl=r.integer("ttl", optional=True),
        keygen_iid=r.integer("keygen_iid", optional=True),
        hello_carriers=r.integer("hello_carriers"),
    )


def _outbox(r: _Reader) -> Outbox:
    iids = tuple(_uint(iid, f"{r.where}.conf_iids") for iid in r.array("conf_iids"))
    return Outbox(
        tok=r.hexbytes("tok"),
        body=r.hexbytes("body"),
        conf_iids=iids,
        keyreg_kid=r.integer("keyreg_kid", optional=True),
    )


def _conf(value: Any, where: str) -> ConfEntry:
    iid, status, ts, result = _row(value, where, (4,))
    decoded: Any = MISSING
    if result is not None:
        try:
            decoded = cbor.decode(_unhex(result, where))
        except DecodeError:
            raise StateFileError(f"{where}: the result is not CBOR") from None
    try:
        return ConfEntry(_uint(iid, where), _uint(status, where), _uint(ts, where), decoded)
    except ValueError as e:
        raise StateFileError(f"{where}: {e}") from None


def state_from_document(document: Any) -> ModuleState:
    """
    The :class:`ModuleState` a JSON document describes.

    :raise StateFileError: not a state document of a known version, a field
        missing or of the wrong type, or the state's invariants broken.
    """
    r = _Reader(document, _ROOT)
    if r.value.get("format") != FORMAT:
        raise StateFileError(f"not an m2mgw module state (format is not {FORMAT!r})")
    version = r.value.get("version")
    if version != VERSION:
        raise StateFileError(f"state format version {version!r}; this m2mgw reads {VERSION}")
    keys = {key.kid: key for key in _items(r, "keys", _key)}
    servers = {server.skid: server for server in _items(r, "server_keys", _server)}
    gateways = r.array("gateways")
    if not all(isinstance(item, str) for item in gateways):
        raise StateFileError("the state: 'gateways' must be a list of strings")
    executed = []
    for i, item in enumerate(r.array("executed")):
        iid, status, ts = _row(item, f"executed[{i}]", (3,))
        where = f"executed[{i}]"
        executed.append(Executed(_uint(iid, where), _uint(status, where), _uint(ts, where)))
    session = r.child("session")
    pending = r.child("pending_keyreg")
    outbox = r.child("outbox")
    state = ModuleState(
        identity=r.text("identity"),
        suite=r.text("suite"),
        server_keys=servers,
        skid=r.integer("skid"),
        psk=r.hexbytes("psk", optional=True),
        keys=keys,
        require_server_signature=r.flag("require_server_signature"),
        hello_method=r.text("hello_method"),
        hint_mode=r.text("hint_mode"),
        gateways=list(gateways),
        last_ts=r.integer("last_ts"),
        session=None if session is None else _session(session),
        executed=executed,
        alias=r.hexbytes("alias", optional=True),
        gateway_time=r.integer("gateway_time", optional=True),
        gateway_time_at=r.number("gateway_time_at", optional=True),
        pending_confs=[
            _conf(item, f"pending_confs[{i}]") for i, item in enumerate(r.array("pending_confs"))
        ],
        pending_keyreg=None if pending is None else _pending(pending),
        outbox=None if outbox is None else _outbox(outbox),
    )
    try:
        state.check()
    except ValueError as e:
        raise StateFileError(f"the state is inconsistent: {e}") from None
    return state


def loads(data: bytes) -> ModuleState:
    """
    Parse a state file's bytes.

    :raise StateFileError: not UTF-8 JSON, or not a valid state document.
    """
    if len(data) > MAX_STATE_BYTES:
        raise StateFileError(f"larger than {MAX_STATE_BYTES} bytes; not a module state")
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateFileError(f"not JSON ({type(e).__name__}: {e})") from None
    return state_from_document(document)


# -- the file ---------------------------------------------------------------------------------


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe(error: OSError) -> str:
    return error.strerror or str(error)


class StateFile:
    """
    A module state file.

    :param path: where the state lives.
    :param durable: fsync the file and its directory on every save (turn it
        off only for simulations, where losing the last write is harmless).
    """

    def __init__(self, path: str, *, durable: bool = True) -> None:
        self.path = path
        self.durable = durable

    def __repr__(self) -> str:
        return f"<StateFile {self.path!r}>"

    def exists(self) -> bool:
        """True if the file exists."""
        return os.path.lexists(self.path)

    def load(self) -> ModuleState:
        """
        Read the state.

        :raise StateFileError: the file is missing, unreadable or not a valid state.
        """
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            raise StateFileError(
                f"{self.path}: no such state file (create it with m2mgw-module provision)"
            ) from None
        except OSError as e:
            raise StateFileError(f"{self.path}: {_describe(e)}") from None
        try:
            return loads(data)
        except StateFileError as e:
            raise StateFileError(f"{self.path}: {e}") from None

    def save(self, state: ModuleState) -> None:
        """
        Replace the file with ``state``, atomically (mode 0600).

        :raise StateFileError: the file could not be written; the old one is intact.
        """
        self._write(dumps(state), replace=True)

    def create(self, state: ModuleState) -> None:
        """
        Write ``state`` to a file that must not exist yet.

        :raise StateFileError: the file exists or could not be written.
        """
        self._write(dumps(state), replace=False)

    def _write(self, data: bytes, *, replace: bool) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        temp = os.path.join(directory, f"{_TEMP_PREFIX}{secrets.token_hex(8)}")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise StateFileError(f"{self.path}: cannot write: {_describe(e)}") from None
        try:
            try:
                os.fchmod(fd, 0o600)  # whatever the umask says
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if self.durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if replace:
                os.replace(temp, self.path)
            else:
                os.link(temp, self.path)
                os.unlink(temp)
            if self.durable:
                _fsync_directory(directory)
        except FileExistsError:
            with suppress(FileNotFoundError):
                os.unlink(temp)
            raise StateFileError(f"{self.path}: already exists") from None
        except OSError as e:
            with suppress(FileNotFoundError):
                os.unlink(temp)
            raise StateFileError(f"{self.path}: cannot write: {_describe(e)}") from None
