"""systemd readiness (sd_notify): a unit with Type=notify counts a service as started
only once it serves, so `systemctl start` and units ordered after it wait for the data
to load and the port to be bound, not just for the process to exist."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1", "STOPPING=1") to $NOTIFY_SOCKET; False when not
    run by systemd. The protocol is one datagram on a unix socket ('@' = abstract)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify %s failed: %s", state, exc)
        return False
    return True
