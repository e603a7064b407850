"""Provisioning a federation's private CA and one certificate per node, on the
operator's machine (`jetfed certs`), so services can speak mutual TLS without a
public CA: a node trusts exactly the peers this CA signed, and the role recorded
in each certificate (OU) lets a server decide who may call what."""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

try:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
except ImportError as exc:  # the "certs" extra lives on operators' machines, not boards
    raise ImportError("jetfed certs needs the 'cryptography' package: pip install "
                      "'<checkout or jetfed wheel>[certs]' (jetfed is not on PyPI)") from exc

from jetfed.errors import InvalidConfig

ORGANIZATION = "jetfed"
ROLES = ("coordinator", "worker", "evaluator")
# Boards often boot with a wrong clock until NTP syncs; a day of slack keeps a freshly
# issued certificate from being "not yet valid" there.
CLOCK_SLACK = datetime.timedelta(days=1)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
DNS_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$")
ALWAYS_HOSTS = ("localhost", "127.0.0.1")
# Every node both serves (workers, the evaluator, the coordinator's status service) and
# calls (the coordinator dials the fleet; any member may read the status).
EKU = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]


@dataclass(frozen=True)
class Node:
    """A member of the federation: its name (CN and folder), role (OU) and the hosts
    (DNS names, IP addresses) peers dial it by, which become its SANs."""

    name: str
    role: str
    hosts: Tuple[str, ...] = ()


@dataclass
class Provisioned:
    """What `provision` wrote: the CA certificate, whether it is new, and each node's folder."""

    ca_cert: Path
    ca_created: bool
    nodes: Dict[str, Path] = field(default_factory=dict)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write through a temporary name so a crash never leaves half a key; the mode is
    set on the open file so a private key is never readable by others, even briefly."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _check_node(node: Node) -> None:
    if not NAME.match(node.name):
        raise InvalidConfig(f"{node.role} {node.name!r}: a name is 1-63 letters, digits, '.', '_' or '-'")
    if node.role not in ROLES:
        raise InvalidConfig(f"{node.name}: role {node.role!r} is not one of {', '.join(ROLES)}")
    for host in node.hosts:
        if not DNS_NAME.match(host) and not _is_ip(host):
            raise InvalidConfig(f"{node.role} {node.name!r}: host {host!r} is neither a DNS name nor an IP address")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _san(node: Node) -> x509.SubjectAlternativeName:
    hosts = list(dict.fromkeys([node.name, *ALWAYS_HOSTS, *node.hosts]))
    names: List[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h) for h in hosts
    ]
    return x509.SubjectAlternativeName(names)


