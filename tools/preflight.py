"""What `make run-local` checks before it starts anything: the coordinator's settings
(built from the very argv it will get), the MNIST files, the run folder and every port
the run will bind. Each mistake becomes one `Refused` naming the fix in the words the
user typed (make variables under make, flags otherwise), in seconds instead of after
four services have loaded their data.

The checks import torch (the coordinator's settings, the data and device helpers) only
when they run, so run-local can start its held coordinator (held_coordinator.py) first,
whose imports then share the wait on the other core."""

from __future__ import annotations

import argparse
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
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Tuple

from coordinator.config_file import load_config, service_flags
from jetfed.errors import JetfedError

if TYPE_CHECKING:
    from coordinator.settings import RunSettings

COORDINATOR = "coordinator"


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
    from coordinator.cli import parse_args as coordinator_args
    from coordinator.cli import settings_from

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


def check_data(data_dir: Path, wording: Wording, task: str = "mnist") -> None:
    """The data folder exists and, for the mnist task, holds all four MNIST files; the
    services run with --no-download, so a missing file would otherwise surface as a
    service's exit status after seconds of start-up. Other tasks check their own data
    when they start."""
    from jetfed.data import how_to_get_mnist, missing_mnist_files, mnist_folders

    setting = wording.name("DATA_DIR", "--data-dir")
    if not data_dir.is_dir():
        problem = f"{wording.setting('DATA_DIR', '--data-dir', data_dir)} is not a folder"
        if task != "mnist":
            raise Refused(f"{problem}: task {task} reads its data there (set data_dir in the config's [task], "
                          f"[workers.NAME] or [evaluator], or {setting})")
    elif task != "mnist":
        return
    else:
        missing = missing_mnist_files(data_dir)
        if not missing:
            return
        problem = (f"MNIST is not in {wording.setting('DATA_DIR', '--data-dir', data_dir)}: missing {', '.join(missing)}"
                   f" (.gz or unpacked), looked for in {' and '.join(str(f) for f in mnist_folders(data_dir))}")
    raise Refused(f"{problem}. {how_to_get_mnist(data_dir, setting)} run-local never downloads (it passes "
                  "--no-download to the services, so a launcher cannot hang on the network).")


def check_device(choice: str, wording: Wording) -> None:
    """The services' --device, resolved here as each service will: a GPU that is not
    there is refused before four services load their data to find out."""
    from jetfed.devices import resolve_device

    try:
        resolve_device(choice, spell=lambda value: wording.setting("DEVICE", "--device", value))
    except JetfedError as exc:
        raise Refused(str(exc)) from None


def holds_run(folder: Path) -> bool:
    """A checkpoint, metrics or logs: something a run wrote and a new run must not mix with."""
    from coordinator.checkpoint import STATE_FILE

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
        if not 0 < bind.port < 65536:
            raise Refused(f"{bind.what} cannot listen on port {bind.port}: ports are 1..65535")
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


@dataclass(frozen=True)
class Endpoint:
    """A service run-local starts: where it listens, and the flags that say its task,
    data folder and (workers) partition."""

    name: str
    host: str
    port: int
    flags: Tuple[str, ...] = ()

    def flag(self, name: str, default: str = "") -> str:
        """The value of `name` in its flags (the last one given)."""
        found = [self.flags[i + 1] for i, word in enumerate(self.flags[:-1]) if word == name]
        return found[-1] if found else default

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def endpoints(
    config: Path, base_port: Optional[int], host: Optional[str], data_dir: Path,
) -> Tuple[List[Endpoint], Endpoint]:
    """Workers and evaluator as the config places them; --base-port/--host move them all."""
    values = load_config(config)
    if not values.get("worker") or not values.get("evaluator"):
        raise Refused(f"{config} needs [workers.NAME] tables and an [evaluator] for run-local to start")
    flags = service_flags(config, data_dir)
    places = [(name, address) for name, address in values["worker"]]
    places.append(tuple(values["evaluator"].split("=", 1)))
    found = []
    for index, (name, address) in enumerate(places):
        config_host, _, port = address.rpartition(":")
        if base_port is None and not port.isdigit():
            raise Refused(f"{config}: {name}'s address {address!r} is not HOST:PORT")
        found.append(Endpoint(name, host or config_host, base_port + index if base_port is not None else int(port),
                              tuple(flags.get(name, ()))))
    return found[:-1], found[-1]


