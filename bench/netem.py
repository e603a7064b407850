"""Round time of a real federation on an emulated 4G link (issue 12: "a compressed round
takes <= 2x the loopback round"), for each weight encoding.

Three real `jetfed worker` processes (alice 0-3, bob 4-6, charlie 7-9) and the real
`jetfed coordinator` (no evaluator) run a few rounds of the seed recipe in network
namespaces this bench makes and deletes: the workers in `jetfed-4g-<pid>-boards`, the
coordinator in `jetfed-4g-<pid>`. The two are joined by a TUN device in each and a
relay (this file, `--relay`) that carries every IP packet between them through one
emulated link per worker (each board has its own modem): packets from a worker's port
(its gRPC answers: the uplink) at 5 Mbit/s, packets to it (the downlink) at 20 Mbit/s,
25 ms of delay each way (50 ms RTT), netem's order: serialised at the link's rate
behind the packets queued before it (at most 1000), then delayed.

Why a relay and not `tc qdisc ... netem` on lo: this machine's kernel is built without
netem (CONFIG_NET_SCH_NETEM is not set; htb and tbf are in, and neither delays) and
loads no modules, so the delay has to be made in user space; the relay does the rate
too, so one mechanism does both. It checks itself before any round: the TCP connect
time (one RTT) and a 2 MB transfer each way, printed as achieved Mbit/s.

Settings: `loopback` (the coordinator beside the workers on their namespace's lo,
nothing shaped; run before every other setting and after the last: a setting's ratio
is to the mean of the loopback runs either side of it, so a shared machine's drifting
load moves both alike), `relay` (through the
relay, nothing shaped: the relay's own cost), `4g-fp32`, and 4G with each encoding that
met its accuracy target in bench/bandwidth.py (int8 both ways; top-k 10% both ways;
top-k 5% up / 10% down). A round's time is metrics.jsonl's `duration_s` less its
`eval_s` (no evaluator: the last round's evaluation is the workers' own); the headline
mean skips round 1 (the whole model goes down to every worker whatever the encoding,
and the workers build their training state), and the mean over every round is printed
beside it.

    nice -n 15 .venv/bin/python bench/netem.py --data-dir ../shared/datasets/mnist --rounds 6

Needs root, `ip` (iproute2) and /dev/net/tun. The namespaces are deleted at exit,
Ctrl-C included.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import heapq
import json
import os
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Deque, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
JETFED = [sys.executable, "-m", "jetfed.cli"]

TUN = "jf4g"
COORDINATOR_IP = "10.77.0.1"
BOARDS_IP = "10.77.0.2"
MTU = 1500
WORKERS: Tuple[Tuple[str, str, int], ...] = (("alice", "0-3", 8777), ("bob", "4-6", 8778), ("charlie", "7-9", 8779))
PROBE_PORT = 8790

# name, uplink encoding, downlink encoding, shaped (relay rate/delay on) or not
SETTINGS: Tuple[Tuple[str, str, str], ...] = (
    ("4g-fp32", "raw", "raw"),
    ("4g-int8", "int8", "int8"),
    ("4g-topk10", "topk:0.1", "topk:0.1"),
    ("4g-topk5/10", "topk:0.05", "topk:0.1"),
)


# ---------------------------------------------------------------- the emulated link


@dataclass
class Link:
    """One direction of one board's link, as netem with `rate` and `delay` models it: a
    packet waits for the packets ahead of it to be serialised, takes size*8/rate itself,
    then `delay` in flight; past `limit` packets waiting, it is dropped (TCP recovers, as
    it would from a full modem buffer). rate 0 = unlimited."""

    rate_bps: float
    delay_s: float
    limit: int = 1000
    busy_until: float = 0.0
    departures: Deque[float] = field(default_factory=deque)
    packets: int = 0
    bytes: int = 0
    dropped: int = 0

    def admit(self, now: float, size: int) -> Optional[float]:
        """When a packet of `size` bytes arriving at `now` comes out of the far end, or
        None when the queue is full and it is dropped."""
        while self.departures and self.departures[0] <= now:
            self.departures.popleft()
        if len(self.departures) >= self.limit:
            self.dropped += 1
            return None
        start = max(now, self.busy_until)
        depart = start + (size * 8 / self.rate_bps if self.rate_bps > 0 else 0.0)
        self.busy_until = depart
        self.departures.append(depart)
        self.packets += 1
        self.bytes += size
        return depart + self.delay_s


def flow_port(packet: bytes, uplink: bool) -> int:
    """The worker-side port of an IPv4 TCP/UDP packet: its source port going up (the
    worker is the server, answering from its port), its destination port going down;
    0 for anything else (ICMP, IPv6, fragments), which shares one link per direction."""
    if len(packet) < 20 or packet[0] >> 4 != 4 or packet[9] not in (6, 17):
        return 0
    if struct.unpack_from("!H", packet, 6)[0] & 0x1FFF:
        return 0
    header = (packet[0] & 0x0F) * 4
    if len(packet) < header + 4:
        return 0
    source, destination = struct.unpack_from("!HH", packet, header)
    return source if uplink else destination


class Links:
    """Every link of one direction, one per worker port (or one for all, --shared-link)."""

    def __init__(self, rate_bps: float, delay_s: float, *, shared: bool, limit: int = 1000) -> None:
        self.rate_bps, self.delay_s, self.shared, self.limit = rate_bps, delay_s, shared, limit
        self.by_port: Dict[int, Link] = {}

    def get(self, port: int) -> Link:
        key = 0 if self.shared else port
        if key not in self.by_port:
            self.by_port[key] = Link(self.rate_bps, self.delay_s, self.limit)
        return self.by_port[key]


# ---------------------------------------------------------------- namespaces and TUN


def namespace_commands(coordinator_ns: str, boards_ns: str) -> List[List[str]]:
    """The `ip` commands that make both namespaces, their lo and a persistent TUN device
    in each, addressed 10.77.0.1 (coordinator) and 10.77.0.2 (boards), point to point,
    MTU 1500 (what a 4G bearer carries)."""
    commands: List[List[str]] = []
    for ns, local, peer in ((coordinator_ns, COORDINATOR_IP, BOARDS_IP), (boards_ns, BOARDS_IP, COORDINATOR_IP)):
        commands += [
            ["ip", "netns", "add", ns],
            ["ip", "-n", ns, "link", "set", "lo", "up"],
            ["ip", "-n", ns, "tuntap", "add", "dev", TUN, "mode", "tun"],
            ["ip", "-n", ns, "link", "set", TUN, "mtu", str(MTU)],
            ["ip", "-n", ns, "addr", "add", local, "peer", peer, "dev", TUN],
            ["ip", "-n", ns, "link", "set", TUN, "up"],
        ]
    return commands


_CLONE_NEWNET = 0x40000000
_TUNSETIFF = 0x400454CA
_IFF_TUN, _IFF_NO_PI = 0x0001, 0x1000


def open_tun(namespace: str) -> int:
    """This thread enters `namespace` and attaches to its TUN device (a TUN fd belongs to
    the namespace it was opened in, so one process can hold both ends)."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(f"/run/netns/{namespace}") as ns:
        if libc.setns(ns.fileno(), _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {namespace}")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", TUN.encode(), _IFF_TUN | _IFF_NO_PI))
    return fd


