#!/usr/bin/env bash
# The CUDA path on a machine with an NVIDIA GPU, timed against the same machine's CPU:
# the device unit tests, a wrong GPU index refused on the screen, then the reference
# federation (`make run-local`'s launcher, real processes over gRPC) with the workers and
# the evaluator on --device cuda and on --device cpu, the in-process simulation on each,
# and resnet18 (45 MB a model) on each. Prints one JSON object a run (bench/run_local.py).
#
#   PYTHON=.venv/bin/python DATA_DIR=../shared/datasets/mnist bash bench/cuda.sh
#
# PYTHON must import torch with CUDA and jetfed's runtime requirements (with the repo
# root on PYTHONPATH when jetfed is not installed); DEVICES="cuda cpu" and ROUNDS=40 are
# the defaults. Not a test: timings are figures, never assertions.
set -u
PY=${PYTHON:-python3}
DATA=${DATA_DIR:?DATA_DIR must name the folder with the four MNIST IDX files}
ROUNDS=${ROUNDS:-40}
DEVICES=${DEVICES:-cuda cpu}
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT

seconds_since() { "$PY" -c "import sys, time; print(round(time.time() - float(sys.argv[1]), 2))" "$1"; }

echo "== machine"
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: none"
echo "cpus $(nproc)"
"$PY" - <<'EOF'
import sys, grpc, torch, google.protobuf as pb
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}): {gpu}; "
      f"grpcio {grpc.__version__}, protobuf {pb.__version__}")
EOF

echo "== unit: --device resolution (its CUDA cases run only where torch sees a GPU)"
"$PY" -m pytest -q -p no:cacheprovider -rs tests/unit/test_devices.py

echo "== a worker started on a GPU index this machine lacks: the reason on the screen, exit 2"
"$PY" -m jetfed.cli worker --name alice --labels 0-3 --data-dir "$DATA" --no-download --device cuda:9
echo "exit $?"

for device in $DEVICES; do
    echo "== run-local, $ROUNDS rounds, workers and evaluator on --device $device"
    "$PY" bench/run_local.py --data-dir "$DATA" --rounds "$ROUNDS" --device "$device"
done

for device in $DEVICES; do
    echo "== simulate, $ROUNDS rounds in one process on --device $device"
    started=$(date +%s.%N)
    "$PY" -m coordinator.simulate --config examples/federation.toml --data-dir "$DATA" --rounds "$ROUNDS" \
        --device "$device" --out "$SCRATCH/simulate-$device" 2>/dev/null | grep -E "^(Run finished|Federated model)" | tail -2
    echo "simulate $device: $(seconds_since "$started") s command to exit"
done

for device in $DEVICES; do
    echo "== run-local, resnet18, 5 rounds, on --device $device"
    "$PY" bench/run_local.py --data-dir "$DATA" --rounds 5 --device "$device" --model resnet18
done
