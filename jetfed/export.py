"""`jetfed export`: a run's model as ONNX (for TensorRT on the boards) or TorchScript
(for torch without jetfed), checked against torch before it is kept.

The weights come from a coordinator's --out folder: its final model.safetensors, or
with --round the round its checkpoint holds (the file its state.json names, its
SHA-256 verified). They pass the same checks as weights on the wire (the model name
and every tensor's name, dtype and shape against the model the task builds, no NaN or
Inf) before they are loaded into that model, so a file from another task, model or
class list is refused naming both sides instead of exported wrong.

The export is written aside, run on real test examples when the task can load them
(random inputs shaped like the task's otherwise) beside the torch model, and put in
place only when every log-probability agrees within --tolerance; a refused export
leaves no file. Exit 0: exported and checked; 1: the export failed or disagreed with
torch; 2: a wrong setting or an unusable weights file, said in one line.

This runs on an operator's machine (the boards run the file it writes); it needs the
'export' extra for ONNX: pip install '.[export]'."""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as safetensors_load
from torch import nn

from jetfed import codec
from jetfed.data import resolve_data_dir
from jetfed.errors import CorruptPayload, InvalidConfig, JetfedError, ManifestMismatch
from jetfed.partitions import Partition
from jetfed.service_cli import add_task_choice_arguments
from jetfed.tasks import Examples, Task, TaskSettings, build_task
from jetfed.tasks.base import parse_option_flags

FORMATS = ("onnx", "torchscript")
FINAL_MODEL = "model.safetensors"
CHECKPOINT_FOLDER = "checkpoint"
STATE_FILE = "state.json"  # coordinator.checkpoint's layout, read here without importing the coordinator
INPUT_NAME = "input"
OUTPUT_NAME = "log_probs"
BATCH_AXIS = "batch"
# TensorRT 8.5 (JetPack 5.1) parses ONNX up to opset 17; JetPack 6's TensorRT reads later ones too.
DEFAULT_OPSET = 17
MIN_OPSET = 7
DEFAULT_TOLERANCE = 1e-4
DEFAULT_CHECK_EXAMPLES = 256
CHECK_BATCH = 64
CHECK_SEED = 0
# Traced with two examples, not one: a trace at batch 1 may bake the batch size in.
TRACE_BATCH = 2
EXIT_REFUSED = 1
EXIT_USAGE = 2


class ExportRefused(JetfedError):
    """The exporter failed, or its file disagrees with torch: nothing is kept."""


@dataclass(frozen=True)
class Weights:
    """A weights file as read from disk, its SHA-256 already verified where a state
    file names one."""

    path: Path
    data: bytes
    model: Optional[str]  # the "model" of its safetensors metadata, when it has one
    round: Optional[int]
    source: str  # how the output names it, e.g. "round 40 of runs/demo"


