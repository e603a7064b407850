"""`make run-local` mistakes as a user makes them: each must end with the reason and the
fix on the terminal (in make's words under make), no traceback, no service left
running, and no run folder made or touched when nothing ran. Most are refused before
any service starts, so these take seconds; the last two start the fleet on tiny data."""

from __future__ import annotations

import gzip
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, Tuple

import pytest
import torch

from tests.conftest import make_tiny_mnist
from tests.e2e.test_run_local import LAUNCHER, ROOT, free_port_block, nothing_listens

SERVICES = 5  # alice, bob, charlie, testing and the coordinator's status service
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
               "t10k-labels-idx1-ubyte.gz")
# The install rule reinstalls whenever requirements change; a test must not trigger it.
# make as a user types it, but with this interpreter and no bootstrap (the tests run
# inside a bootstrapped environment, whichever venv it is).
MAKE = ["make", "-s", "-C", str(ROOT), "-o", ".venv/.jetfed-installed", "-o", "jetfed/v1/.generated", "run-local",
        f"PY={sys.executable}"]


def launch(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The launcher as a user runs it, stdout and stderr together as on a terminal."""
    return subprocess.run([sys.executable, str(LAUNCHER), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout, cwd=ROOT)


# A shell's environment: under `make test` the outer make's MAKEFLAGS (its command-line
# variables) and MAKELEVEL would reach the inner make and change what it prints.
SHELL_ENV = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}


def make(timeout: float = 120, **variables: str) -> subprocess.CompletedProcess:
    return subprocess.run([*MAKE, *[f"{k}={v}" for k, v in variables.items()]], env=SHELL_ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def snapshot(folder: Path) -> Dict[str, Tuple[int, int]]:
    """Every file and folder under `folder` with its mtime and size: equal snapshots mean
    nothing was created, appended or touched."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in [folder, *folder.rglob("*")]}


def refused(result: subprocess.CompletedProcess, *reasons: str) -> str:
    output = result.stdout
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    assert "SERVING" not in output, f"services started before the refusal:\n{output}"
    for reason in reasons:
        assert reason in output, f"{reason!r} missing from:\n{output}"
    return output


@pytest.fixture
def base() -> Iterator[int]:
    """A free block of ports for one run; afterwards nothing may listen there."""
    port = free_port_block(SERVICES + 1)  # one spare, for a METRICS= port
    yield port
    assert all(nothing_listens(port + i) for i in range(SERVICES)), "a service outlived run-local"


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    sock = socket.socket()
    yield sock
    sock.close()


def test_missing_data_dir_names_the_files_their_sources_and_make_variable(tmp_path: Path, base: int) -> None:
    name = f"jetfed-no-mnist-{os.getpid()}"
    output = refused(make(DATA_DIR=f"~/{name}", OUT=str(tmp_path / "run"), BASE_PORT=str(base)),
                     f"DATA_DIR={Path.home() / name} is not a folder", *MNIST_FILES,
                     "http://yann.lecun.com/exdb/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/",
                     "download=True", "point DATA_DIR= at a folder", "--no-download")
    assert "make: *** [Makefile" in output and "Error 2" in output
    assert not (tmp_path / "run").exists()


def test_empty_data_dir_says_where_it_looked(tmp_path: Path, base: int) -> None:
    data = tmp_path / "mnist"
    data.mkdir()
    refused(launch("--data-dir", str(data), "--out", str(tmp_path / "run"), "--base-port", str(base)),
            f"MNIST is not in --data-dir {data}: missing {', '.join(MNIST_FILES)}",
            f"looked for in {data} and {data / 'MNIST' / 'raw'}", "point --data-dir at a folder")
    assert not (tmp_path / "run").exists()


def test_zero_rounds_is_refused_before_any_service_starts(tiny_mnist: Path, tmp_path: Path, base: int) -> None:
    refused(make(DATA_DIR=str(tiny_mnist), OUT=str(tmp_path / "run"), BASE_PORT=str(base), ROUNDS="0"),
            "rounds: 0 must be an integer in 1..", "(set by ROUNDS=0)")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("device, reason", [
    ("tpu", "DEVICE=tpu: not one of auto, cpu, cuda or cuda:N"),
    # Where torch sees a GPU, a 100th is still missing; where it sees none, any is.
    ("cuda:99", "DEVICE=cuda:99: " + ("this machine has" if torch.cuda.is_available() else
                                      "CUDA is not available here")),
])
def test_a_device_this_machine_lacks_is_refused_in_makes_words(
    device: str, reason: str, tiny_mnist: Path, tmp_path: Path, base: int,
) -> None:
    output = refused(make(DATA_DIR=str(tiny_mnist), OUT=str(tmp_path / "run"), BASE_PORT=str(base), DEVICE=device),
                     reason, "DEVICE=auto")
    assert "--device" not in output
    assert not (tmp_path / "run").exists()


def test_negative_coordinator_flag_in_args_is_refused(tiny_mnist: Path, tmp_path: Path, base: int) -> None:
    refused(make(DATA_DIR=str(tiny_mnist), OUT=str(tmp_path / "run"), BASE_PORT=str(base),
                 ARGS="--round-timeout -1"),
            "round_timeout: -1.0 must be a number of seconds", "(set by ARGS=)")
    assert not (tmp_path / "run").exists()


def test_busy_service_port_names_the_port_its_holder_and_base_port(
    tiny_mnist: Path, tmp_path: Path, base: int, listening: socket.socket,
) -> None:
    listening.bind(("127.0.0.1", base + 1))
    listening.listen()
    refused(launch("--data-dir", str(tiny_mnist), "--out", str(tmp_path / "run"), "--base-port", str(base)),
            f"bob cannot listen on 127.0.0.1:{base + 1}: port {base + 1} is in use by pid {os.getpid()} (",
            "move the services with --base-port N")
    assert not (tmp_path / "run").exists()


def test_busy_status_address_names_what_moves_it(
    tiny_mnist: Path, tmp_path: Path, base: int, listening: socket.socket,
) -> None:
    listening.bind(("127.0.0.1", base + 4))
    listening.listen()
    refused(make(DATA_DIR=str(tiny_mnist), OUT=str(tmp_path / "run"), BASE_PORT=str(base)),
            f"the coordinator's status service cannot listen on 127.0.0.1:{base + 4}",
            f"in use by pid {os.getpid()}", "it follows BASE_PORT=N")
    assert not (tmp_path / "run").exists()


def test_out_holding_a_run_is_refused_and_left_untouched(tiny_mnist: Path, tmp_path: Path, base: int) -> None:
    out = tmp_path / "run"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "alice.log").write_text("an earlier run\n")
    (out / "metrics.jsonl").write_text('{"round": 1}\n')
    before = snapshot(out)
    refused(make(DATA_DIR=str(tiny_mnist), OUT=str(out), BASE_PORT=str(base)),
            f"OUT={out} already holds a run; continue it with RESUME={out}")
    assert snapshot(out) == before


