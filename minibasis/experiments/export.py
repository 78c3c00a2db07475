"""``minibasis export MODEL_FILE --format onnx|safetensors --output PATH``: a model file in a shared format.

MODEL_FILE is anything ``minibasis.load_model`` reads (a minibasis ``.npz`` / ``.safetensors`` —
zoo, compressed or fine-tuned —, a PyTorch checkpoint, an ``.onnx`` graph). ``--format onnx``
writes a standard ONNX inference graph (a BasisConv layer is two plain ``Conv`` nodes;
``--fold-batch-norm`` folds each BatchNorm into its conv first) and checks it where it is made:
onnxruntime runs the graph on a few random inputs and the file is written only if its logits
equal minibasis's to float32 rounding. ``--format safetensors`` writes the model record as
safetensors (weights as tensors, the rest in its metadata).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from minibasis.experiments.errors import UserError, first_line

__all__ = ["ExportSpec", "add_arguments", "parse", "run"]

FORMATS = {"onnx": ".onnx", "safetensors": ".safetensors"}


@dataclass(frozen=True)
class ExportSpec:
    model_file: Path
    format: str
    output: Path
    fold_batch_norm: bool
    opset: int
    input_shape: tuple | None


def add_arguments(parser) -> None:
    parser.add_argument("model_file", metavar="MODEL_FILE", help="a model file (.npz, .safetensors, .th/.pth, .onnx)")
    parser.add_argument("--format", choices=sorted(FORMATS), required=True, help="the format written")
    parser.add_argument("--output", required=True, metavar="PATH", help="the file written (.onnx / .safetensors)")
    parser.add_argument("--fold-batch-norm", action="store_true",
                        help="onnx: fold each BatchNorm into the conv before it (fewer nodes, same logits)")
    parser.add_argument("--opset", type=int, default=17, help="onnx: the operator-set version written (13–21)")
    parser.add_argument("--input-shape", default=None, metavar="N,C,H,W",
                        help="onnx: the traced input shape (default: the model's own, else 1,3,32,32)")


def parse(args) -> ExportSpec:
    model_file, output = Path(args.model_file), Path(args.output)
    if not model_file.is_file():
        raise UserError(f"model file {model_file} does not exist")
    if output.suffix != FORMATS[args.format]:
        raise UserError(f"--output {output} should end in {FORMATS[args.format]} for --format {args.format}")
    if not output.parent.is_dir():
        raise UserError(f"--output {output}: the folder {output.parent} does not exist")
    if args.format != "onnx" and (args.fold_batch_norm or args.input_shape or args.opset != 17):
        raise UserError("--fold-batch-norm, --opset and --input-shape apply to --format onnx only")
    shape = None
    if args.input_shape:
        try:
            shape = tuple(int(n) for n in args.input_shape.split(","))
        except ValueError:
            shape = ()
        if len(shape) != 4 or min(shape) < 1:
            raise UserError(f"--input-shape must be four positive integers N,C,H,W, got {args.input_shape!r}")
    return ExportSpec(model_file, args.format, output, args.fold_batch_norm, args.opset, shape)


def run(args) -> int:
    spec = parse(args)
    import minibasis
    from minibasis.training import CheckpointError

    try:
        model, metadata = minibasis.load_model(spec.model_file)
    except (CheckpointError, ValueError, TypeError, OSError) as exc:
        raise UserError(f"cannot read the model file {spec.model_file}: {first_line(exc)}") from None
    if spec.format == "safetensors":
        try:
            normalization = metadata.normalization or ((metadata.mean, metadata.std) if metadata.mean else None)
            minibasis.save_model(model, spec.output, architecture=metadata.architecture,
                                 normalization=normalization, dataset=metadata.dataset)
        except (ValueError, TypeError, OSError) as exc:
            raise UserError(f"cannot write {spec.output}: {first_line(exc)}") from None
        print(f"wrote {spec.output} (safetensors, {len(model.state_dict())} tensors)")
        return 0
    try:
        from minibasis.onnx import CHECK_TOLERANCE, save_model
    except ImportError as exc:
        raise UserError(f"--format onnx needs the onnx extra (pip install 'minibasis[onnx]'): {exc}") from None
    shape = spec.input_shape or tuple(metadata.extra.get("input_shape") or (1, 3, 32, 32))
    try:
        worst = save_model(model, spec.output, shape, opset=spec.opset, fold_batch_norm=spec.fold_batch_norm,
                           check=True)
    except (CheckpointError, ValueError, TypeError, OSError) as exc:
        raise UserError(f"cannot export {spec.model_file}: {first_line(exc)}") from None
    print(f"wrote {spec.output} (ONNX opset {spec.opset}{', BatchNorm folded' if spec.fold_batch_norm else ''}); "
          f"onnxruntime's logits equal minibasis's to {worst:.2g} of their scale (allowed {CHECK_TOLERANCE:g})")
    return 0