@dataclass(frozen=True)
class Agreement:
    """How the exported model's outputs compare with torch's on the same inputs."""

    examples: int
    max_difference: float
    same_class: int


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return export(args)
    except ExportRefused as exc:
        print(f"jetfed export: refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except JetfedError as exc:
        print(f"jetfed export: {exc}", file=sys.stderr)
        return EXIT_USAGE


class _OneLineParser(argparse.ArgumentParser):
    """A wrong flag is one line (and exit 2), like every other refusal here."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="jetfed export", description=__doc__.split("\n\n")[0],
        epilog="TensorRT on a Jetson: /usr/src/tensorrt/bin/trtexec --onnx=model.onnx --saveEngine=model.engine "
               "--fp16 (README: Deploy the model)",
    )
    parser.add_argument("run", type=Path, metavar="RUN_DIR",
                        help=f"a coordinator's --out folder (its {FINAL_MODEL}), or a .safetensors file")
    parser.add_argument("--format", required=True, choices=FORMATS, help="onnx (TensorRT, onnxruntime) or "
                        "torchscript (torch.jit.load, no jetfed needed)")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE", help="the file to write (replaced if it exists)")
    parser.add_argument("--round", type=int, metavar="N",
                        help=f"export round N from RUN_DIR/{CHECKPOINT_FOLDER}/ instead of the final model "
                             "(a run keeps its last completed round)")
    add_task_choice_arguments(parser, model_default="the one the weights file names")
    parser.add_argument("--data-dir", help="where the task finds its test examples for the check (default: "
                                           "$JETFED_DATA_DIR, else ./data); without them, random inputs")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset (default {DEFAULT_OPSET}: TensorRT 8.5 on JetPack 5 reads it)")
    parser.add_argument("--check-examples", type=int, default=DEFAULT_CHECK_EXAMPLES, metavar="N",
                        help=f"inputs run through torch and the export (default {DEFAULT_CHECK_EXAMPLES})")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"largest log-probability difference kept (default {DEFAULT_TOLERANCE:g})")
    return parser


def export(args: argparse.Namespace) -> int:
    if args.check_examples < 1:
        raise InvalidConfig(f"--check-examples: {args.check_examples} must be at least 1")
    if not args.tolerance >= 0:
        raise InvalidConfig(f"--tolerance: {args.tolerance} must be 0 or more")
    if not args.out.parent.is_dir():
        raise InvalidConfig(f"--out {args.out}: folder {args.out.parent} does not exist")
    if args.out.is_dir():
        suffix = "onnx" if args.format == "onnx" else "pt"
        raise InvalidConfig(f"--out {args.out} is a folder; name the file to write, e.g. {args.out / ('model.' + suffix)}")
    if args.format == "onnx" and not MIN_OPSET <= args.opset:
        raise InvalidConfig(f"--opset {args.opset}: torch exports opset {MIN_OPSET} or later (TensorRT 8.5 reads up to 17)")
    if args.format == "onnx":
        # Before any work: a missing package is named (with its extra) by `jetfed`.
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    weights = read_weights(args.run, args.round)
    task = build_task(args.task, TaskSettings(
        data_dir=resolve_data_dir(args.data_dir), device=torch.device("cpu"),
        model=args.model or weights.model, options=parse_option_flags(args.option), download=False,
    ))
    model = load_model(task, weights, args)
    inputs, described = check_inputs(task, args.check_examples)
    partial = args.out.with_name(args.out.name + ".partial")
    try:
        if args.format == "onnx":
            example = task.example_input(TRACE_BATCH)
            write_onnx(model, example, partial, args.opset)
            run = onnx_runner(partial)
        else:
            write_torchscript(model, task.example_input(TRACE_BATCH), partial)
            run = torchscript_runner(partial)
        agreement = compare(model, run, inputs)
        if not agreement.max_difference <= args.tolerance:
            raise ExportRefused(
                f"the {args.format} model differs from torch by {agreement.max_difference:.3g} in a log-probability "
                f"on {described} (limit --tolerance {args.tolerance:g}); "
                + (f"{args.out} is left as it was" if args.out.exists() else "no file written")
            )
        os.replace(partial, args.out)
    finally:
        if partial.exists():
            partial.unlink()
    print(f"exported {task.model_name} (task {task.name}, {weights.source}) to {args.out}: "
          f"{describe_format(args)}, {args.out.stat().st_size / 1e6:.1f} MB")
    print(describe_interface(task, model, args.format))
    print(f"checked against torch on {described}: max log-probability difference {agreement.max_difference:.2g} "
          f"(limit {args.tolerance:g}), same class for {agreement.same_class}/{agreement.examples}")
    return 0


# Reading the weights.


def read_weights(run: Path, round_number: Optional[int]) -> Weights:
    """The bytes of the model to export: RUN_DIR's final model, the checkpoint of
    `round_number` (SHA-256 checked against its state file), or a file given itself."""
    if not run.exists():
        raise InvalidConfig(f"{run} does not exist; RUN_DIR is a coordinator's --out folder (or a .safetensors file)")
    if run.is_file():
        if round_number is not None:
            raise InvalidConfig(f"--round {round_number}: {run} is a file; --round picks a checkpoint of a run folder")
        return _weights(run, _read(run), f"from {run}")
    if round_number is not None:
        return _checkpointed(run, round_number)
    final = run / FINAL_MODEL
    if not final.is_file():
        saved = _saved_round(run / CHECKPOINT_FOLDER)
        hint = (f"--round {saved} exports its last checkpoint" if saved is not None
                else "nor is there a checkpoint: is it a coordinator's --out folder?")
        raise InvalidConfig(f"{final} does not exist (the run has not finished); {hint}")
    return _weights(final, _read(final), f"final model of {run}")


def _checkpointed(run: Path, round_number: int) -> Weights:
    folder = run / CHECKPOINT_FOLDER
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        raise InvalidConfig(f"--round {round_number}: {state_path} does not exist; the run has no checkpoint")
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        saved, model_file, digest = int(state["round"]), str(state["model_file"]), str(state["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptPayload(f"checkpoint {state_path}: unreadable: {exc}") from None
    if saved != round_number:
        raise InvalidConfig(f"--round {round_number}: {folder} holds round {saved} only (each checkpoint replaces "
                            f"the one before); export --round {saved}, or the final model without --round")
    if Path(model_file).name != model_file:
        raise CorruptPayload(f"checkpoint {state_path}: model_file {model_file!r} is not a file name in {folder}")
    path = folder / model_file
    data = _read(path)
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise CorruptPayload(f"checkpoint {path}: sha256 {actual} does not match {state_path} ({digest})")
    weights = _weights(path, data, f"round {saved} of {run}")
    if weights.round is not None and weights.round != saved:
        raise CorruptPayload(f"checkpoint {path}: its metadata says round {weights.round}, {state_path} says {saved}")
    return weights


def _saved_round(folder: Path) -> Optional[int]:
    try:
        return int(json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))["round"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidConfig(f"{path}: cannot be read: {exc.strerror or exc}") from None


def _weights(path: Path, data: bytes, source: str) -> Weights:
    """The file's metadata (the coordinator writes "model" and "round"), read from its
    header alone."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptPayload(f"{path}: not a safetensors file: {exc}") from None
    round_text = metadata.get("round")
    round_number = int(round_text) if round_text is not None and round_text.isdigit() else None
    return Weights(path, data, metadata.get("model") or None, round_number, source)


def load_model(task: Task, weights: Weights, args: argparse.Namespace) -> nn.Module:
    """The task's model holding the file's weights, in eval mode, once the file's
    manifest matches what the task builds (codec.check_manifest, as on the wire)."""
    if args.model and weights.model and args.model != weights.model:
        raise ManifestMismatch(
            f"{weights.path} holds model {weights.model!r} (its metadata) but --model builds {args.model!r}; "
            f"drop --model, or export weights of {args.model}"
        )
    try:
        state = safetensors_load(weights.data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CorruptPayload(f"{weights.path}: not a valid safetensors file: {exc}") from None
    torch.manual_seed(0)
    model = task.build_model()
    manifest, _ = codec.encode(state, weights.model or task.model_name)
    try:
        codec.check_manifest(manifest, task.model_name, codec.spec_of(model.state_dict()))
    except JetfedError as exc:
        raise ManifestMismatch(
            f"{weights.path} does not fit task {task.name}'s model {task.model_name} "
            f"(got: the file, expected: the model): {exc}; give the --task, --model and --option the run's boards used"
        ) from None
    codec.require_finite(state, who=str(weights.path))
    model.load_state_dict(state)
    return model.eval()


# The check's inputs.


def check_inputs(task: Task, count: int) -> Tuple[List[torch.Tensor], str]:
    """Batches of `count` inputs for the check (the first holds one example, to prove
    the batch axis is free): test examples when the task can load them, which cover
    the range real inputs take; random ones shaped like the task's input otherwise."""
    generator = torch.Generator().manual_seed(CHECK_SEED)
    try:
        data: Optional[Examples] = task.load("test", Partition())
    except (JetfedError, OSError):
        data = None  # the reason (often a paragraph on how to get the data) is not this command's business
    if data is not None and len(data) > 0:
        count = min(count, len(data))
        chosen = torch.randperm(len(data), generator=generator)[:count]
        inputs = [inputs.detach().cpu().float() for inputs, _ in data.batches(_chunks(chosen))]
        return inputs, f"{count} {task.name} test examples from {task.settings.data_dir}"
    shape = tuple(task.example_input(1).shape[1:])
    drawn = torch.randn((count, *shape), generator=generator)
    return list(_chunks(drawn)), (f"{count} random inputs (no {task.name} test examples in {task.settings.data_dir}; "
                                  "--data-dir names them)")


def _chunks(items: torch.Tensor) -> List[torch.Tensor]:
    """One item, then batches of CHECK_BATCH: two batch sizes through the same file."""
    sizes: List[int] = []
    left = len(items)
    while left > 0:
        sizes.append(1 if not sizes else min(CHECK_BATCH, left))
        left -= sizes[-1]
    return list(torch.split(items, sizes))


# Writing and running the exports.


def write_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    """torch's TorchScript-based ONNX exporter, which emits the asked opset itself; the
    newer torch.export-based one (the default since torch 2.9) emits opset 18 and
    converts down, which failed for resnet18 and mobilenet_v3_small here, leaving a file
    TensorRT 8.5 cannot parse. torch 1.13 has only the former."""
    import onnx

    options: Dict[str, Any] = dict(
        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset, do_constant_folding=True,
        dynamic_axes={INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}},
    )
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        options["dynamo"] = False
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
            torch.onnx.export(model, (example,), str(path), **options)
    except Exception as exc:  # the exporter raises many kinds; all mean the same here
        raise ExportRefused(f"torch.onnx could not export the model: {_first_line(exc)}") from None
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # onnx.checker.ValidationError, shape inference errors
        raise ExportRefused(f"onnx.checker rejects the exported file: {_first_line(exc)}") from None
    written = onnx.load(str(path), load_external_data=False)
    versions = {entry.version for entry in written.opset_import if entry.domain in ("", "ai.onnx")}
    if versions != {opset}:
        raise ExportRefused(f"the exporter wrote opset {sorted(versions)}, not --opset {opset}")


def onnx_runner(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(inputs: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: inputs.numpy()})[0])

    return run