def relay(coordinator_ns: str, boards_ns: str, up_mbit: float, down_mbit: float, delay_ms: float,
          shared: bool) -> None:
    """Carry packets between the two TUN devices through the links until SIGTERM; print
    each link's packets, bytes and drops as one JSON line on the way out."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)  # the network, not a workload: not niced
    except OSError:
        pass
    coordinator_fd, boards_fd = open_tun(coordinator_ns), open_tun(boards_ns)
    down = Links(down_mbit * 1e6, delay_ms / 1e3, shared=shared)
    up = Links(up_mbit * 1e6, delay_ms / 1e3, shared=shared)
    pending: List[Tuple[float, int, int, bytes]] = []
    sequence = 0
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    print("ready", flush=True)
    while not stop:
        timeout = max(0.0, pending[0][0] - time.monotonic()) if pending else 0.5
        try:
            readable, _, _ = select.select([coordinator_fd, boards_fd], [], [], timeout)
        except InterruptedError:
            continue
        for fd in readable:
            uplink = fd == boards_fd
            for _ in range(64):
                try:
                    packet = os.read(fd, 65536)
                except BlockingIOError:
                    break
                deliver = (up if uplink else down).get(flow_port(packet, uplink)).admit(time.monotonic(), len(packet))
                if deliver is not None:
                    sequence += 1
                    heapq.heappush(pending, (deliver, sequence, coordinator_fd if uplink else boards_fd, packet))
        now = time.monotonic()
        while pending and pending[0][0] <= now:
            _, _, fd, packet = heapq.heappop(pending)
            try:
                os.write(fd, packet)
            except OSError:
                pass
    stats = {direction: {str(port): {"packets": link.packets, "bytes": link.bytes, "dropped": link.dropped}
                         for port, link in links.by_port.items()} for direction, links in (("up", up), ("down", down))}
    print(json.dumps(stats), flush=True)


# ---------------------------------------------------------------- the link's own check


def probe_server(host: str, port: int) -> None:
    """On the boards' side: answer 'D' + length (read that many bytes, then one byte back)
    and 'U' + length (send that many bytes), one connection each, until killed."""
    server = socket.create_server((host, port))
    print("ready", flush=True)
    while True:
        connection, _ = server.accept()
        with connection:
            head = connection.recv(9, socket.MSG_WAITALL)
            if len(head) < 9:
                continue
            kind, size = head[:1], struct.unpack("!Q", head[1:])[0]
            if kind == b"D":
                left = size
                while left > 0:
                    chunk = connection.recv(min(left, 1 << 16))
                    if not chunk:
                        break
                    left -= len(chunk)
                connection.sendall(b"k")
            elif kind == b"U":
                connection.sendall(bytes(size))


def probe_client(host: str, port: int, size: int) -> Dict[str, float]:
    """On the coordinator's side: the median TCP connect time (one RTT) of five, then
    `size` bytes down (to the boards) and up, each timed to the last byte."""
    connects = []
    for _ in range(5):
        started = time.perf_counter()
        with socket.create_connection((host, port), timeout=10) as connection:
            connects.append(time.perf_counter() - started)
            connection.sendall(b"X" + struct.pack("!Q", 0))
    with socket.create_connection((host, port), timeout=30) as connection:
        started = time.perf_counter()
        connection.sendall(b"D" + struct.pack("!Q", size) + bytes(size))
        connection.recv(1)
        down_s = time.perf_counter() - started
    with socket.create_connection((host, port), timeout=30) as connection:
        started = time.perf_counter()
        connection.sendall(b"U" + struct.pack("!Q", size))
        left = size
        while left > 0:
            chunk = connection.recv(1 << 16)
            if not chunk:
                break
            left -= len(chunk)
        up_s = time.perf_counter() - started
    rtt = statistics.median(connects)
    # A transfer timed to its last byte (down: to the one-byte answer) spends about one
    # RTT beyond serialisation (and a little in slow start): shown raw and less one RTT.
    return {"rtt_ms": round(rtt * 1e3, 1), "bytes": size,
            "down_s": round(down_s, 3), "down_mbit": round(size * 8 / down_s / 1e6, 2),
            "down_mbit_less_rtt": round(size * 8 / max(down_s - rtt, 1e-6) / 1e6, 2),
            "up_s": round(up_s, 3), "up_mbit": round(size * 8 / up_s / 1e6, 2),
            "up_mbit_less_rtt": round(size * 8 / max(up_s - rtt, 1e-6) / 1e6, 2)}


# ---------------------------------------------------------------- the bench


class Bench:
    """The namespaces, the relay, the workers: made in order, undone in reverse."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.coordinator_ns = f"jetfed-4g-{os.getpid()}"
        self.boards_ns = f"{self.coordinator_ns}-boards"
        self.made: List[str] = []
        self.workers: List[subprocess.Popen] = []
        self.relay_process: Optional[subprocess.Popen] = None
        self.runs = 0
        self.work = Path(tempfile.mkdtemp(prefix="jetfed-netem-"))

    def in_ns(self, ns: str, command: Sequence[str], niced: bool = True) -> List[str]:
        return ["ip", "netns", "exec", ns, *(["nice", "-n", "15"] if niced else []), *command]

    def setup(self) -> None:
        for command in namespace_commands(self.coordinator_ns, self.boards_ns):
            if command[1] == "netns":
                self.made.append(command[3])
            subprocess.run(command, check=True)

    def start_relay(self, up_mbit: float, down_mbit: float, delay_ms: float) -> None:
        self.stop_relay()
        command = [sys.executable, str(Path(__file__).resolve()), "--relay", self.coordinator_ns, self.boards_ns,
                   str(up_mbit), str(down_mbit), str(delay_ms), "1" if self.args.shared_link else "0"]
        self.relay_process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        line = self.relay_process.stdout.readline().strip() if self.relay_process.stdout else ""
        if line != "ready":
            raise SystemExit(f"the relay did not start: {line!r}")

    def stop_relay(self) -> Optional[Dict]:
        process, self.relay_process = self.relay_process, None
        if process is None:
            return None
        process.terminate()
        out, _ = process.communicate(timeout=10)
        lines = [line for line in (out or "").splitlines() if line.startswith("{")]
        return json.loads(lines[-1]) if lines else None

    def probe(self) -> Dict[str, float]:
        server = subprocess.Popen(
            self.in_ns(self.boards_ns, [sys.executable, str(Path(__file__).resolve()), "--probe-server",
                                        BOARDS_IP, str(PROBE_PORT)], niced=False),
            stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            done = subprocess.run(
                self.in_ns(self.coordinator_ns, [sys.executable, str(Path(__file__).resolve()), "--probe-client",
                                                 BOARDS_IP, str(PROBE_PORT), str(self.args.probe_bytes)], niced=False),
                check=True, capture_output=True, text=True, timeout=120)
            return json.loads(done.stdout.strip().splitlines()[-1])
        finally:
            server.terminate()
            server.wait(timeout=10)

    def start_workers(self) -> None:
        for name, labels, port in WORKERS:
            log = open(self.work / f"{name}.log", "w")
            self.workers.append(subprocess.Popen(self.in_ns(self.boards_ns, [
                *JETFED, "worker", "--name", name, "--labels", labels, "--host", "0.0.0.0", "--port", str(port),
                "--threads", "1", "--no-download", "--data-dir", str(self.args.data_dir),
                "--state-dir", str(self.work / f"state-{name}"), "--log-level", "WARNING"]),
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))

    def federate(self, name: str, ns: str, host: str, up: str, down: str) -> Dict:
        self.runs += 1
        out = self.work / f"{self.runs:02d}-{name.replace('/', '-')}"
        command = [*JETFED, "coordinator", "--rounds", str(self.args.rounds), "--eval-every", str(self.args.rounds),
                   "--seed", str(self.args.seed), "--min-workers", "all", "--round-retries", "0",
                   "--uplink-encoding", up, "--downlink-encoding", down, "--out", str(out),
                   "--connect-timeout", "180", "--log-level", "WARNING",
                   *[arg for w, _, port in WORKERS for arg in ("--worker", f"{w}={host}:{port}")]]
        started = time.perf_counter()
        done = subprocess.run(self.in_ns(ns, command), cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            return {"setting": name, "error": (done.stderr or done.stdout).strip().splitlines()[-5:]}
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        rounds = [r for r in records if r.get("updates")]
        seconds = [r["duration_s"] - r.get("eval_s", 0.0) for r in rounds]
        # The slowest worker's own training time: the part of a round no link changes.
        compute = [max(u.get("train_seconds", 0.0) for u in r["updates"].values()) for r in rounds]
        down_bytes = [sum(u.get("bytes_sent", 0) for u in r["updates"].values()) for r in rounds]
        up_bytes = [sum(u.get("bytes_received", 0) for u in r["updates"].values()) for r in rounds]
        later = slice(1, None) if len(rounds) > 1 else slice(None)
        return {"setting": name, "uplink": up, "downlink": down, "rounds": len(rounds),
                "round_s": round(statistics.mean(seconds[later]), 3),
                "round_s_all": round(statistics.mean(seconds), 3),
                "round_s_each": [round(s, 3) for s in seconds],
                "train_s_max": round(statistics.mean(compute[later]), 3),
                "down_bytes_per_round": round(statistics.mean(down_bytes[later])),
                "up_bytes_per_round": round(statistics.mean(up_bytes[later])),
                "round1_down_bytes": down_bytes[0], "round1_up_bytes": up_bytes[0],
                "wall_s": round(wall, 1)}

    def close(self) -> None:
        self.stop_relay()
        for worker in self.workers:
            worker.terminate()
        for worker in self.workers:
            try:
                worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                worker.kill()
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(self.work, ignore_errors=True)


def check_tools() -> None:
    if os.geteuid() != 0:
        raise SystemExit("bench/netem.py makes network namespaces: run it as root")
    if not (shutil.which("ip") and shutil.which("tc")):
        print("ip/tc missing: installing iproute2", flush=True)
        subprocess.run(["apt-get", "install", "-y", "iproute2"], check=True)
    if not os.path.exists("/dev/net/tun"):
        raise SystemExit("no /dev/net/tun: the relay needs TUN devices")


def run(args: argparse.Namespace) -> None:
    check_tools()
    bench = Bench(args)
    # SIGTERM as Ctrl-C: the finally below runs either way.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    results: List[Dict] = []
    try:
        bench.setup()
        if not args.probe_only:
            bench.start_workers()  # they load MNIST while the link is checked
        bench.start_relay(0, 0, 0)
        print("relay, nothing shaped:", json.dumps(bench.probe()), flush=True)
        bench.start_relay(args.up_mbit, args.down_mbit, args.rtt_ms / 2)
        print(f"4G ({args.up_mbit} Mbit/s up, {args.down_mbit} down, {args.rtt_ms} ms RTT):",
              json.dumps(bench.probe()), flush=True)
        bench.stop_relay()
        if args.probe_only:
            return

        def one(name: str, up: str, down: str, shaped: Optional[bool]) -> None:
            if shaped is None:
                result = bench.federate(name, bench.boards_ns, "127.0.0.1", up, down)
            else:
                if shaped:
                    bench.start_relay(args.up_mbit, args.down_mbit, args.rtt_ms / 2)
                else:
                    bench.start_relay(0, 0, 0)
                result = bench.federate(name, bench.coordinator_ns, BOARDS_IP, up, down)
                result["relay"] = bench.stop_relay()
            print(json.dumps(result), flush=True)
            results.append(result)

        # A loopback run before every other setting and one after the last: each setting's
        # ratio is to the mean of the loopback runs either side of it, so the load of a
        # shared machine drifting over the bench moves both alike.
        chosen = [s for s in SETTINGS if not args.setting or s[0] in args.setting]
        for name, up, down, shaped in [("relay-fp32", "raw", "raw", False), *[(*s, True) for s in chosen]]:
            one("loopback", "raw", "raw", None)
            one(name, up, down, shaped)
        one("loopback", "raw", "raw", None)
    except KeyboardInterrupt:
        print("interrupted: deleting the namespaces", flush=True)
    finally:
        bench.close()
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in results))
    if results:
        table(results, args)


