"""The reference recipe in one process, without any network: the yardstick that
jetfed's rounds are measured against (the federation issue asks for within 1.5x).

Same data, model, seeds and training code as the services, so the only difference
left is the transport and the process boundaries.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from coordinator.strategies.fedavg import fedavg
from coordinator.settings import RunSettings
from jetfed.config import TrainConfig
from jetfed.data import load_mnist, parse_labels
from jetfed.models import NUM_CLASSES, build_model
from jetfed.training import DeviceData, derive_seed, evaluate, train_round

WORKERS = (("alice", "0-3"), ("bob", "4-6"), ("charlie", "7-9"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train = load_mnist(args.data_dir, "train", download=False)
    cpu = torch.device("cpu")
    shards = {name: DeviceData.from_images(train.subset(parse_labels(labels)), cpu) for name, labels in WORKERS}
    test = DeviceData.from_images(load_mnist(args.data_dir, "test", download=False), cpu)
    settings = RunSettings(workers={n: "-" for n, _ in WORKERS}, evaluator=None, out_dir=Path("."),
                           rounds=args.rounds, train=TrainConfig(seed=args.seed))
    torch.manual_seed(args.seed)
    model = build_model("mnist-cnn")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    started = time.perf_counter()
    for round_number in range(1, args.rounds + 1):
        config = TrainConfig(lr=settings.lr_for(round_number), seed=args.seed)
        updates, weights = [], []
        for name, shard in shards.items():
            model.load_state_dict(state)
            outcome = train_round(model, shard, config, derive_seed(args.seed, round_number, name))
            updates.append({k: v.clone() for k, v in outcome.state.items()})
            weights.append(outcome.num_examples)
        state = fedavg(updates, weights)
    seconds = time.perf_counter() - started
    model.load_state_dict(state)
    score = evaluate(model, test, 500, NUM_CLASSES)
    print(json.dumps({
        "bench": "inprocess", "rounds": args.rounds, "seed": args.seed, "threads": torch.get_num_threads(),
        "seconds": round(seconds, 2), "seconds_per_round": round(seconds / args.rounds, 4),
        "accuracy": score.correct / score.total,
    }))


if __name__ == "__main__":
    main()
