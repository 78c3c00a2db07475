"""The ``minibasis`` command line: one verb per sub-command module.

Each verb lives in ``minibasis/experiments/<module>.py`` and exposes
``add_arguments(parser)`` and ``run(args) -> int``. Errors that a user can fix
(missing data, a checkpoint that does not fit, a bad option) are printed as one
line on stderr with exit code 2, never as a traceback. A write that finds no room (a full
disk, a quota, a file-size limit) ends with one line naming the file and the run's last
complete checkpoint, and exit code 74 (``EX_IOERR`` of sysexits.h).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from minibasis.experiments.errors import UserError, first_line

EXIT_USAGE = 2          # an error the user can fix: bad option, missing data, a folder in use
EXIT_WRITE_FAILED = 74  # no room to write (ENOSPC, EFBIG, EDQUOT, EROFS): sysexits.h's EX_IOERR
EXIT_INTERRUPTED = 130  # Ctrl-C

# verb -> (module under minibasis.experiments, one-line help)
VERBS = {
    "demo": ("demo", "train, compress and measure a small CNN on built-in synthetic data (seconds)"),
    "count": ("count", "parameters, filters and conv multiplications of a model: measured vs formula"),
    "compress": ("compress_cmd", "compress a trained model's convolutions at an energy threshold"),
    "sweep": ("sweep", "the paper's Figure 2: retained filters and accuracy across thresholds"),
    "finetune": ("finetune", "the paper's two-step fine-tuning of a compressed network"),
    "train": ("train", "train a zoo model from scratch, optionally with fixed random bases"),
    "eval": ("evaluate", "evaluate a model and checkpoint on a test set"),
    "compare": ("compare", "several runs' test accuracy per epoch side by side, with reference lines"),
    "export": ("export", "write a model file as ONNX (checked in onnxruntime) or safetensors"),
    "verify": ("verify", "check the paper's formulas and the exactness of t = 1 against what executes"),
}


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit code 2 (``argument --epochs: must be ...`` reads
    ``--epochs must be ...``)."""

    def error(self, message):
        if message.startswith("argument ") and ": " in message:
            option, _, reason = message.removeprefix("argument ").partition(": ")
            message = f"{option.split('/')[-1]} {reason}"
        self.exit(2, f"{self.prog}: error: {message}\n")


DESCRIPTION = ("BasisConv (Tayyab & Mahalanobis): compress a CNN's convolutions into basis filters and "
               "1x1 combinations, measure the multiplications, fine-tune, and check the paper's formulas.")
EPILOG = """examples:
  minibasis demo                               train, compress and measure a small CNN (seconds)
  minibasis count paper                        the paper's four nets: parameters, filters, conv mults
  minibasis compress --depth 20 --threshold 0.9 --evaluate
  minibasis VERB --help                        the options of one verb"""


def build_parser(available: dict) -> argparse.ArgumentParser:
    from minibasis import __version__

    parser = _Parser(prog="minibasis", description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"minibasis {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for verb, (module, help_text) in available.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def _available_verbs() -> dict:
    found = {}
    for verb, (name, help_text) in VERBS.items():
        try:
            found[verb] = (importlib.import_module(f"minibasis.experiments.{name}"), help_text)
        except ModuleNotFoundError as exc:
            if exc.name != f"minibasis.experiments.{name}":
                raise
    return found


def main(argv=None) -> int:
    # Under mpirun (data-parallel training, minibasis.distributed): join the process group before
    # anything can fail, so that an exception on one rank ends every rank, and turn a non-zero
    # exit status on one rank into an abort of all (a rank that just returned would leave the
    # others blocked in their next collective).
    from minibasis import distributed
    if distributed.launched_by_mpi():
        distributed.init()
        code, on_every_rank = _run_verb(argv)
        return distributed.finalize(code, on_every_rank)
    return _run_verb(argv)[0]


def _run_verb(argv=None) -> tuple[int, bool]:
    """The verb's exit status, and whether every rank ends with it (an error that rank 0 decided
    for all of them under mpirun: then only rank 0 prints it)."""
    from minibasis import distributed
    from minibasis.experiments import runs

    available = _available_verbs()
    parser = build_parser(available)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv, namespace=argparse.Namespace(_argv=argv))  # argv is recorded in config.json
    except SystemExit as exc:
        if exc.code == 2 and argv and argv[0] in available:
            return EXIT_USAGE, False   # a usage error of a verb, already printed on one line
        raise

    def error(message: str, code: int, exc: BaseException | None = None) -> tuple[int, bool]:
        on_every_rank = bool(getattr(exc, "on_every_rank", False))
        if not on_every_rank or distributed.is_main_process():
            print(f"minibasis {args.verb}: error: {message}", file=sys.stderr)
        return code, on_every_rank

    from minibasis.measure import BatchCountError

    try:
        return int(args._module.run(args) or 0), False
    except (UserError, FileNotFoundError) as exc:
        return error(str(exc), EXIT_USAGE, exc)
    except BatchCountError as exc:  # a measured count that is not per image: the report would be wrong
        return error(str(exc), 1, exc)
    except OSError as exc:
        message = runs.write_failure_message(exc)
        if message is None:
            raise
        return error(message, EXIT_WRITE_FAILED, exc)
    except KeyboardInterrupt:
        # The verbs that write checkpoints take --resume (the run's log records the interruption).
        hint = "" if not hasattr(args, "resume") else (
            "; continue with the same command" + ("" if args.resume else " plus --resume"))
        print(f"minibasis {args.verb}: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED, False


__all__ = ["main", "build_parser", "VERBS", "UserError", "first_line", "EXIT_USAGE", "EXIT_WRITE_FAILED",
           "EXIT_INTERRUPTED"]

if __name__ == "__main__":
    sys.exit(main())