@dataclass(frozen=True)
class Plan:
    """A run checked before anything starts: where it writes, whom it starts, how."""

    args: argparse.Namespace
    extra: List[str]
    wording: Wording
    workers: List[Endpoint]
    evaluator: Endpoint

    @property
    def out(self) -> Path:
        return self.args.resume or self.args.out

    def coordinator_argv(self, pki: Optional[Path]) -> List[str]:
        """The coordinator's flags; the same list is validated before the start."""
        args = self.args
        argv = ["--config", str(args.config), "--out", str(self.out), *(["--model", args.model] if args.model else []),
                *[f"--worker={w.name}={w.address}" for w in self.workers],
                f"--evaluator={self.evaluator.name}={self.evaluator.address}", *tls_flags(pki, COORDINATOR)]
        if args.base_port is not None:
            argv += ["--status-address", f"{self.evaluator.host}:{self.evaluator.port + 1}"]
        for flag, value in (("--rounds", args.rounds), ("--seed", args.seed), ("--metrics-address", args.metrics_address)):
            if value is not None:
                argv += [flag, str(value)]
        if args.resume:
            argv.append("--resume")
        return [*argv, *self.extra]


def make_plan(args: argparse.Namespace, extra: List[str]) -> Plan:
    """Every check that needs no service, cheapest first; raises Refused."""
    wording = Wording(args.from_make is not None)
    if (args.out is None) == (args.resume is None):
        raise Refused(f"give {wording.name('OUT', '--out')} for a new run or {wording.name('RESUME', '--resume')} "
                      "to continue one (exactly one of them)")
    config = wording.setting("CONFIG", "--config", args.config)
    from jetfed.data import parse_labels

    try:
        workers, evaluator = endpoints(args.config, args.base_port, args.host, args.data_dir)
        for worker in workers:
            if worker.flag("--task") == "mnist":
                parse_labels(worker.flag("--labels", "all"))
    except JetfedError as exc:
        raise Refused(f"{config}: {exc}") from None
    ports = len(workers) + 2  # the services and the coordinator's status service
    if args.base_port is not None and not 0 < args.base_port <= 65536 - ports:
        raise Refused(f"{wording.setting('BASE_PORT', '--base-port', args.base_port)}: the run takes {ports} ports "
                      f"from it, so it must be in 1..{65536 - ports}")
    plan = Plan(args, extra, wording, workers, evaluator)
    # TLS files are made once the run folder exists; their flags are launcher-made.
    settings = coordinator_settings(plan.coordinator_argv(None), wording, setters(plan))
    for service in [*workers, evaluator]:
        check_data(Path(service.flag("--data-dir", str(args.data_dir))), wording, service.flag("--task", "mnist"))
    if args.device:
        check_device(args.device, wording)
    check_out(plan.out, args.resume is not None, wording)
    check_ports(binds(plan, settings.status_address, settings.metrics_address))
    return plan


def setters(plan: Plan) -> Dict[str, str]:
    """Which setting the user would change for each coordinator field they set."""
    wording, args = plan.wording, plan.args
    found = {field: wording.setting(variable, flag, value) for field, variable, flag, value in (
        ("rounds", "ROUNDS", "--rounds", args.rounds), ("seed", "SEED", "--seed", args.seed),
        ("metrics_address", "METRICS", "--metrics-address", args.metrics_address),
    ) if value is not None}
    if args.base_port is not None:
        found["status_address"] = f"{wording.setting('BASE_PORT', '--base-port', args.base_port)}: the evaluator's port + 1"
    for word in plan.extra:
        if word.startswith("--"):
            found[word[2:].split("=", 1)[0].replace("-", "_")] = wording.extra
    return found


def binds(plan: Plan, status: Optional[str], metrics: Optional[str]) -> List[Bind]:
    """Every address the run will listen on, each with the setting that moves it."""
    wording, args = plan.wording, plan.args
    services = [*plan.workers, plan.evaluator]
    base = wording.setting("BASE_PORT", "--base-port", "N")
    moves = f"stop it, or move the services with {base} (they take N..N+{len(services)})"
    if args.base_port is None:
        moves += f" or change their addresses in {wording.setting('CONFIG', '--config', args.config)}"
    found = [Bind(s.name, s.host, s.port, moves) for s in services]
    if status:
        if "--status-address" in " ".join(plan.extra):
            where = f"change --status-address in {wording.extra}"
        elif args.base_port is not None:
            where = f"it follows {base} (the evaluator's port + 1): choose another N"
        else:
            where = f"change status_address in {args.config} or choose {base} (the status then takes N+{len(services)})"
        found.append(Bind("the coordinator's status service", *split_address(status), f"stop that process, or {where}"))
    if metrics:
        found.append(Bind("the coordinator's metrics endpoint", *split_address(metrics),
                          f"stop that process, or choose another {wording.name('METRICS', '--metrics-address')}"))
    return found


def tls_flags(pki: Optional[Path], node: str) -> List[str]:
    if pki is None:
        return []
    folder = pki / node
    return ["--tls-cert", str(folder / f"{node}.crt"), "--tls-key", str(folder / f"{node}.key"),
            "--tls-ca", str(folder / "ca.crt")]
