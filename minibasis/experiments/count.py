"""``minibasis count MODEL``: parameters, filters and convolution multiplications, measured and by formula.

For each model (32×32 images, eval mode, no graph; counts per image, measured at ``--batch``
images and at one, where every conv's count per image must agree):

* parameters: all of them (BatchNorm weights and biases included, running
  statistics not, as in PyTorch's ``parameters()``) and the learnable ones;
* conv filters, two ways: plain, Σ M over the conv layers, and the paper's
  Table 2 convention, Σ min(M, D) (D = C·kh·kw): the most basis filters a layer
  can ever need, since its M filters span at most min(M, D) dimensions;
* conv multiplications per image, **measured**: what the engine's convolution
  ops actually multiplied (``count_mults().conv``) during one forward pass, and
  beside it the **formula** M·D·Ho·Wo (``minibasis.formulas``) summed over the
  conv layers, with each layer's Ho×Wo computed by ``formulas.conv_output_size``
  from the input size that reached it. GFLOPs in the paper's sense are conv
  multiplications / 10⁹.

A MODEL may also be a model file (a minibasis ``model.npz`` / ``.safetensors``, a PyTorch ``.th``/``.pth``
or an ONNX graph ``.onnx``, counted at its own input size):
it is counted as the file describes it — compressed and random-basis models with their BasisConv
layout — e.g. ``minibasis count docs/results/table3-basis/model.npz``.

For the paper's four CIFAR-100 nets (alexnet, vgg16, resnet110 with 1×1-conv
shortcuts, densenet190) the paper's Table 1 parameters and Table 2 filters and
GFLOPs are printed beside the measurements; docs/models.md explains which of
them the same nets reproduce and which they cannot.
"""
from __future__ import annotations

import json
import sys
from typing import Any

from minibasis.experiments import argtypes, options
from minibasis.experiments.errors import UserError
from minibasis.measure import REPORT_BATCH, batches_note, profile
from minibasis.nn import Module

__all__ = ["PAPER_FIGURES", "PAPER_NAMES", "count_model", "model_config",
           "format_table", "format_layers", "add_arguments", "run"]

#: The paper's figures for its CIFAR-100 nets: Table 1 parameters, Table 2 filters and GFLOPs (conv mults / 10⁹),
#: and the configuration those nets have (bearpaw's zoo: 100 classes, 1×1-conv shortcuts for the ResNet).
PAPER_FIGURES = {
    "alexnet": {"params": 2_495_396, "filters": 1152, "gflops": 0.24, "config": {"num_classes": 100}},
    "vgg16": {"params": 14_765_988, "filters": 4187, "gflops": 0.313, "config": {"num_classes": 100}},
    "resnet110": {"params": 1_736_564, "filters": 4096, "gflops": 0.253,
                  "config": {"num_classes": 100, "shortcut": "B"}},
    "densenet190": {"params": 25_821_620, "filters": 20117, "gflops": 18.678, "config": {"num_classes": 100}},
}
PAPER_NAMES = tuple(PAPER_FIGURES)

