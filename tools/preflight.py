"""What `make run-local` checks before it starts anything: the coordinator's settings
(built from the very argv it will get), the MNIST files, the run folder and every port
the run will bind. Each mistake becomes one `Refused` naming the fix in the words the
user typed (make variables under make, flags otherwise), in seconds instead of after
four services have loaded their data."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from coordinator.checkpoint import STATE_FILE
from coordinator.cli import parse_args as coordinator_args
from coordinator.cli import settings_from
from coordinator.settings import RunSettings
from jetfed.data import how_to_get_mnist, missing_mnist_files, mnist_folders
from jetfed.errors import JetfedError


class Refused(Exception):
    """A mistake found before any service started; the message says what to change."""


@dataclass(frozen=True)
class Wording:
    """Names settings as the user set them: `ROUNDS=` under make, `--rounds` otherwise."""

    from_make: bool

    def name(self, variable: str, flag: str) -> str:
        return f"{variable}=" if self.from_make else flag

    def setting(self, variable: str, flag: str, value: object) -> str:
        """`DATA_DIR=/x` or `--data-dir /x`: what the user typed, or would type."""
        return f"{variable}={value}" if self.from_make else f"{flag} {value}"

    @property
    def extra(self) -> str:
        return "ARGS=" if self.from_make else "the coordinator flags after --"


@dataclass(frozen=True)
class Bind:
    """One address the run will listen on, and what moves it."""

    what: str
    host: str
    port: int
    moved_by: str


def coordinator_settings(argv: List[str], wording: Wording, given: Dict[str, str]) -> RunSettings:
    """The coordinator's own parsing and validation of `argv`; `given` maps a settings
    field to where the user set it (ROUNDS=, ARGS=...), named in the refusal."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return settings_from(coordinator_args(argv))
    except SystemExit:  # argparse already wrote why; keep its last line, not the usage
        raise Refused(f"{wording.extra}: {stderr.getvalue().strip().splitlines()[-1]}") from None
    except JetfedError as exc:
        field = re.match(r"(?:config: )?\[?(\w+)", str(exc))
        where = given.get(field.group(1), "") if field else ""
        raise Refused(f"the coordinator refuses its settings: {exc}" + (f" (set by {where})" if where else "")) from None


def check_data(data_dir: Path, wording: Wording) -> None:
    """All four MNIST files present; the services run with --no-download, so a missing
    file would otherwise surface as a service's exit status after seconds of start-up."""
    setting = wording.name("DATA_DIR", "--data-dir")
    if not data_dir.is_dir():
        problem = f"{wording.setting('DATA_DIR', '--data-dir', data_dir)} is not a folder"
    else:
        missing = missing_mnist_files(data_dir)
        if not missing:
            return
        problem = (f"MNIST is not in {wording.setting('DATA_DIR', '--data-dir', data_dir)}: missing {', '.join(missing)}"
                   f" (.gz or unpacked), looked for in {' and '.join(str(f) for f in mnist_folders(data_dir))}")
    raise Refused(f"{problem}. {how_to_get_mnist(data_dir, setting)} run-local never downloads (it passes "
                  "--no-download to the services, so a launcher cannot hang on the network).")


def holds_run(folder: Path) -> bool:
    """A checkpoint, metrics or logs: something a run wrote and a new run must not mix with."""
    metrics = folder / "metrics.jsonl"
    return ((folder / "checkpoint" / STATE_FILE).is_file() or (metrics.is_file() and metrics.stat().st_size > 0)
            or (folder / "logs").is_dir() or (folder / "model.safetensors").is_file())


def check_out(out: Path, resume: bool, wording: Wording) -> None:
    """A new run gets a new or empty folder; a resumed one must point at a run."""
    if resume:
        if not (out.is_dir() and holds_run(out)):
            raise Refused(f"{wording.setting('RESUME', '--resume', out)} holds no run "
                          f"(no checkpoint/, metrics.jsonl or logs/ there); give the folder of an interrupted run")
        return
    where = wording.setting("OUT", "--out", out)
    if out.exists() and not out.is_dir():
        raise Refused(f"{where} is a file; choose a new folder")
    if out.is_dir() and holds_run(out):
        raise Refused(f"{where} already holds a run; continue it with {wording.setting('RESUME', '--resume', out)}, "
                      f"or choose another {wording.name('OUT', '--out')}")
    if out.is_dir() and any(out.iterdir()):
        raise Refused(f"{where} holds other files; choose a new or empty folder")


def check_ports(binds: Iterable[Bind]) -> None:
    """Probe-bind every address, as the services will (SO_REUSEADDR, so connections of an
    earlier run lingering in TIME_WAIT do not count); two settings on one port clash too."""
    seen: Dict[int, Bind] = {}
    for bind in binds:
        if bind.port == 0:
            continue
        if bind.port in seen:
            raise Refused(f"{seen[bind.port].what} and {bind.what} both want port {bind.port}; "
                          f"move one ({bind.moved_by})")
        seen[bind.port] = bind
        problem = probe(bind.host, bind.port)
        if problem:
            raise Refused(f"{bind.what} cannot listen on {bind.host}:{bind.port}: {problem}; {bind.moved_by}")


def probe(host: str, port: int) -> Optional[str]:
    """None when `host:port` can be bound now, else why not (naming the holder if found)."""
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                holder = port_holder(port)
                return f"port {port} is in use" + (f" by {holder}" if holder else " by another process")
            return f"{exc.strerror or exc} (is {host} an address of this machine?)"
    return None


def port_holder(port: int) -> Optional[str]:
    """`pid N (command line)` of the process listening on `port`, from /proc (socket inode
    to /proc/<pid>/fd), else from `ss -ltnp`; None when neither can tell (another user's)."""
    inodes = _listening_inodes(port)
    if inodes:
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            if _holds_socket(pid, inodes):
                return f"pid {pid} ({_command_line(pid)})"
    return _holder_from_ss(port)


def _listening_inodes(port: int) -> List[str]:
    inodes = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.append(fields[9])
    return inodes


def _holds_socket(pid: str, inodes: List[str]) -> bool:
    targets = {f"socket:[{inode}]" for inode in inodes}
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") in targets for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:  # gone, or another user's
        return False


def _command_line(pid: str) -> str:
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    line = " ".join(w.decode(errors="replace") for w in words if w)
    return line if len(line) <= 100 else line[:97] + "..."


def _holder_from_ss(port: int) -> Optional[str]:
    if shutil.which("ss") is None:
        return None
    try:
        listing = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r'\(\("([^"]+)",pid=(\d+)', listing)
    return f"pid {found.group(2)} ({found.group(1)})" if found else None


def split_address(address: str) -> Tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)
