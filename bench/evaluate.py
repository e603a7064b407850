"""One evaluation of the mnist task's model on the 10,000 MNIST test images, in-process:
what the evaluator does for each of the 20 models the reference run scores (the global
model and every worker's update, at 5 rounds). Wall time and process CPU time per
evaluation, for each thread count asked, with the score, so a change to the scoring
path can be checked for speed and for identical results (each line gives the loss to 17 digits
and the predicted counts).

    nice -n 15 .venv/bin/python bench/evaluate.py --data-dir ../shared/datasets/mnist \
        [--weights runs/x/model.safetensors] [--threads 1 2] [--repeat 5] [--plain]

Without --weights it scores the seeded initial model (its predictions are degenerate:
pass a trained model to compare predictions). Not a test: timings are goals, never
assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
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


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--weights", type=Path, help="a safetensors file of mnist-cnn (default: seeded init)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--plain", action="store_true", help="glibc's malloc defaults, not the evaluator's")
    args = parser.parse_args(argv)
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
