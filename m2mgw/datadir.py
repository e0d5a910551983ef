"""
The gateway's data directory: the module database and every key.

Layout (directories mode 0700, private keys mode 0600)::

    <path>/
      .lock                          serialises ensure() and key creation
      m2mgw.sqlite                   the embedded store's database
      keys/
        next-skid                    high-water mark: the next skid to assign
        server-<skid>-<suite>.pem    one module-side server key pair per file
      tls/
        ca.pem       ca-key.pem      the application CA (signs gateway and clients)
        gateway.pem  gateway-key.pem the gateway's TLS certificate (+ chain) and key

A server key's ``skid`` and suite are its file name: the atomic rename that
puts the file in place is the single moment the key comes into existence, so
there is no index that could disagree with the files.  ``keys/next-skid`` is
written (atomically) *before* the key file and only ever grows, so a ``skid``
is never handed out twice, even after a key file was removed.  Key files are
never overwritten or deleted here; whether a key is active, retiring or
retired is the store's business (:meth:`m2mgw.interfaces.IModuleStore.set_server_key_status`).

``ca-key.pem`` may be moved offline after ``init``: the gateway only needs the
CA certificate to verify clients; issuing an application certificate needs the key.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import socket
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from m2mgw import tls
from m2mgw.errors import ConfigError, CryptoError, KeyConflict
from m2mgw.interfaces import ICipherSuite, IModuleStore
from m2mgw.records import ServerKey, ServerKeyStatus
from m2mgw.registry import lookup

__all__ = [
    "DataDir",
    "DataDirItem",
    "EnsureResult",
    "LoadedServerKey",
    "gateway_tls_names",
    "register_server_keys",
    "write_file_atomically",
]

#: How long :meth:`DataDir.ensure` waits for another process holding the lock.
LOCK_TIMEOUT = 60.0

#: Largest server key file read.
MAX_KEY_FILE = 1 << 20

_SERVER_KEY_FILE = re.compile(r"server-(0|[1-9][0-9]{0,17})-([a-z0-9][a-z0-9._-]{0,63})\.pem\Z")
_TEMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class LoadedServerKey:
    """
    A module-side server key pair, loaded for use.

    :ivar key: the suite's opaque private key object (never shown in ``repr``).
    :ivar public: the public key in wire encoding (the agreement key for ``x25519``).
    :ivar sig_public: the Ed25519 signature key of an ``x25519`` pair, else ``None``.
    """

    skid: int
    suite: str
    key: Any = field(repr=False, compare=False)
    public: bytes
    sig_public: bytes | None


@dataclass(frozen=True)
class DataDirItem:
    """
    One thing :meth:`DataDir.ensure` looked after.

    :ivar kind: ``directory``, ``server-key``, ``tls-ca`` or ``tls-gateway``.
    :ivar path: the file or directory.
    :ivar detail: what it is, for a person (``"skid 3, suite p256"``).
    """

    kind: str
    path: str
    detail: str = ""


@dataclass(frozen=True)
class EnsureResult:
    """What :meth:`DataDir.ensure` created and what already existed."""

    created: tuple[DataDirItem, ...]
    existing: tuple[DataDirItem, ...]


def write_file_atomically(path: str, data: bytes, mode: int = 0o600, *, replace: bool) -> None:
    """
    Write ``data`` to ``path`` so that a reader sees either nothing (or the
    old file) or all of it: a temporary file in the same directory, created
    with ``mode`` (never widened afterwards), fsynced, then renamed into place
    and the directory fsynced.

    :param replace: replace an existing file; if false an existing file is an error.
    :raise FileExistsError: ``replace`` is false and ``path`` exists.
    :raise OSError: the file could not be written.
    """
    directory = os.path.dirname(path) or "."
    temp = os.path.join(directory, f"{_TEMP_PREFIX}{secrets.token_hex(8)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(temp, path)
        else:
            _link_no_clobber(temp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    _fsync_directory(directory)


def _link_no_clobber(temp: str, path: str) -> None:
    try:
        os.link(temp, path)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        # A file system without hard links: check, then rename (we hold the lock).
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "File exists", path) from None
        os.replace(temp, path)
        return
    os.unlink(temp)


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe(error: OSError) -> str:
    return error.strerror or str(error)


class DataDir:
    """
    The data directory of one gateway node (see the module docstring for the layout).

    :param path: the directory; created by :meth:`ensure` if missing.
    :param clock: seconds since the epoch; dates certificates and key records.
    :param suite_lookup: finds a cipher suite by name (default: the plugin registry).
    """

    def __init__(
        self,
        path: str,
        clock: Callable[[], float] = time.time,
        *,
        suite_lookup: Callable[[str], Any] | None = None,
    ) -> None:
        self.path = path
        self.clock = clock
        self._suite_lookup = suite_lookup or (lambda name: lookup(ICipherSuite, name))

    def __repr__(self) -> str:
        return f"DataDir({self.path!r})"

    # -- paths -----------------------------------------------------------------

    @property
    def keys_dir(self) -> str:
        """Where the server key files are."""
        return os.path.join(self.path, "keys")

    @property
    def tls_dir(self) -> str:
        """Where the TLS keys and certificates are."""
        return os.path.join(self.path, "tls")

    @property
    def sqlite_path(self) -> str:
        """The embedded store's database file."""
        return os.path.join(self.path, "m2mgw.sqlite")

    @property
    def lock_path(self) -> str:
        """The lock file that serialises changes to the keys."""
        return os.path.join(self.path, ".lock")

    @property
    def ca_key_path(self) -> str:
        """The application CA's private key (may be kept offline)."""
        return os.path.join(self.tls_dir, "ca-key.pem")

    @property
    def tls_paths(self) -> tuple[str, str, str]:
        """``(gateway_cert_path, gateway_key_path, app_ca_cert_path)``."""
        return (
            os.path.join(self.tls_dir, "gateway.pem"),
            os.path.join(self.tls_dir, "gateway-key.pem"),
            os.path.join(self.tls_dir, "ca.pem"),
        )

    def _server_key_path(self, skid: int, suite: str) -> str:
        return os.path.join(self.keys_dir, f"server-{skid}-{suite}.pem")

    # -- creating --------------------------------------------------------------

    def ensure(
        self,
        suites: Sequence[str],
        tls_key_type: str = "rsa",
        rsa_bits: int = 3072,
        *,
        tls_names: Sequence[str] = (),
    ) -> EnsureResult:
        """
        Create whatever is missing: the directories, one server key per suite
        that has none (each with a new ``skid``), the application CA and the
        gateway's TLS key and certificate.  Idempotent, and safe when several
        processes call it at once.  Everything that exists is checked.

        :param suites: the configured cipher suite names.
        :param tls_key_type: ``"rsa"`` or ``"ec"`` for new TLS keys.
        :param rsa_bits: the RSA modulus size for new TLS keys.
        :param tls_names: extra DNS names or addresses for the gateway
            certificate (``localhost``, ``127.0.0.1``, ``::1`` and the host
            name are always in it).
        :return: what was created and what existed.
        :raise m2mgw.errors.ConfigError: an unknown suite or key type, or a
            file or directory that cannot be read, written or parsed (the
            message names it).
        """
        if tls_key_type not in tls.TLS_KEY_TYPES:
            known = ", ".join(tls.TLS_KEY_TYPES)
            raise ConfigError(f"unknown TLS key type {tls_key_type!r} (known: {known})")
        resolved = [(name, self._suite(name)) for name in dict.fromkeys(suites)]
        created: list[DataDirItem] = []
        existing: list[DataDirItem] = []
        for directory in (self.path, self.keys_dir, self.tls_dir):
            item = DataDirItem("directory", directory)
            (created if self._make_directory(directory) else existing).append(item)
        with self._locked():
            self._remove_temporaries()
            present = self._scan_server_keys()
            configured = {name for name, _ in resolved}
            for skid, suite_name in present:
                if suite_name in configured:
                    self._load_server_key(skid, suite_name)  # check it
                    existing.append(self._server_key_item(skid, suite_name))
            have = {suite_name for _, suite_name in present}
            for name, suite in resolved:
                if name not in have:
                    record = self._create_server_key(name, suite, present)
                    present.append((record.skid, name))
                    created.append(self._server_key_item(record.skid, name))
            tls_created, tls_existing = self._ensure_tls(tls_key_type, rsa_bits, tls_names)
            created.extend(tls_created)
            existing.extend(tls_existing)
        return EnsureResult(tuple(created), tuple(existing))

    def add_server_key(self, suite: str) -> ServerKey:
        """
        Create one more server key pair for ``suite`` with a new ``skid``
        (server key rotation).  The data directory must exist.

        :return: the record to add to the store.
        :raise m2mgw.errors.ConfigError: unknown suite, or the directory is
            missing or not writable.
        """
        suite_object = self._suite(suite)
        if not os.path.isdir(self.keys_dir):
            raise ConfigError(f"{self.keys_dir} does not exist (run m2mgw-admin init)")
        with self._locked():
            return self._create_server_key(suite, suite_object, self._scan_server_keys())

    def issue_app_cert(
        self,
        name: str,
        out_dir: str,
        days: int = 825,
        *,
        key_type: str = "rsa",
        rsa_bits: int = 3072,
    ) -> tuple[str, str]:
        """
        Make a client key and a certificate for the application server
        ``name`` (the principal the gateway will see), signed by the
        application CA, in ``out_dir`` (created mode 0700 if missing):
        ``<name>.pem`` and ``<name>-key.pem`` (mode 0600).  Existing files are
        never overwritten.

        :return: ``(cert_path, key_path)``.
        :raise m2mgw.errors.ConfigError: a bad name, the CA key is not here,
            or the files exist or cannot be written.
        """
        if not tls.is_valid_app_name(name):
            raise ConfigError(
                f"bad application name {name!r}: use 1-64 letters, digits, '.', '_' or '-'"
            )
        cert_path = os.path.join(out_dir, f"{name}.pem")
        key_path = os.path.join(out_dir, f"{name}-key.pem")
        for path in (cert_path, key_path):
            if os.path.lexists(path):
                raise ConfigError(f"{path} already exists; remove it or choose another --out")
        ca_key, ca_certificate = self._load_ca()
        key = tls.generate_tls_key(key_type, rsa_bits)
        certificate = tls.issue_certificate(
            ca_key, ca_certificate, key.public_key(), name, self.clock(), days
        )
        self._make_directory(out_dir)
        try:
            write_file_atomically(key_path, tls.dump_private_key(key), 0o600, replace=False)
            write_file_atomically(
                cert_path, tls.dump_certificate(certificate), 0o644, replace=False
            )
        except FileExistsError as e:
            raise ConfigError(f"{e.filename} already exists; nothing was overwritten") from None
        except OSError as e:
            raise ConfigError(f"cannot write to {out_dir}: {_describe(e)}") from None
        return cert_path, key_path

    # -- reading ---------------------------------------------------------------

    def server_keys(self, suites: Sequence[str] | None = None) -> list[LoadedServerKey]:
        """
        Load the server key pairs, ``skid`` ascending.

        :param suites: only these suites (default: every key file).
        :raise m2mgw.errors.ConfigError: a key file is unreadable, too widely
            readable, corrupt, or of an unknown suite.
        """
        wanted = None if suites is None else set(suites)
        loaded = []
        for skid, suite in self._scan_server_keys():
            if wanted is None or suite in wanted:
                loaded.append(self._load_server_key(skid, suite))
        return loaded

    def server_key_files(self, suites: Sequence[str] | None = None) -> list[tuple[int, str]]:
        """
        The server key files as ``(skid, suite)``, ``skid`` ascending, without reading them.

        :param suites: only these suites (default: every key file).
        :raise m2mgw.errors.ConfigError: the directory is unreadable or holds a
            misnamed key file or one ``skid`` twice.
        """
        wanted = None if suites is None else set(suites)
        return [(s, n) for s, n in self._scan_server_keys() if wanted is None or n in wanted]

    def server_key_path(self, skid: int, suite: str) -> str:
        """The file of server key ``skid`` of ``suite``."""
        return self._server_key_path(skid, suite)

    def server_key(self, skid: int, suite: str) -> LoadedServerKey:
        """
        Load one server key pair.

        :raise m2mgw.errors.ConfigError: as :meth:`server_keys`.
        """
        return self._load_server_key(skid, suite)

    def server_key_records(self, suites: Sequence[str] | None = None) -> list[ServerKey]:
        """
        The store records of the server keys, ``skid`` ascending, each
        ``active`` and dated by its file (the store keeps the real status).

        :raise m2mgw.errors.ConfigError: as :meth:`server_keys`.
        """
        return [self._record(loaded) for loaded in self.server_keys(suites)]

    def tls_certificate_info(self) -> dict[str, Any]:
        """
        A summary of the TLS files for the operator: subjects, names, expiry,
        and whether the CA key is present.

        :raise m2mgw.errors.ConfigError: a certificate is missing or corrupt.
        """
        cert_path, _, ca_path = self.tls_paths
        gateway = tls.load_certificates(self._read(cert_path), cert_path)[0]
        authority = tls.load_certificates(self._read(ca_path), ca_path)[0]
        try:
            alt_names = gateway.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value
            names = [str(getattr(n, "value", n)) for n in alt_names]
        except LookupError:
            names = []
        return {
            "gateway_certificate": cert_path,
            "gateway_subject": gateway.subject.rfc4514_string(),
            "gateway_names": names,
            "gateway_not_after": int(gateway.not_valid_after_utc.timestamp()),
            "ca_certificate": ca_path,
            "ca_subject": authority.subject.rfc4514_string(),
            "ca_not_after": int(authority.not_valid_after_utc.timestamp()),
            "ca_key_present": os.path.exists(self.ca_key_path),
        }

    # -- internals: server keys ------------------------------------------------

    def _suite(self, name: str) -> Any:
        return self._suite_lookup(name)

    def _scan_server_keys(self) -> list[tuple[int, str]]:
        try:
            names = os.listdir(self.keys_dir)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise ConfigError(f"cannot read {self.keys_dir}: {_describe(e)}") from None
        found: dict[int, str] = {}
        for name in names:
            if not name.startswith("server-"):
                continue
            match = _SERVER_KEY_FILE.match(name)
            if match is None:
                raise ConfigError(
                    f"{os.path.join(self.keys_dir, name)}: not a server key file name "
                    "(expected server-<skid>-<suite>.pem)"
                )
            skid, suite = int(match.group(1)), match.group(2)
            if skid in found:
                raise ConfigError(
                    f"skid {skid} is used by two key files in {self.keys_dir} "
                    f"({found[skid]} and {suite})"
                )
            found[skid] = suite
        return sorted(found.items())

    def _load_server_key(self, skid: int, suite_name: str) -> LoadedServerKey:
        path = self._server_key_path(skid, suite_name)
        data = self._read_private(path)
        suite = self._suite(suite_name)
        try:
            key = suite.load_server_key(data)
            public, sig_public = suite.server_public(key)
        except CryptoError as e:
            raise ConfigError(f"{path}: not a {suite_name} server key ({e})") from None
        return LoadedServerKey(skid, suite_name, key, public, sig_public)

    def _record(self, loaded: LoadedServerKey) -> ServerKey:
        path = self._server_key_path(loaded.skid, loaded.suite)
        try:
            created_at = int(os.stat(path).st_mtime)
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {_describe(e)}") from None
        return ServerKey(
            skid=loaded.skid,
            suite=loaded.suite,
            public=loaded.public,
            sig_public=loaded.sig_public,
            status=ServerKeyStatus.ACTIVE,
            created_at=created_at,
        )

    def _server_key_item(self, skid: int, suite: str) -> DataDirItem:
        return DataDirItem(
            "server-key", self._server_key_path(skid, suite), f"skid {skid}, suite {suite}"
        )

    def _next_skid_path(self) -> str:
        return os.path.join(self.keys_dir, "next-skid")

    def _read_next_skid(self) -> int:
        path = self._next_skid_path()
        try:
            with open(path, "rb") as f:
                text = f.read(64)
        except FileNotFoundError:
            return 1
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {_describe(e)}") from None
        try:
            value = int(text.strip())
        except ValueError:
            raise ConfigError(f"{path}: corrupt (expected one integer)") from None
        if value < 1:
            raise ConfigError(f"{path}: corrupt (expected a positive integer)")
        return value

    def _create_server_key(
        self, suite_name: str, suite: Any, present: Sequence[tuple[int, str]]
    ) -> ServerKey:
        # Caller holds the lock.
        skid = max([self._read_next_skid(), *(s + 1 for s, _ in present)])
        key = suite.generate_server_key()
        data = suite.dump_server_key(key)
        public, sig_public = suite.server_public(key)
        path = self._server_key_path(skid, suite_name)
        now = self.clock()
        try:
            write_file_atomically(
                self._next_skid_path(), f"{skid + 1}\n".encode(), 0o600, replace=True
            )
            write_file_atomically(path, data, 0o600, replace=False)
            os.utime(path, (now, now))
        except FileExistsError:
            raise ConfigError(f"{path} appeared while it was being created") from None
        except OSError as e:
            raise ConfigError(f"cannot write {path}: {_describe(e)}") from None
        return ServerKey(
            skid=skid,
            suite=suite_name,
            public=public,
            sig_public=sig_public,
            status=ServerKeyStatus.ACTIVE,
            created_at=int(now),
        )

    # -- internals: TLS --------------------------------------------------------

    def _ensure_tls(
        self, key_type: str, rsa_bits: int, extra_names: Sequence[str]
    ) -> tuple[list[DataDirItem], list[DataDirItem]]:
        created: list[DataDirItem] = []
        existing: list[DataDirItem] = []
        cert_path, key_path, ca_path = self.tls_paths
        now = self.clock()
        ca_item = DataDirItem("tls-ca", ca_path, "application CA")
        ca_exists, ca_key_exists = os.path.lexists(ca_path), os.path.lexists(self.ca_key_path)
        if ca_key_exists and not ca_exists:
            raise ConfigError(
                f"{self.ca_key_path} exists but {ca_path} is missing; restore it or remove both"
            )
        if ca_exists:
            authority = tls.load_certificates(self._read(ca_path), ca_path)[0]
            if ca_key_exists:
                self._load_ca()
            existing.append(ca_item)
        else:
            ca_key = tls.generate_tls_key(key_type, rsa_bits)
            name = f"m2mgw application CA {socket.gethostname()} {secrets.token_hex(4)}"
            authority = tls.make_ca_certificate(ca_key, name, now)
            self._write_private(self.ca_key_path, tls.dump_private_key(ca_key))
            self._write_public(ca_path, tls.dump_certificate(authority))
            created.append(ca_item)

        gateway_item = DataDirItem("tls-gateway", cert_path, "gateway TLS certificate")
        cert_exists, key_exists = os.path.lexists(cert_path), os.path.lexists(key_path)
        if cert_exists != key_exists:
            there, missing = (cert_path, key_path) if cert_exists else (key_path, cert_path)
            raise ConfigError(f"{there} exists but {missing} is missing; restore it or remove both")
        if cert_exists:
            key = tls.load_private_key(self._read_private(key_path), key_path)
            chain = tls.load_certificates(self._read(cert_path), cert_path)
            if not tls.key_matches_certificate(key, chain[0]):
                raise ConfigError(
                    f"the key {key_path} does not belong to the certificate {cert_path}"
                )
            existing.append(gateway_item)
            return created, existing
        key, certificate = self._issue_gateway_certificate(key_type, rsa_bits, extra_names, 825)
        self._write_private(key_path, tls.dump_private_key(key))
        self._write_public(cert_path, tls.dump_certificate(certificate))
        created.append(gateway_item)
        return created, existing

    def _issue_gateway_certificate(
        self, key_type: str, rsa_bits: int, extra_names: Sequence[str], days: int
    ) -> tuple[tls.TLSPrivateKey, x509.Certificate]:
        ca_key, authority = self._load_ca()
        hostname = socket.gethostname()
        names = ["localhost", "127.0.0.1", "::1", hostname, *extra_names]
        key = tls.generate_tls_key(key_type, rsa_bits)
        certificate = tls.issue_certificate(
            ca_key,
            authority,
            key.public_key(),
            hostname or "localhost",
            self.clock(),
            days,
            server_names=names,
            server=True,
        )
        return key, certificate

    def renew_gateway_certificate(
        self,
        tls_key_type: str = "rsa",
        rsa_bits: int = 3072,
        *,
        tls_names: Sequence[str] = (),
        days: int = 825,
    ) -> str:
        """
        Replace the gateway's TLS key and certificate by a new pair issued by
        the application CA (whose key must be here).  Application servers
        trust the CA, so nothing changes for them; a running gateway serves
        the new certificate to new connections once it gets SIGHUP.  The key
        is written before the certificate, each atomically.

        :param tls_names: extra DNS names or addresses, as for :meth:`ensure`.
        :return: the certificate's path.
        :raise m2mgw.errors.ConfigError: no CA key, an unknown key type, or a
            file that cannot be written.
        """
        if tls_key_type not in tls.TLS_KEY_TYPES:
            known = ", ".join(tls.TLS_KEY_TYPES)
            raise ConfigError(f"unknown TLS key type {tls_key_type!r} (known: {known})")
        cert_path, key_path, _ = self.tls_paths
        key, certificate = self._issue_gateway_certificate(tls_key_type, rsa_bits, tls_names, days)
        with self._locked():
            try:
                write_file_atomically(key_path, tls.dump_private_key(key), 0o600, replace=True)
                write_file_atomically(
                    cert_path, tls.dump_certificate(certificate), 0o644, replace=True
                )
            except OSError as e:
                raise ConfigError(f"cannot write {cert_path}: {_describe(e)}") from None
        return cert_path

    def _load_ca(self) -> tuple[tls.TLSPrivateKey, x509.Certificate]:
        _, _, ca_path = self.tls_paths
        if not os.path.lexists(self.ca_key_path):
            raise ConfigError(
                f"the application CA key {self.ca_key_path} is not here; "
                "put it back to issue certificates"
            )
        ca_key = tls.load_private_key(self._read_private(self.ca_key_path), self.ca_key_path)
        authority = tls.load_certificates(self._read(ca_path), ca_path)[0]
        if not tls.key_matches_certificate(ca_key, authority):
            raise ConfigError(f"the key {self.ca_key_path} does not belong to {ca_path}")
        return ca_key, authority

    # -- internals: files ------------------------------------------------------

    def _make_directory(self, path: str) -> bool:
        try:
            os.makedirs(path, mode=0o700)
        except FileExistsError:
            if not os.path.isdir(path):
                raise ConfigError(f"{path} exists and is not a directory") from None
            return False
        except OSError as e:
            raise ConfigError(f"cannot create directory {path}: {_describe(e)}") from None
        return True

    def _read(self, path: str) -> bytes:
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_KEY_FILE + 1)
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {_describe(e)}") from None
        if len(data) > MAX_KEY_FILE:
            raise ConfigError(f"{path} is too large to be a key or certificate")
        return data

    def _read_private(self, path: str) -> bytes:
        """Read a private key file, refusing one that others may read (as ssh does)."""
        try:
            mode = os.stat(path).st_mode
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {_describe(e)}") from None
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{path} is not a regular file")
        if mode & 0o077:
            raise ConfigError(
                f"{path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
                f"run chmod 600 {path}"
            )
        return self._read(path)

    def _write_private(self, path: str, data: bytes) -> None:
        try:
            write_file_atomically(path, data, 0o600, replace=False)
        except FileExistsError:
            raise ConfigError(f"{path} appeared while it was being created") from None
        except OSError as e:
            raise ConfigError(f"cannot write {path}: {_describe(e)}") from None

    def _write_public(self, path: str, data: bytes) -> None:
        try:
            write_file_atomically(path, data, 0o644, replace=False)
        except FileExistsError:
            raise ConfigError(f"{path} appeared while it was being created") from None
        except OSError as e:
            raise ConfigError(f"cannot write {path}: {_describe(e)}") from None

    def _remove_temporaries(self) -> None:
        # Left by a writer that died between creating and renaming; we hold the lock.
        for directory in (self.keys_dir, self.tls_dir):
            try:
                names = os.listdir(directory)
            except OSError:
                continue
            for name in names:
                if name.startswith(_TEMP_PREFIX):
                    with suppress(FileNotFoundError):
                        os.unlink(os.path.join(directory, name))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise ConfigError(f"cannot open {self.lock_path}: {_describe(e)}") from None
        try:
            deadline = time.monotonic() + LOCK_TIMEOUT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ConfigError(
                            f"{self.path} is locked by another process (lock file "
                            f"{self.lock_path}); try again"
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # also releases the lock


def gateway_tls_names(node_name: str, app_address: str = "") -> list[str]:
    """
    The extra names for the gateway certificate that the gateway and
    ``m2mgw-admin init`` both use: the node name and the application
    listener's address, if it is a specific one.
    """
    return [node_name] + ([app_address] if app_address else [])


async def register_server_keys(
    store: IModuleStore, records: Sequence[ServerKey]
) -> list[ServerKey]:
    """
    Add to ``store`` the server key records it does not know yet (by
    ``skid``); a record another process added meanwhile is not an error.

    :return: the records that were added.
    """
    known = {record.skid for record in await store.list_server_keys()}
    added = []
    for record in records:
        if record.skid in known:
            continue
        try:
            await store.add_server_key(record)
        except KeyConflict:
            continue
        added.append(record)
    return added