_RESNET_NAMES = ("resnet_cifar", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202")
_DEPTH_NAMES = ("resnet_cifar", "densenet_bc")


def count_model(model: Module, input_size: int = 32, in_channels: int = 3, batch: int = REPORT_BATCH) -> dict[str, Any]:
    """Parameters, filters and conv multiplications of ``model`` per input image.

    One :func:`minibasis.measure.profile` of ``batch`` images (and of one: ``batches``). Returns a dict: ``params``,
    ``learnable_params``, ``stored_values`` (parameters + persistent buffers, bases
    included), ``filters`` (Σ M), ``filters_min_md`` (Σ min(M, D)), ``conv_mults_measured``
    (the engine's conv ops, one forward pass, per image), ``conv_mults_formula`` (Σ formulas
    per conv layer), ``all_mults_measured`` (every multiplication of the forward pass,
    BatchNorm and linear included), ``gflops`` (measured conv mults / 10⁹) and ``layers``
    (one row per conv layer with its measured and formula mults). The model is left in the
    mode it had.
    """
    prof = profile(model, (batch, in_channels, input_size, input_size))
    rows = []
    for r in prof.rows:
        if not r.ran:
            raise RuntimeError(f"conv layer {r.path!r} did not run in the forward pass; cannot count it")
        row = {"layer": r.path, "type": "BasisConv2d" if r.kind == "basisconv" else "Conv2d",
               "in_channels": r.C, "out_channels": r.M, "groups": r.groups, "kernel": list(r.k),
               "stride": list(r.stride), "padding": r.padding if isinstance(r.padding, str) else list(r.padding),
               "input_hw": list(r.input), "output_hw": list(r.output), "filter_dim": r.D,
               "filters": r.M if r.Q is None else r.Q, "filters_min_md": min(r.M, r.D) if r.Q is None else r.Q,
               "formula_mults": r.formula_mults, "measured_mults": r.mults,
               "learnable_params": r.learnable, "stored_values": r.stored}
        if r.Q is not None:
            row["num_basis"] = r.Q
        rows.append(row)
    return {
        "params": model.num_parameters(),
        "learnable_params": model.num_parameters(learnable_only=True),
        "stored_values": prof.totals["model_stored"],
        "conv_layers": len(rows),
        "filters": sum(r["filters"] for r in rows),
        "filters_min_md": sum(r["filters_min_md"] for r in rows),
        "conv_mults_measured": prof.totals["model_conv_mults"],
        "conv_mults_formula": prof.totals["formula_mults"],
        "all_mults_measured": prof.totals["model_mults"],
        "gflops": prof.totals["model_conv_mults"] / 1e9,
        "input_shape": list(prof.input_shape),
        "batches": list(prof.batches),
        "layers": rows,
    }


def _is_model_file(name: str) -> bool:
    from pathlib import Path

    return Path(name).suffix.lower() in (".npz", ".th", ".pth", ".pt", ".onnx", ".safetensors") or Path(name).is_file()


def _load_file(path: str):
    """(model, description, config) of a model file (:func:`loading.model_argument`; a bare file name
    may name a shared model, :func:`common.find_model_file`)."""
    from pathlib import Path

    from minibasis.experiments.loading import model_argument, model_operand

    model, metadata = model_argument(model_operand(path, "MODEL"))
    label = Path(path).name if Path(path).parent.name in ("", ".") else f"{Path(path).parent.name}/{Path(path).name}"
    return model, label, {"num_classes": metadata.num_classes, "file": str(path),
                          "architecture": metadata.architecture.get("name")}


def _input_of(model, name: str) -> tuple[int, int]:
    """(image size, channels) to count at: an imported ONNX graph's own input, else 32×32 RGB."""
    shape = getattr(model, "input_shape", None)
    if shape is None:
        return 32, 3
    if len(shape) != 4 or shape[2] != shape[3]:
        raise UserError(f"{name}: counts are taken on square (N, C, S, S) images; the graph's input is {shape}")
    return shape[3], shape[1]


def model_config(name: str, num_classes: int | None, depth: int | None, shortcut: str | None) -> dict[str, Any]:
    """Constructor keyword arguments for ``name``: the paper's configuration for its four nets
    (CIFAR-100; bearpaw's 1×1-conv shortcuts for ResNet-110), CIFAR-10 otherwise, overridden
    by what the user gave (``depth`` and ``shortcut`` only where ``name`` takes them)."""
    from minibasis.models import MODELS

    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    config: dict[str, Any] = dict(PAPER_FIGURES.get(name, {}).get("config", {"num_classes": 10}))
    if num_classes is not None:
        config["num_classes"] = num_classes
    if depth is not None and name in _DEPTH_NAMES:
        config["depth"] = depth
    if name in _DEPTH_NAMES and "depth" not in config:
        raise UserError(f"{name} needs --depth (e.g. resnet_cifar --depth 20, densenet_bc --depth 190)")
    if shortcut is not None and name in _RESNET_NAMES:
        config["shortcut"] = shortcut
    return config


def _paper_figures(name: str, config: dict) -> dict | None:
    """The paper's figures when ``config`` is the paper's configuration of ``name``."""
    figures = PAPER_FIGURES.get(name)
    if figures is None:
        return None
    defaults = {"shortcut": "A"} if name in _RESNET_NAMES else {}
    same = all(config.get(k, defaults.get(k)) == v for k, v in figures["config"].items())
    return {k: v for k, v in figures.items() if k != "config"} if same else None


def _describe(name: str, config: dict) -> str:
    extras = ",".join(f"{k}={v}" for k, v in config.items() if k != "num_classes")
    return f"{name}({extras})" if extras else name


def format_table(reports: list[dict]) -> str:
    """One line per model: ours beside the paper's (``-`` where the paper has no figure)."""
    header = (f"{'model':<24}{'classes':>8}{'params':>13}{'paper':>13}{'stored':>13}{'filters ΣM':>12}{'Σmin(M,D)':>11}"
              f"{'paper':>8}{'conv mults measured':>21}{'formula':>15}{'GFLOPs':>9}{'paper':>9}")
    lines = [header, "-" * len(header)]
    for r in reports:
        paper = r.get("paper") or {}
        lines.append(
            f"{r['description']:<24}{r['config'].get('num_classes') or '-':>8}{r['params']:>13,}"
            f"{format(paper['params'], ',') if 'params' in paper else '-':>13}{r['stored_values']:>13,}"
            f"{r['filters']:>12,}{r['filters_min_md']:>11,}{format(paper['filters'], ',') if paper else '-':>8}"
            f"{r['conv_mults_measured']:>21,}{r['conv_mults_formula']:>15,}{r['gflops']:>9.3f}"
            f"{format(paper['gflops'], 'g') if paper else '-':>9}")
    return "\n".join(lines)


def format_layers(report: dict) -> str:
    """Per conv layer: shapes, groups g (D = (C/g)·kh·kw), filters and mults (measured vs formula)."""
    header = (f"{'layer':<28}{'M':>6}{'C':>6}{'g':>5}{'k':>6}{'s':>3}{'in':>8}{'out':>8}{'D':>7}{'min(M,D)':>9}"
              f"{'measured':>14}{'formula':>14}")
    lines = [f"{report['description']}: {report['conv_layers']} conv layers", header, "-" * len(header)]
    for r in report["layers"]:
        k = "x".join(map(str, r["kernel"]))
        lines.append(f"{r['layer']:<28}{r['out_channels']:>6}{r['in_channels']:>6}{r['groups']:>5}{k:>6}{r['stride'][0]:>3}"
                     f"{'x'.join(map(str, r['input_hw'])):>8}{'x'.join(map(str, r['output_hw'])):>8}"
                     f"{r['filter_dim']:>7}{r['filters_min_md']:>9}{r['measured_mults']:>14,}{r['formula_mults']:>14,}")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("models", nargs="+", metavar="MODEL",
                        help="model names (table3_cnn, alexnet, vgg16, vgg16_bn, resnet20/32/44/56/110/1202, "
                             "resnet_cifar --depth D, densenet190, densenet_bc --depth D), 'paper' for the "
                             "paper's four nets, or model files (model.npz, .safetensors, .th/.pth, .onnx)")
    parser.add_argument("--num-classes", type=argtypes.positive, default=None,
                        help="output classes (default: 100 for the paper's CIFAR-100 nets alexnet, vgg16, "
                             "resnet110, densenet190; 10 otherwise)")
    parser.add_argument("--depth", type=argtypes.positive, default=None, help="depth for resnet_cifar (6n+2) or densenet_bc (6n+4)")
    parser.add_argument("--shortcut", choices=("A", "B"), default=None,
                        help="CIFAR ResNet shortcut: A zero-padding (akamaster), B 1×1 conv + BN (bearpaw) "
                             "(default: B for resnet110, the paper's net; A otherwise)")
    parser.add_argument("--layers", action="store_true", help="also print one line per conv layer")
    parser.add_argument("--timing", action="store_true",
                        help="also time one forward pass of a batch of --batch zero images: per conv layer and for "
                             "the rest of the network by kind (batch norm, activations, adds, pooling, linear), "
                             "with the share of the time outside the conv layers (wall clock: noisy on a busy machine)")
    parser.add_argument("--batch", type=argtypes.positive, default=REPORT_BATCH,
                        help=f"images of the counted pass (beside one image) and of --timing (default {REPORT_BATCH})")
    parser.add_argument("--json", metavar="PATH", type=argtypes.output_file, default=None,
                        help="write the full report as JSON to PATH ('-' for standard output)")


def run(args) -> int:
    from minibasis.models import get_model

    o = options.verb_spec(args, "count").options
    files = [name for name in o.models if name != "paper" and _is_model_file(name)]
    names = []
    for name in o.models:
        names.extend(PAPER_NAMES if name == "paper" else [] if name in files else [name])
    if files and (o.num_classes is not None or o.depth is not None or o.shortcut is not None):
        raise UserError("--num-classes, --depth and --shortcut do not apply to model files (the file decides): "
                        + ", ".join(files))
    if o.depth is not None and not any(name in _DEPTH_NAMES for name in names):
        raise UserError(f"--depth applies to {' and '.join(_DEPTH_NAMES)}, not to {', '.join(names)}")
    if o.shortcut is not None and not any(name in _RESNET_NAMES for name in names):
        raise UserError(f"--shortcut applies to the CIFAR ResNets, not to {', '.join(names)}")
    builds = []
    for name in o.models:  # every name and file checked before anything is counted
        if name in files:
            builds.append((name,) + _load_file(name))
            continue
        for zoo_name in PAPER_NAMES if name == "paper" else [name]:
            config = model_config(zoo_name, o.num_classes, o.depth, o.shortcut)
            try:
                model = get_model(zoo_name, **config)
            except (ValueError, TypeError) as exc:
                raise UserError(f"cannot build {zoo_name} with {config}: {exc}") from None
            builds.append((zoo_name, model, _describe(zoo_name, config), config))
    reports = []
    for name, model, description, config in builds:
        report = {"model": name, "description": description, "config": config,
                  **count_model(model, *_input_of(model, name), batch=o.batch)}
        report["paper"] = _paper_figures(name, config)
        if o.timing:
            timed = profile(model, (o.batch,) + tuple(report["input_shape"][1:]), timing=True)
            report["timing"] = {**timed.timing, "batch": o.batch,
                                "layers": [{"layer": r.path, "forward_seconds": r.forward_seconds, "share": r.share,
                                            "mults_per_second": r.mults_per_second} for r in timed.rows],
                                "table": timed.timing_table()}
        if report["conv_mults_measured"] != report["conv_mults_formula"]:
            print(f"warning: {name}: measured conv mults {report['conv_mults_measured']:,} differ from the "
                  f"formula's {report['conv_mults_formula']:,}", file=sys.stderr)
        reports.append(report)
    text_out = sys.stderr if o.json == "-" else sys.stdout
    print(f"conv multiplications {batches_note(reports[0]['batches'])}", file=text_out)
    print(format_table(reports), file=text_out)
    print("params: parameters (learnable); stored: parameters + persistent buffers (BatchNorm statistics, "
          "fixed bases): what a saved model holds", file=text_out)
    if o.layers:
        for report in reports:
            print("\n" + format_layers(report), file=text_out)
    for report in reports:
        if "timing" in report:
            print(f"\n{report['description']}: " + report["timing"].pop("table"), file=text_out)
    if any(r["paper"] for r in reports):
        print("\nparams: all parameters, BatchNorm weights and biases included (the paper's Table 1); "
              "filters: Σ M, and Σ min(M, D) as in the paper's Table 2; GFLOPs: measured conv multiplications "
              "/ 1e9 for one 32×32 image. See docs/models.md for the figures the paper's nets do not reproduce.",
              file=text_out)
    document = {"input_shape": [1, 3, 32, 32], "models": reports}
    if o.json == "-":
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif o.json:
        from minibasis.training import write_json
        try:
            write_json(o.json, document)
        except OSError as exc:
            raise UserError(f"cannot write {o.json}: {exc}") from None
    return 0