def table(results: List[Dict], args: argparse.Namespace) -> None:
    def reference(index: int) -> Optional[float]:
        """The mean round of the loopback runs just before and after results[index]."""
        around = [r["round_s"] for r in (results[index - 1] if index > 0 else None,
                                          results[index + 1] if index + 1 < len(results) else None)
                  if r and "error" not in r and r["setting"] == "loopback"]
        return statistics.mean(around) if around else None

    loopbacks = [r["round_s"] for r in results if "error" not in r and r["setting"] == "loopback"]
    print(f"\n{args.rounds} rounds each; seconds a round = duration_s less eval_s, mean of rounds 2-{args.rounds} "
          f"(all rounds in brackets), against the loopback runs either side; compute = the slowest worker's "
          f"train_seconds; bytes a round over all three workers, rounds 2-{args.rounds}. Loopback runs: "
          + ", ".join(f"{s:.2f}" for s in loopbacks) + " s a round")
    print("| setting (up / down) | s a round | loopback either side | ratio | compute | bytes down | up | round 1 down |")
    print("|---|---|---|---|---|---|---|---|")
    for index, r in enumerate(results):
        if r.get("setting") == "loopback":
            continue
        if "error" in r:
            print(f"| {r['setting']} | failed: {r['error'][-1] if r['error'] else ''} | | | | | | |")
            continue
        base = reference(index)
        ratio = f"{r['round_s'] / base:.1f}x ({r['round_s_all'] / base:.1f}x)" if base else "-"
        print(f"| {r['setting']} ({r['uplink']} / {r['downlink']}) | {r['round_s']:.2f} ({r['round_s_all']:.2f}) "
              f"| {base:.2f} | {ratio} | {r['train_s_max']:.2f} | {r['down_bytes_per_round']:,} "
              f"| {r['up_bytes_per_round']:,} | {r['round1_down_bytes']:,} |" if base else
              f"| {r['setting']} ({r['uplink']} / {r['downlink']}) | {r['round_s']:.2f} | - | - | "
              f"{r['train_s_max']:.2f} | {r['down_bytes_per_round']:,} | {r['up_bytes_per_round']:,} "
              f"| {r['round1_down_bytes']:,} |")
    for index, r in enumerate(results):
        if r.get("setting") != "loopback" and "error" not in r and reference(index):
            base = reference(index)
            print(json.dumps({"setting": r["setting"], "uplink": r["uplink"], "downlink": r["downlink"],
                              "round_s": r["round_s"], "loopback_round_s": round(base, 3),
                              "ratio": round(r["round_s"] / base, 2), "ratio_all_rounds": round(r["round_s_all"] / base, 2),
                              "down_bytes_per_round": r["down_bytes_per_round"], "up_bytes_per_round": r["up_bytes_per_round"]}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--relay":
        coordinator_ns, boards_ns, up, down, delay, shared = sys.argv[2:8]
        relay(coordinator_ns, boards_ns, float(up), float(down), float(delay), shared == "1")
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--probe-server":
        probe_server(sys.argv[2], int(sys.argv[3]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--probe-client":
        print(json.dumps(probe_client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=os.environ.get("JETFED_DATA_DIR"),
                        help="the four MNIST IDX files (default: $JETFED_DATA_DIR)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--up-mbit", type=float, default=5.0)
    parser.add_argument("--down-mbit", type=float, default=20.0)
    parser.add_argument("--rtt-ms", type=float, default=50.0)
    parser.add_argument("--shared-link", action="store_true",
                        help="one link for the whole fleet instead of one per worker")
    parser.add_argument("--probe-bytes", type=int, default=2_000_000)
    parser.add_argument("--setting", action="append", help=f"4G settings to run (default all: "
                        f"{', '.join(s[0] for s in SETTINGS)}); loopback and relay always run")
    parser.add_argument("--json", type=Path, help="also write every setting's line here")
    parser.add_argument("--probe-only", action="store_true", help="check the link and stop (no federation)")
    args = parser.parse_args()
    if not args.data_dir:
        parser.error("--data-dir (or $JETFED_DATA_DIR): the folder with the four MNIST IDX files")
    args.data_dir = Path(args.data_dir).resolve()
    run(args)


if __name__ == "__main__":
    main()
