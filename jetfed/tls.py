"""TLS credentials for gRPC from the files `jetfed certs` writes, and the flags every
service shares to name them. TLS is opt-in so a laptop demo still runs with no
files, but plaintext is said out loud in the log, never silently assumed."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import grpc

from jetfed.errors import InvalidConfig

FLAGS = {"cert": "--tls-cert", "key": "--tls-key", "ca": "--tls-ca"}
ENV = {"cert": "JETFED_TLS_CERT", "key": "JETFED_TLS_KEY", "ca": "JETFED_TLS_CA"}


def _read(path: Path, flag: str) -> bytes:
    """Read a PEM file now, at start-up, so a typo fails with the flag's name instead of
    as a handshake error on the first RPC."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidConfig(f"{flag} {path}: cannot read ({exc.strerror or exc})") from exc
    if b"-----BEGIN " not in data:
        raise InvalidConfig(f"{flag} {path}: not a PEM file")
    return data


def server_credentials(cert: Path, key: Path, ca: Optional[Path] = None) -> grpc.ServerCredentials:
    """Credentials for a server presenting `cert`; with `ca`, mutual TLS: every client must
    present a certificate signed by `ca` (gRPC only asks for one when it requires it)."""
    pair = (_read(key, FLAGS["key"]), _read(cert, FLAGS["cert"]))
    root = _read(ca, FLAGS["ca"]) if ca is not None else None
    return grpc.ssl_server_credentials([pair], root_certificates=root, require_client_auth=root is not None)


def channel_credentials(ca: Path, cert: Optional[Path] = None, key: Optional[Path] = None) -> grpc.ChannelCredentials:
    """Credentials for a client that trusts only `ca` (not the system store: the
    federation's CA is private) and, given `cert` and `key`, proves who it is."""
    if (cert is None) != (key is None):
        raise InvalidConfig(f"{FLAGS['cert']} and {FLAGS['key']} go together")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, FLAGS["ca"]),
        private_key=_read(key, FLAGS["key"]) if key is not None else None,
        certificate_chain=_read(cert, FLAGS["cert"]) if cert is not None else None,
    )


@dataclass(frozen=True)
class TlsFiles:
    """A node's certificate, its key and the federation's CA: all three, since a jetfed
    node is both verified and verifying (mutual TLS)."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def from_flags(cls, cert: Optional[str], key: Optional[str], ca: Optional[str]) -> Optional["TlsFiles"]:
        """The files named by --tls-cert/--tls-key/--tls-ca, checked readable; None when no
        flag is given (plaintext). Some but not all is a mistake, not a downgrade."""
        given = {"cert": cert, "key": key, "ca": ca}
        if not any(given.values()):
            return None
        missing = [FLAGS[name] for name, value in given.items() if not value]
        if missing:
            present = ", ".join(FLAGS[name] for name, value in given.items() if value)
            raise InvalidConfig(f"{', '.join(missing)} missing: {present} needs all of --tls-cert, --tls-key and --tls-ca")
        paths = {name: Path(value) for name, value in given.items() if value}
        for name, path in paths.items():
            _read(path, FLAGS[name])
        return cls(**paths)

    def server_credentials(self) -> grpc.ServerCredentials:
        return server_credentials(self.cert, self.key, self.ca)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return channel_credentials(self.ca, self.cert, self.key)


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --tls-cert/--tls-key/--tls-ca, defaulting to $JETFED_TLS_CERT/KEY/CA so a
    systemd unit can set them once in an EnvironmentFile."""
    group = parser.add_argument_group("TLS (all three, or none for plaintext)")
    group.add_argument(FLAGS["cert"], default=os.environ.get(ENV["cert"]) or None, metavar="PATH",
                       help=f"this node's certificate (default ${ENV['cert']})")
    group.add_argument(FLAGS["key"], default=os.environ.get(ENV["key"]) or None, metavar="PATH",
                       help=f"this node's private key (default ${ENV['key']})")
    group.add_argument(FLAGS["ca"], default=os.environ.get(ENV["ca"]) or None, metavar="PATH",
                       help=f"the federation's CA certificate (default ${ENV['ca']})")


def warn_plaintext(logger: logging.Logger, what: str, host: Optional[str] = None) -> None:
    """Log that `what` (e.g. "worker alice on 0.0.0.0:8777") goes without TLS. Who can
    listen depends on where it binds: on a loopback `host` only this machine's users, on
    any other address anyone on the network."""
    who = "any user of this machine" if host is not None and is_loopback(host) else "anyone on the network"
    logger.warning("plaintext: %s without TLS: %s can read the weights "
                   "(provision with `jetfed certs`, pass --tls-cert/--tls-key/--tls-ca)", what, who)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost; a name that merely resolves there is not assumed."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