def write_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """A traced module: jetfed's models and torchvision's have no data-dependent control
    flow, and a trace needs no annotations from a task's author."""
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # torch >= 2.9 calls torch.jit deprecated; JetPack's torch reads it
            traced = torch.jit.trace(model, (example,))
            torch.jit.save(traced, str(path))
    except Exception as exc:  # tracing raises many kinds; all mean the same here
        raise ExportRefused(f"torch.jit.trace could not export the model: {_first_line(exc)}") from None


def torchscript_runner(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(path), map_location="cpu")
    loaded.eval()

    def run(inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return loaded(inputs)

    return run


def compare(model: nn.Module, run: Callable[[torch.Tensor], torch.Tensor], inputs: Sequence[torch.Tensor]) -> Agreement:
    """The largest difference between torch's and the export's outputs, and how often
    both pick the same class; NaN anywhere counts as an infinite difference."""
    largest, same, total = 0.0, 0, 0
    for batch in inputs:
        with torch.no_grad():
            expected = model(batch)
        got = run(batch)
        if got.shape != expected.shape:
            raise ExportRefused(f"the export returns shape {list(got.shape)} for a batch of {len(batch)}, torch "
                                f"{list(expected.shape)}")
        difference = (got.float() - expected.float()).abs()
        worst = float(difference.max()) if difference.numel() else 0.0
        largest = max(largest, worst) if worst == worst else float("inf")
        same += int((got.argmax(dim=1) == expected.argmax(dim=1)).sum()) if got.dim() > 1 else 0
        total += len(batch)
    return Agreement(total, largest, same)


def describe_format(args: argparse.Namespace) -> str:
    return f"ONNX opset {args.opset}" if args.format == "onnx" else "TorchScript (traced)"


def describe_interface(task: Task, model: nn.Module, fmt: str) -> str:
    """How a board calls the file: names and shapes, the batch axis free."""
    shape = [BATCH_AXIS, *task.example_input(1).shape[1:]]
    with torch.no_grad():
        out = [BATCH_AXIS, *model(task.example_input(1)).shape[1:]]
    if fmt == "onnx":
        return f"input {INPUT_NAME!r} float32 {_dims(shape)} -> output {OUTPUT_NAME!r} float32 {_dims(out)} (log-probabilities)"
    return f"call it with a float32 tensor {_dims(shape)}; it returns log-probabilities {_dims(out)}"


def _dims(shape: Sequence[object]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
