"""One evaluation of the mnist task's model on the 10,000 MNIST test images: what the
evaluator does for each of the 20 models the reference run scores (the global model and
every worker's update, at 5 rounds). Wall time, CPU time and minor page faults per
evaluation, for each thread count asked, with the score, so a change to the scoring
path can be checked for speed and for identical results (each line gives the loss to
17 digits and the predicted counts).

In-process (default): evaluations on a torch thread of their own, after the evaluator's
malloc settings (jetfed.allocator). --process: a real `jetfed evaluator` on a free port,
sent Evaluate calls over gRPC as the coordinator sends them; its own CPU time and faults
from /proc. The page faults that cost an evaluation 25-40% of its CPU show only there
(they depend on what the process allocated before); --plain runs it with glibc's
defaults, as the evaluator ran before keep_freed_heap.

    nice -n 15 .venv/bin/python bench/evaluate.py --data-dir ../shared/datasets/mnist \
        [--weights runs/x/model.safetensors] [--threads 1 2] [--repeat 5] [--process [--plain]]

Without --weights it scores the seeded initial model (its predictions are degenerate:
pass a trained model to compare predictions). Not a test: timings are goals, never
assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from jetfed import allocator  # noqa: E402
from jetfed.partitions import Partition  # noqa: E402
from jetfed.tasks.base import Evaluation, TaskSettings  # noqa: E402
from jetfed.tasks.mnist import MnistTask  # noqa: E402


# The evaluator's entry, its malloc settings left at glibc's defaults for --plain.
PLAIN = ("from jetfed import allocator\n"
         "allocator.limit_arenas = allocator.keep_freed_heap = lambda *args: False\n")
ENTRY = "import sys\nfrom evaluator.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def proc_counters(pid: int) -> Tuple[int, float]:
    """Minor faults and CPU seconds (user + system) of process `pid` so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[7]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive_evaluator(args: argparse.Namespace, threads: int) -> None:
    from safetensors.torch import load_file

    from coordinator.clients import EvaluatorClient, Weights

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.manual_seed(1)
    task = MnistTask(TaskSettings(data_dir=args.data_dir, device=torch.device("cpu"), download=False))
    state = load_file(str(args.weights)) if args.weights else task.build_model().state_dict()
    proc = subprocess.Popen(
        [sys.executable, "-c", (PLAIN if args.plain else "") + ENTRY, "--host", "127.0.0.1", "--port", str(port),
         "--threads", str(threads), "--data-dir", str(args.data_dir), "--no-download", "--device", "cpu",
         "--batch-size", str(args.batch_size)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = EvaluatorClient(f"127.0.0.1:{port}", 1 << 20)
    try:
        await client.info(120)
        weights = Weights.of(state, task.model_name)
        await client.evaluate("warm-up", weights, 300)
        walls, cpus, faults, score = [], [], [], None
        for index in range(args.repeat):
            before, cpu = proc_counters(proc.pid)
            wall = time.perf_counter()
            score = await client.evaluate(f"bench-{index}", weights, 300)
            walls.append(time.perf_counter() - wall)
            after, cpu_after = proc_counters(proc.pid)
            faults.append(after - before)
            cpus.append(cpu_after - cpu)
        with open(f"/proc/{proc.pid}/status") as status:
            peak = next(int(line.split()[1]) // 1024 for line in status if line.startswith("VmHWM"))
    finally:
        await client.close()
        proc.terminate()
        proc.wait()
    assert score is not None
    print(json.dumps({
        "bench": "evaluate", "process": True, "threads": threads, "batch_size": args.batch_size,
        "repeat": args.repeat, "malloc": "glibc defaults" if args.plain else "evaluator's",
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "wall_s_median": round(statistics.median(walls), 3), "wall_s_min": round(min(walls), 3),
        "cpu_s_median": round(statistics.median(cpus), 3), "page_faults_median": statistics.median(faults),
        "peak_rss_mb": peak, "loss": repr(score.loss), "correct": score.correct,
        "predicted_counts": list(score.predicted_counts),
    }), flush=True)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--weights", type=Path, help="a safetensors file of mnist-cnn (default: seeded init)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--plain", action="store_true", help="glibc's malloc defaults, not the evaluator's")
    parser.add_argument("--process", action="store_true", help="a real jetfed evaluator, driven over gRPC")
    args = parser.parse_args(argv)
    if args.process:
        for threads in args.threads:
            asyncio.run(drive_evaluator(args, threads))
        return
    tuned = False if args.plain else allocator.limit_arenas() and allocator.keep_freed_heap()
    torch_thread = ThreadPoolExecutor(max_workers=1)  # the evaluator scores on one, not the main thread
    task = MnistTask(TaskSettings(data_dir=args.data_dir, device=torch.device("cpu"), download=False))
    data = task.load("test", Partition())
    torch.manual_seed(1)
    model = task.build_model()
    state = model.state_dict()
    if args.weights:
        from safetensors.torch import load_file

        state = load_file(str(args.weights))
    torch_thread.submit(task.evaluate, model, data, args.batch_size, limit=args.batch_size).result()  # warm-up

    def evaluate() -> Tuple[Evaluation, float, float, int]:
        wall, cpu = time.perf_counter(), time.process_time()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model.load_state_dict(state)
        result = task.evaluate(model, data, args.batch_size)
        return (result, time.perf_counter() - wall, time.process_time() - cpu,
                resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)

    for threads in args.threads:
        torch_thread.submit(torch.set_num_threads, threads).result()
        runs = [torch_thread.submit(evaluate).result() for _ in range(args.repeat)]
        result = runs[-1][0]
        print(json.dumps({
            "bench": "evaluate", "threads": threads, "batch_size": args.batch_size, "repeat": args.repeat,
            "malloc": "evaluator's" if tuned else "glibc defaults",
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "wall_s_median": round(statistics.median(r[1] for r in runs), 3),
            "wall_s_min": round(min(r[1] for r in runs), 3),
            "cpu_s_median": round(statistics.median(r[2] for r in runs), 3),
            "page_faults_median": statistics.median(r[3] for r in runs),
            "loss": repr(result.loss), "correct": result.correct, "predicted_counts": result.predicted_counts,
        }), flush=True)


if __name__ == "__main__":
    main()
