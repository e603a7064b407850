from __future__ import annotations

import datetime
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jetfed import certs
from jetfed.errors import InvalidConfig

WORKERS = {"alice": ["alice.local", "10.0.0.11"], "bob": []}


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def attribute(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str:
    return cert.subject.get_attributes_for_oid(oid)[0].value


def sans(cert: x509.Certificate) -> tuple:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName), san.get_values_for_type(x509.IPAddress)


def eku(cert: x509.Certificate) -> set:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


@pytest.fixture
def fed(tmp_path: Path) -> Path:
    out = tmp_path / "fed"
    certs.provision(out, "coord", WORKERS, ("testing", ["eval.lan"]))
    return out


def test_layout_is_ready_to_copy_onto_each_board(fed: Path):
    assert sorted(p.name for p in fed.iterdir()) == ["alice", "bob", "ca.crt", "ca.key", "coord", "testing"]
    for node in ("coord", "alice", "bob", "testing"):
        assert sorted(p.name for p in (fed / node).iterdir()) == sorted(["ca.crt", f"{node}.crt", f"{node}.key"])
        assert (fed / node / "ca.crt").read_bytes() == (fed / "ca.crt").read_bytes()


def test_private_keys_are_readable_by_the_owner_only(fed: Path):
    keys = [fed / "ca.key", *(fed / n / f"{n}.key" for n in ("coord", "alice", "bob", "testing"))]
    assert {stat.S_IMODE(k.stat().st_mode) for k in keys} == {0o600}
    assert not list(fed.rglob("*.tmp"))


def test_ca_is_a_p256_ca_that_signs_only_leaves(fed: Path):
    ca = load(fed / "ca.crt")
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp256r1"
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    ca.verify_directly_issued_by(ca)


@pytest.mark.parametrize("node,role", [("coord", "coordinator"), ("alice", "worker"), ("testing", "evaluator")])
def test_node_certificate_names_the_node_and_its_role(fed: Path, node: str, role: str):
    cert = load(fed / node / f"{node}.crt")
    assert attribute(cert, NameOID.COMMON_NAME) == node
    assert attribute(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) == role
    assert eku(cert) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    cert.verify_directly_issued_by(load(fed / "ca.crt"))
    key = serialization.load_pem_private_key((fed / node / f"{node}.key").read_bytes(), password=None)
    assert key.public_key() == cert.public_key()


def test_sans_hold_the_hosts_given_plus_name_and_loopback(fed: Path):
    dns, ips = sans(load(fed / "alice" / "alice.crt"))
    assert dns == ["alice", "localhost", "alice.local"]
    assert ips == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.0.0.11")]
    assert sans(load(fed / "bob" / "bob.crt")) == (["bob", "localhost"], [ipaddress.ip_address("127.0.0.1")])


def test_lifetime_follows_days_with_slack_for_a_late_clock(tmp_path: Path):
    certs.provision(tmp_path, "coord", {"alice": []}, days=30)
    cert = load(tmp_path / "alice" / "alice.crt")
    now = datetime.datetime.now(datetime.timezone.utc)
    assert cert.not_valid_before_utc < now - datetime.timedelta(hours=23)
    assert abs(cert.not_valid_after_utc - (now + datetime.timedelta(days=30))) < datetime.timedelta(minutes=5)


def test_an_existing_ca_is_never_replaced_silently(fed: Path):
    before = (fed / "ca.crt").read_bytes()
    with pytest.raises(FileExistsError, match="already holds a CA"):
        certs.provision(fed, "coord2", {"carol": []})
    assert (fed / "ca.crt").read_bytes() == before
    assert not (fed / "carol").exists()


def test_overwrite_replaces_the_ca(fed: Path):
    before = load(fed / "ca.crt")
    certs.provision(fed, "coord", {"alice": []}, overwrite=True)
    after = load(fed / "ca.crt")
    assert after.serial_number != before.serial_number
    load(fed / "alice" / "alice.crt").verify_directly_issued_by(after)


def test_a_node_added_later_is_signed_by_the_same_ca(fed: Path):
    alice = (fed / "alice" / "alice.crt").read_bytes()
    done = certs.provision(fed, None, {"carol": ["10.0.0.13"]}, days=5000, add=True)
    assert not done.ca_created and done.nodes == {"carol": fed / "carol"}
    ca = load(fed / "ca.crt")
    carol = load(fed / "carol" / "carol.crt")
    carol.verify_directly_issued_by(ca)
    assert attribute(carol, NameOID.ORGANIZATIONAL_UNIT_NAME) == "worker"
    assert carol.not_valid_after_utc <= ca.not_valid_after_utc
    assert (fed / "alice" / "alice.crt").read_bytes() == alice


def test_adding_a_node_that_exists_needs_overwrite(fed: Path):
    with pytest.raises(FileExistsError, match="alice"):
        certs.provision(fed, None, {"alice": []}, add=True)
    certs.provision(fed, None, {"alice": []}, add=True, overwrite=True)
    load(fed / "alice" / "alice.crt").verify_directly_issued_by(load(fed / "ca.crt"))


def test_adding_needs_a_ca(tmp_path: Path):
    with pytest.raises(InvalidConfig, match="no CA"):
        certs.provision(tmp_path, None, {"carol": []}, add=True)


@pytest.mark.parametrize("coordinator,workers,evaluator,match", [
    ("coord", {"../evil": []}, None, "name"),
    ("coord", {"a b": []}, None, "name"),
    ("coord", {"alice": ["bad host"]}, None, "host"),
    ("alice", {"alice": []}, None, "both coordinator and worker"),
    (None, {"alice": []}, None, "coordinator"),
])
def test_bad_names_are_refused_before_anything_is_written(tmp_path, coordinator, workers, evaluator, match):
    with pytest.raises(InvalidConfig, match=match):
        certs.provision(tmp_path / "fed", coordinator, workers, evaluator)
    assert not (tmp_path / "fed").exists()


def test_command_line_writes_and_says_what_to_copy(tmp_path: Path, capsys):
    out = tmp_path / "fed"
    argv = ["--out", str(out), "--coordinator", "coord", "--worker", "alice=alice.local,10.0.0.11",
            "--worker", "bob", "--evaluator", "testing=eval.lan", "--days", "90"]
    assert certs.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"{out / 'alice'}/" in printed and "--tls-cert alice.crt" in printed
    assert sans(load(out / "alice" / "alice.crt"))[0] == ["alice", "localhost", "alice.local"]
    assert certs.main(argv) == 2
    assert "already holds a CA" in capsys.readouterr().err
    assert certs.main(["--out", str(out), "--add", "--worker", "carol=10.0.0.13"]) == 0
    load(out / "carol" / "carol.crt").verify_directly_issued_by(load(out / "ca.crt"))
