"""``minibasis export MODEL_FILE --format onnx|safetensors --output PATH``: a model file in a shared format.

MODEL_FILE is anything ``minibasis.load_model`` reads (a minibasis ``.npz`` / ``.safetensors`` —
zoo, compressed or fine-tuned —, a PyTorch checkpoint, an ``.onnx`` graph). ``--format onnx``
writes a standard ONNX inference graph (a BasisConv layer is two plain ``Conv`` nodes;
``--fold-batch-norm`` folds each BatchNorm into its conv first; ``--pad-basis-to`` and
``--merge-above`` choose the form a runtime's blocked kernels run fastest, see
``minibasis.onnx.runtime_form``) and checks it where it is made:
onnxruntime runs the graph on a few random inputs and the file is written only if its logits
equal minibasis's to float32 rounding. ``--format safetensors`` writes the model record as
safetensors (weights as tensors, the rest in its metadata).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from minibasis.experiments.options import ModelSpec

from minibasis.experiments import argtypes, options
from minibasis.experiments.errors import UserError, first_line
from minibasis.experiments.loading import model_argument, model_file

__all__ = ["ExportSpec", "add_arguments", "parse", "run"]

FORMATS = {"onnx": ".onnx", "safetensors": ".safetensors"}


@dataclass(frozen=True)
class ExportSpec:
    model: ModelSpec     # the MODEL_FILE (loading.model_file)
    format: str
    output: Path
    fold_batch_norm: bool
    opset: int
    input_shape: tuple | None
    pad_basis_to: int | None = None
    merge_above: float | None = None


def add_arguments(parser) -> None:
    parser.add_argument("model_file", metavar="MODEL_FILE", help="a model file (.npz, .safetensors, .th/.pth, .onnx)")
    parser.add_argument("--format", choices=sorted(FORMATS), required=True, help="the format written")
    parser.add_argument("--output", required=True, type=argtypes.output_file, metavar="PATH",
                        help="the file written (.onnx / .safetensors)")
    parser.add_argument("--fold-batch-norm", action="store_true",
                        help="onnx: fold each BatchNorm into the conv before it (fewer nodes, same logits)")
    parser.add_argument("--opset", type=argtypes.positive, default=17, help="onnx: the operator-set version written (13–21)")
    parser.add_argument("--pad-basis-to", type=argtypes.positive, default=None, metavar="K",
                        help="onnx: round each BasisConv's basis count up to a multiple of K (zero filters, same "
                             "logits) so a runtime's blocked kernels run it (onnxruntime on AVX-512: 16)")
    parser.add_argument("--merge-above", type=argtypes.positive_float, default=None, metavar="R",
                        help="onnx: write a BasisConv whose own multiplication ratio Q/M + Q/D exceeds R as one conv")
    parser.add_argument("--input-shape", default=None, metavar="N,C,H,W",
                        help="onnx: the traced input shape (default: the model's own, else 1,3,32,32)")


def parse(args) -> ExportSpec:
    """The checked options (:func:`options.verb_spec`); reads no file."""
    spec = options.verb_spec(args, "export")
    o, output = spec.options, Path(spec.run.output)
    if output.suffix != FORMATS[o.format]:
        raise UserError(f"--output {output} should end in {FORMATS[o.format]} for --format {o.format}")
    onnx_only = o.fold_batch_norm or o.input_shape or o.opset != 17 or o.pad_basis_to or o.merge_above
    if o.format != "onnx" and onnx_only:
        raise UserError("--fold-batch-norm, --pad-basis-to, --merge-above, --opset and --input-shape apply to "
                        "--format onnx only")
    shape = None
    if o.input_shape:
        try:
            shape = tuple(int(n) for n in o.input_shape.split(","))
        except ValueError:
            shape = ()
        if len(shape) != 4 or min(shape) < 1:
            raise UserError(f"--input-shape must be four positive integers N,C,H,W, got {o.input_shape!r}")
    return ExportSpec(model_file(o.model_file, "MODEL_FILE"), o.format, output, o.fold_batch_norm, o.opset, shape,
                      o.pad_basis_to, o.merge_above)


def run(args) -> int:
    spec = parse(args)
    import minibasis
    from minibasis.training import CheckpointError

    model, metadata = model_argument(spec.model)
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
        from minibasis.onnx import CHECK_TOLERANCE, runtime_form, save_model
    except ImportError as exc:
        raise UserError(f"--format onnx needs the onnx extra (pip install 'minibasis[onnx]'): {exc}") from None
    shape = spec.input_shape or tuple(metadata.extra.get("input_shape") or (1, 3, 32, 32))
    try:
        forms = []
        if spec.pad_basis_to or spec.merge_above:  # the same function, in the form the runtime's kernels run best
            model, forms = runtime_form(model, spec.pad_basis_to, spec.merge_above)
        worst = save_model(model, spec.output, shape, opset=spec.opset, fold_batch_norm=spec.fold_batch_norm,
                           check=True)
    except (CheckpointError, ValueError, TypeError, OSError) as exc:
        raise UserError(f"cannot export {spec.model.checkpoint}: {first_line(exc)}") from None
    print(f"wrote {spec.output} (ONNX opset {spec.opset}{', BatchNorm folded' if spec.fold_batch_norm else ''}); "
          f"onnxruntime's logits equal minibasis's to {worst:.2g} of their scale (allowed {CHECK_TOLERANCE:g})")
    for line in forms:
        print(f"  {line}")
    return 0
