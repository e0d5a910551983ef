"""
Tests for :mod:`m2mgw.datadir`: the layout, file modes, skid assignment,
idempotence, concurrent creation and the errors for damaged files.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from m2mgw import tls
from m2mgw.datadir import DataDir, LoadedServerKey, register_server_keys, write_file_atomically
from m2mgw.errors import ConfigError, UnknownPlugin
from m2mgw.interfaces import ICipherSuite
from m2mgw.records import ServerKey, ServerKeyStatus
from m2mgw.registry import lookup

#: Fast suites (no RSA key generation) for most tests.
EC_SUITES = ["p256", "p256-ccm8", "p384", "x25519"]

NOW = 1_750_000_000


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def key_files(directory: DataDir) -> list[str]:
    return sorted(n for n in os.listdir(directory.keys_dir) if n.startswith("server-"))


@pytest.fixture
def datadir(tmp_path: Path) -> DataDir:
    return DataDir(str(tmp_path / "var" / "m2mgw"), clock=lambda: NOW)


def test_ensure_creates_the_layout(datadir: DataDir) -> None:
    result = datadir.ensure(EC_SUITES, tls_key_type="ec")
    assert [i.kind for i in result.created] == [
        "directory",
        "directory",
        "directory",
        "server-key",
        "server-key",
        "server-key",
        "server-key",
        "tls-ca",
        "tls-gateway",
    ]
    assert result.existing == ()
    for directory in (datadir.path, datadir.keys_dir, datadir.tls_dir):
        assert mode(directory) == 0o700
    assert key_files(datadir) == [
        "server-1-p256.pem",
        "server-2-p256-ccm8.pem",
        "server-3-p384.pem",
        "server-4-x25519.pem",
    ]
    cert, key, ca = datadir.tls_paths
    for private in [*(os.path.join(datadir.keys_dir, n) for n in key_files(datadir)), key]:
        assert mode(private) == 0o600
    assert mode(datadir.ca_key_path) == 0o600
    assert mode(cert) == mode(ca) == 0o644
    assert datadir.sqlite_path == os.path.join(datadir.path, "m2mgw.sqlite")
    # no temporary files left behind
    assert not [
        n for d in (datadir.keys_dir, datadir.tls_dir) for n in os.listdir(d) if n.startswith(".")
    ]


def test_modes_do_not_depend_on_the_umask(datadir: DataDir) -> None:
    old = os.umask(0)
    try:
        datadir.ensure(["p256"], tls_key_type="ec")
    finally:
        os.umask(old)
    assert mode(datadir.keys_dir) == 0o700
    assert mode(os.path.join(datadir.keys_dir, "server-1-p256.pem")) == 0o600
    assert mode(datadir.tls_paths[1]) == 0o600


def test_ensure_is_idempotent(datadir: DataDir) -> None:
    datadir.ensure(EC_SUITES, tls_key_type="ec")
    before = {
        name: Path(datadir.keys_dir, name).read_bytes() for name in os.listdir(datadir.keys_dir)
    }
    tls_before = [Path(p).read_bytes() for p in datadir.tls_paths]
    result = datadir.ensure(EC_SUITES, tls_key_type="ec")
    assert result.created == ()
    assert len(result.existing) == 3 + 4 + 2
    after = {
        name: Path(datadir.keys_dir, name).read_bytes() for name in os.listdir(datadir.keys_dir)
    }
    assert after == before
    assert [Path(p).read_bytes() for p in datadir.tls_paths] == tls_before


def test_a_new_suite_gets_the_next_skid(datadir: DataDir) -> None:
    datadir.ensure(["p256"], tls_key_type="ec")
    result = datadir.ensure(["p256", "x25519"], tls_key_type="ec")
    assert [(i.kind, i.detail) for i in result.created] == [("server-key", "skid 2, suite x25519")]
    assert [k.skid for k in datadir.server_keys()] == [1, 2]
    assert [k.skid for k in datadir.server_keys(["x25519"])] == [2]


def test_skids_are_never_reused(datadir: DataDir) -> None:
    datadir.ensure(["p256", "p384"], tls_key_type="ec")
    added = datadir.add_server_key("p256")
    assert added.skid == 3 and added.suite == "p256"
    os.unlink(os.path.join(datadir.keys_dir, "server-3-p256.pem"))
    os.unlink(os.path.join(datadir.keys_dir, "server-2-p384.pem"))
    assert datadir.add_server_key("p384").skid == 4
    # A high-water mark behind the files (restored from an old backup) is overtaken.
    Path(datadir.keys_dir, "next-skid").write_text("1\n")
    assert datadir.add_server_key("p256").skid == 5


def test_loaded_keys_and_records(datadir: DataDir) -> None:
    datadir.ensure(["p256", "x25519"], tls_key_type="ec")
    loaded = datadir.server_keys()
    assert [(k.skid, k.suite) for k in loaded] == [(1, "p256"), (2, "x25519")]
    for key in loaded:
        suite = lookup(ICipherSuite, key.suite)
        assert suite.server_public(key.key) == (key.public, key.sig_public)
    assert loaded[0].sig_public is None and loaded[1].sig_public is not None
    assert datadir.server_key_records() == [
        ServerKey(1, "p256", loaded[0].public, None, ServerKeyStatus.ACTIVE, NOW),
        ServerKey(2, "x25519", loaded[1].public, loaded[1].sig_public, ServerKeyStatus.ACTIVE, NOW),
    ]


def test_private_keys_stay_out_of_reprs(datadir: DataDir) -> None:
    datadir.ensure(["p256"], tls_key_type="ec")
    loaded = datadir.server_keys()[0]
    pem = Path(datadir.keys_dir, "server-1-p256.pem").read_bytes()
    text = repr(loaded)
    assert "key=" not in text and "PRIVATE" not in text
    assert repr(loaded.key) not in text
    assert pem.decode() not in text
    assert LoadedServerKey(1, "p256", object(), b"p", None) == LoadedServerKey(
        1, "p256", object(), b"p", None
    )


def test_add_server_key_needs_the_directory(datadir: DataDir) -> None:
    with pytest.raises(ConfigError, match="run m2mgw-admin init"):
        datadir.add_server_key("p256")


def test_unknown_suite_lists_the_known_ones(datadir: DataDir) -> None:
    with pytest.raises(UnknownPlugin, match=r"unknown cipher suite 'p999' \(known: .*p256"):
        datadir.ensure(["p999"], tls_key_type="ec")
    assert not os.path.exists(datadir.path)  # checked before anything is created


def test_unknown_tls_key_type(datadir: DataDir) -> None:
    with pytest.raises(ConfigError, match="unknown TLS key type 'dsa'"):
        datadir.ensure([], tls_key_type="dsa")


def test_path_that_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ConfigError, match=f"{target} exists and is not a directory"):
        DataDir(str(target)).ensure([], tls_key_type="ec")


def _key(d: DataDir, name: str) -> Path:
    return Path(d.keys_dir, name)


DAMAGE: dict[str, tuple[Any, str]] = {
    "corrupt key": (
        lambda d: _key(d, "server-1-p256.pem").write_bytes(b"junk"),
        r"server-1-p256\.pem: not a p256 server key",
    ),
    "readable key": (
        lambda d: os.chmod(_key(d, "server-1-p256.pem"), 0o644),
        r"server-1-p256\.pem is accessible by group or others \(mode 0644\); run chmod 600",
    ),
    "bad name": (
        lambda d: _key(d, "server-x-p256.pem").write_bytes(b""),
        r"server-x-p256\.pem: not a server key file name",
    ),
    "skid twice": (
        lambda d: _key(d, "server-1-p384.pem").write_bytes(b""),
        r"skid 1 is used by two key files",
    ),
    "corrupt high-water mark": (
        lambda d: _key(d, "next-skid").write_text("many"),
        r"next-skid: corrupt",
    ),
    "gateway key missing": (
        lambda d: os.unlink(d.tls_paths[1]),
        r"gateway\.pem exists but .*gateway-key\.pem is missing",
    ),
    "CA certificate missing": (
        lambda d: os.unlink(d.tls_paths[2]),
        r"ca-key\.pem exists but .*ca\.pem is missing",
    ),
    "corrupt certificate": (
        lambda d: Path(d.tls_paths[0]).write_bytes(b"junk"),
        r"gateway\.pem: not a PEM certificate",
    ),
}


@pytest.mark.parametrize(("damage", "message"), DAMAGE.values(), ids=DAMAGE.keys())
def test_damaged_files_are_reported_with_their_path(
    datadir: DataDir, damage: Any, message: str
) -> None:
    datadir.ensure(["p256"], tls_key_type="ec")
    damage(datadir)
    with pytest.raises(ConfigError, match=message):
        datadir.ensure(["p256"], tls_key_type="ec")
        datadir.add_server_key("p256")  # next-skid is read when a key is made


def test_unreadable_key_file(datadir: DataDir) -> None:
    datadir.ensure(["p256"], tls_key_type="ec")
    path = os.path.join(datadir.keys_dir, "server-1-p256.pem")
    os.unlink(path)
    os.mkdir(path, 0o700)  # cannot be read as a file, even by root
    with pytest.raises(ConfigError, match=f"{path} is not a regular file"):
        datadir.server_keys()


def test_mismatched_gateway_key(datadir: DataDir) -> None:
    datadir.ensure([], tls_key_type="ec")
    _, key_path, _ = datadir.tls_paths
    os.unlink(key_path)
    write_file_atomically(key_path, tls.dump_private_key(tls.generate_tls_key("ec")), replace=False)
    with pytest.raises(ConfigError, match="does not belong to the certificate"):
        datadir.ensure([], tls_key_type="ec")


def test_unwritable_directory(tmp_path: Path) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    (parent / "keys").write_text("a file where the keys directory should be")
    datadir = DataDir(str(parent))
    with pytest.raises(ConfigError, match="keys exists and is not a directory"):
        datadir.ensure(["p256"], tls_key_type="ec")


def test_offline_ca_key(datadir: DataDir, tmp_path: Path) -> None:
    datadir.ensure([], tls_key_type="ec")
    os.unlink(datadir.ca_key_path)
    datadir.ensure([], tls_key_type="ec")  # the gateway runs without it
    with pytest.raises(ConfigError, match=r"CA key .* is not here"):
        datadir.issue_app_cert("billing", str(tmp_path / "out"), key_type="ec")


def test_issue_app_cert(datadir: DataDir, tmp_path: Path) -> None:
    datadir.ensure([], tls_key_type="ec")
    out = tmp_path / "new" / "out"
    cert_path, key_path = datadir.issue_app_cert("billing", str(out), days=10, key_type="ec")
    assert (cert_path, key_path) == (str(out / "billing.pem"), str(out / "billing-key.pem"))
    assert mode(str(out)) == 0o700
    assert mode(key_path) == 0o600
    certificate = tls.load_certificates(Path(cert_path).read_bytes(), cert_path)[0]
    authority = tls.load_certificates(Path(datadir.tls_paths[2]).read_bytes(), "ca")[0]
    assert tls.is_issued_by(certificate, authority)
    assert tls.certificate_common_name(certificate) == "billing"
    usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert certificate.not_valid_after_utc.timestamp() == NOW + 10 * 86400
    key = tls.load_private_key(Path(key_path).read_bytes(), key_path)
    assert tls.key_matches_certificate(key, certificate)
    with pytest.raises(ConfigError, match="already exists"):
        datadir.issue_app_cert("billing", str(out), key_type="ec")
    with pytest.raises(ConfigError, match="bad application name"):
        datadir.issue_app_cert("bad name", str(out), key_type="ec")


def test_default_tls_is_rsa_3072(datadir: DataDir) -> None:
    datadir.ensure([])
    certificate = tls.load_certificates(Path(datadir.tls_paths[0]).read_bytes(), "gw")[0]
    assert certificate.public_key().key_size == 3072  # type: ignore[union-attr]
    info = datadir.tls_certificate_info()
    assert "localhost" in info["gateway_names"] and "127.0.0.1" in info["gateway_names"]
    assert info["ca_key_present"] is True


def test_write_file_atomically(tmp_path: Path) -> None:
    path = str(tmp_path / "secret")
    write_file_atomically(path, b"one", 0o600, replace=False)
    with pytest.raises(FileExistsError):
        write_file_atomically(path, b"two", 0o600, replace=False)
    assert Path(path).read_bytes() == b"one"
    write_file_atomically(path, b"three", 0o600, replace=True)
    assert Path(path).read_bytes() == b"three" and mode(path) == 0o600
    with pytest.raises(FileNotFoundError):
        write_file_atomically(str(tmp_path / "missing" / "x"), b"", replace=False)
    assert sorted(os.listdir(tmp_path)) == ["secret"]


def test_stale_temporary_files_are_removed(datadir: DataDir) -> None:
    datadir.ensure(["p256"], tls_key_type="ec")
    stale = Path(datadir.keys_dir, ".tmp-deadbeef")
    stale.write_bytes(b"half a key")
    datadir.ensure(["p256"], tls_key_type="ec")
    assert not stale.exists()


def test_concurrent_threads_create_one_key_per_suite(datadir: DataDir) -> None:
    errors: list[BaseException] = []

    def work() -> None:
        try:
            DataDir(datadir.path).ensure(EC_SUITES, tls_key_type="ec")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [k.suite for k in datadir.server_keys()] == EC_SUITES
    assert [k.skid for k in datadir.server_keys()] == [1, 2, 3, 4]


def test_concurrent_processes_create_one_key_per_suite(datadir: DataDir) -> None:
    script = (
        "import sys; from m2mgw.datadir import DataDir; "
        "DataDir(sys.argv[1]).ensure(sys.argv[2].split(','), tls_key_type='ec')"
    )
    processes = [
        subprocess.Popen([sys.executable, "-c", script, datadir.path, ",".join(EC_SUITES)])
        for _ in range(3)
    ]
    assert [p.wait(timeout=60) for p in processes] == [0, 0, 0]
    assert [(k.skid, k.suite) for k in datadir.server_keys()] == list(
        zip([1, 2, 3, 4], EC_SUITES, strict=True)
    )
    assert os.listdir(datadir.tls_dir).count("gateway.pem") == 1


@pytest.mark.parametrize("suite", ["rsa"])
def test_rsa_suite_key(datadir: DataDir, suite: str) -> None:
    datadir.ensure([suite], tls_key_type="ec")
    (loaded,) = datadir.server_keys()
    assert loaded.suite == "rsa" and loaded.public[:1] == b"\x30"


class RecordingStore:
    """Just enough of a store for :func:`register_server_keys`."""

    def __init__(self, known: list[ServerKey]) -> None:
        self.keys = list(known)

    def list_server_keys(self) -> Any:
        from twisted.internet.defer import succeed

        return succeed(list(self.keys))

    def add_server_key(self, key: ServerKey) -> Any:
        from twisted.internet.defer import fail, succeed

        from m2mgw.errors import KeyConflict

        if key.skid == 99:  # another process registered it meanwhile
            return fail(KeyConflict("99"))
        self.keys.append(key)
        return succeed(None)


def test_register_server_keys() -> None:
    from twisted.internet.defer import ensureDeferred

    one = ServerKey(1, "p256", b"\x04" + b"\x01" * 64)
    two = ServerKey(2, "p384", b"\x04" + b"\x02" * 96)
    raced = ServerKey(99, "p256", b"\x04" + b"\x03" * 64)
    store = RecordingStore([one])
    result: list[Any] = []
    ensureDeferred(register_server_keys(store, [one, two, raced])).addCallback(result.append)  # type: ignore[arg-type]
    assert result == [[two]]
    assert store.keys == [one, two]