def _create_ca(out_dir: Path, days: int) -> Tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        x509.NameAttribute(NameOID.COMMON_NAME, f"{ORGANIZATION} federation CA"),
    ])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SLACK).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
        ), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    _write(out_dir / "ca.key", _key_pem(key), 0o600)
    _write(out_dir / "ca.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert, key


def _load_ca(out_dir: Path) -> Tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((out_dir / "ca.crt").read_bytes())
        key = serialization.load_pem_private_key((out_dir / "ca.key").read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise InvalidConfig(f"cannot load the CA from {out_dir}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidConfig(f"{out_dir / 'ca.key'} is not an EC key")
    return cert, key


def _issue(node: Node, folder: Path, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, days: int) -> None:
    """Sign `node`'s certificate; it never outlives the CA, which would only make it
    fail later with a more confusing error."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    not_after = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, node.role),
        x509.NameAttribute(NameOID.COMMON_NAME, node.name),
    ])
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SLACK).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
        ), critical=True)
        .add_extension(x509.ExtendedKeyUsage(EKU), critical=False)
        .add_extension(_san(node), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    _write(folder / f"{node.name}.key", _key_pem(key), 0o600)
    _write(folder / f"{node.name}.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(folder / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)


def federation(
    coordinator: Optional[str],
    workers: Mapping[str, Sequence[str]],
    evaluator: Optional[Tuple[str, Sequence[str]]] = None,
    coordinator_hosts: Sequence[str] = (),
) -> List[Node]:
    """The nodes of a federation given the way people name them; a name used twice is
    an error, since it would be one folder and one identity."""
    nodes = [Node(coordinator, "coordinator", tuple(coordinator_hosts))] if coordinator else []
    nodes += [Node(name, "worker", tuple(hosts)) for name, hosts in workers.items()]
    if evaluator:
        nodes.append(Node(evaluator[0], "evaluator", tuple(evaluator[1])))
    seen: Dict[str, str] = {}
    for node in nodes:
        _check_node(node)
        if node.name in seen:
            raise InvalidConfig(f"{node.name!r} is named as both {seen[node.name]} and {node.role}")
        seen[node.name] = node.role
    return nodes


def provision(
    out_dir: Path,
    coordinator: Optional[str],
    workers: Mapping[str, Sequence[str]],
    evaluator: Optional[Tuple[str, Sequence[str]]] = None,
    days: int = 825,
    *,
    coordinator_hosts: Sequence[str] = (),
    overwrite: bool = False,
    add: bool = False,
) -> Provisioned:
    """Write `out_dir/ca.{crt,key}` and `out_dir/<node>/{<node>.crt,<node>.key,ca.crt}`.

    A new CA invalidates every certificate already handed out, so an existing one is
    kept: `add=True` signs more nodes with it, `overwrite=True` replaces it (and any
    node folder named again). 825 days is the longest lifetime clients commonly accept.
    """
    if days < 1:
        raise InvalidConfig(f"days must be at least 1 (got {days})")
    nodes = federation(coordinator, workers, evaluator, coordinator_hosts)
    if not nodes:
        raise InvalidConfig("name at least one node to provision")
    out_dir = Path(out_dir)
    has_ca = (out_dir / "ca.key").exists() or (out_dir / "ca.crt").exists()
    if add and not has_ca:
        raise InvalidConfig(f"{out_dir} holds no CA to add nodes to; provision without add first")
    if not add and has_ca and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a CA; add nodes to it with add=True (--add), or replace it "
                              "and every certificate it signed with overwrite=True (--overwrite)")
    if not add and coordinator is None:
        raise InvalidConfig("a new federation needs a coordinator")
    if not overwrite:
        taken = [n.name for n in nodes if (out_dir / n.name).exists()]
        if taken:
            raise FileExistsError(f"{out_dir} already holds {', '.join(taken)}; pass overwrite=True (--overwrite) to re-issue")
    ca_cert, ca_key = _load_ca(out_dir) if add else _create_ca(out_dir, days)
    result = Provisioned(out_dir / "ca.crt", not add)
    for node in nodes:
        _issue(node, out_dir / node.name, ca_cert, ca_key, days)
        result.nodes[node.name] = out_dir / node.name
    return result


def _named_hosts(value: str) -> Tuple[str, List[str]]:
    name, _, hosts = value.partition("=")
    return name, [h.strip() for h in hosts.split(",") if h.strip()]


def main(argv: Optional[List[str]] = None) -> int:
    """`jetfed certs`: provision a federation and say which folder goes onto which board."""
    p = argparse.ArgumentParser(prog="jetfed certs", description=__doc__)
    p.add_argument("--out", type=Path, required=True, help="folder for ca.crt, ca.key and one folder per node")
    p.add_argument("--coordinator", type=_named_hosts, metavar="NAME[=HOST,...]",
                   help="the coordinator and the DNS names/IPs its status service is dialled by")
    p.add_argument("--worker", type=_named_hosts, action="append", default=[], metavar="NAME[=HOST,...]",
                   help="a worker and the DNS names/IPs it is dialled by (repeat for each)")
    p.add_argument("--evaluator", type=_named_hosts, metavar="NAME[=HOST,...]", help="the evaluator")
    p.add_argument("--days", type=int, default=825, help="certificate lifetime (default 825)")
    p.add_argument("--add", action="store_true", help="sign the nodes named with the CA already in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing CA or node (old certificates stop working)")
    args = p.parse_args(argv)
    workers = dict(args.worker)
    if len(workers) != len(args.worker):
        print("jetfed certs: a --worker name is given twice", file=sys.stderr)
        return 2
    coordinator, coordinator_hosts = args.coordinator or (None, [])
    try:
        done = provision(args.out, coordinator, workers, args.evaluator, args.days,
                         coordinator_hosts=coordinator_hosts, overwrite=args.overwrite, add=args.add)
    except (InvalidConfig, FileExistsError) as exc:
        print(f"jetfed certs: {exc}", file=sys.stderr)
        return 2
    print(f"{'wrote' if done.ca_created else 'used'} CA {done.ca_cert} (keep {args.out / 'ca.key'} off the boards)")
    for name, folder in done.nodes.items():
        print(f"  {folder}/: copy onto {name}, then run with "
              f"--tls-cert {name}.crt --tls-key {name}.key --tls-ca ca.crt (paths where you copied them)")
    return 0