def test_resume_of_a_folder_without_a_run_is_refused(tiny_mnist: Path, tmp_path: Path, base: int) -> None:
    before = snapshot(tmp_path)
    refused(make(DATA_DIR=str(tiny_mnist), RESUME=str(tmp_path), BASE_PORT=str(base)),
            f"RESUME={tmp_path} holds no run")
    assert snapshot(tmp_path) == before


def test_garbage_labels_in_the_config_are_refused(tiny_mnist: Path, tmp_path: Path, base: int) -> None:
    config = tmp_path / "federation.toml"
    text = (ROOT / "examples" / "federation.toml").read_text()
    config.write_text(text.replace('labels = "4-6"', 'labels = "four to six"'))
    refused(launch("--config", str(config), "--data-dir", str(tiny_mnist), "--out", str(tmp_path / "run"),
                   "--base-port", str(base)),
            f"--config {config}: labels: cannot read 'four to six'")
    assert not (tmp_path / "run").exists()


def corrupt_mnist(folder: Path) -> Path:
    """Tiny MNIST whose training labels stop short, as a cut download would."""
    make_tiny_mnist(folder)
    labels = folder / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(gzip.decompress(labels.read_bytes())[:-100]))
    return folder


def test_a_service_failing_after_start_shows_its_log_and_leaves_no_run(tmp_path: Path, base: int) -> None:
    data = corrupt_mnist(tmp_path / "mnist")
    out = tmp_path / "run"
    result = launch("--data-dir", str(data), "--out", str(out), "--base-port", str(base), "--rounds", "2")
    output = result.stdout
    assert result.returncode == 1, output
    assert "exited with status 2 before serving; the last lines of" in output, output
    assert "holds 500 bytes of data, its header promises 600" in output, output
    assert f"no round finished, so {out} is removed" in output
    assert "Traceback" not in output
    assert not out.exists()


@pytest.mark.slow  # ~22 s: a whole fleet started to see one coordinator error
def test_a_failing_coordinator_shows_its_error_and_keeps_the_run(tiny_mnist: Path, tmp_path: Path, base: int) -> None:
    out = tmp_path / "run"
    (out / "logs").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"round": 1}\n')
    result = launch("--data-dir", str(tiny_mnist), "--resume", str(out), "--base-port", str(base), "--rounds", "2")
    output = result.stdout
    assert result.returncode == 1, output
    assert "coordinator exit status 1" in output
    assert "coordinator exited with status 1; the last lines of" in output, output
    assert "holds no checkpoint" in output, output
    assert (out / "metrics.jsonl").read_text() == '{"round": 1}\n'


def test_metrics_reaches_the_coordinators_validation(tiny_mnist: Path, tmp_path: Path, base: int) -> None:
    refused(make(DATA_DIR=str(tiny_mnist), OUT=str(tmp_path / "run"), BASE_PORT=str(base), METRICS="127.0.0.1:99999"),
            "metrics_address: '127.0.0.1:99999' is not HOST:PORT", "(set by METRICS=127.0.0.1:99999)")
    assert not (tmp_path / "run").exists()


def test_refused_resume_leaves_the_runs_logs_alone(
    tiny_mnist: Path, tmp_path: Path, base: int, listening: socket.socket,
) -> None:
    out = tmp_path / "run"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "coordinator.log").write_text("stopped by a signal\n")
    (out / "metrics.jsonl").write_text('{"round": 1}\n')
    listening.bind(("127.0.0.1", base + 5))
    listening.listen()
    before = snapshot(out)
    refused(make(DATA_DIR=str(tiny_mnist), RESUME=str(out), BASE_PORT=str(base), METRICS=f"127.0.0.1:{base + 5}"),
            f"the coordinator's metrics endpoint cannot listen on 127.0.0.1:{base + 5}", "choose another METRICS=")
    assert snapshot(out) == before
