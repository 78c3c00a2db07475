"""Run folders of the verbs: where a run lives, what ``config.json`` records, resume and overwrite.

Rules (checked by :func:`check_run_folder` before any data is loaded, so a usage error leaves
nothing behind):

* ``--output DIR`` that already holds a run (``config.json``, ``log.txt`` or a checkpoint) is
  refused unless ``--resume`` (continue it) or ``--overwrite`` (delete that run's files first);
* ``--resume`` needs ``--output``, a run of the same verb there, started with the same
  settings (except those in :data:`RESUME_MAY_DIFFER`); a run folder whose run never reached
  its first checkpoint is started from the beginning, and the log says so;
* ``config.json`` records the options, the command line (``argv``), the minibasis version and
  the git commit of the source tree when there is one; not the run folder's own path (the
  folder is where ``config.json`` is, and may be moved or copied: ``--resume`` continues the
  run in the folder it is given, wherever that is);
* under mpirun, rank 0 alone checks and creates the folder and every rank follows its verdict
  (each rank looking for itself could see the ``config.json`` another has just written);
* a write that fails for lack of room (a full disk, a quota, a file-size limit, a read-only
  file system) ends the command with one line that names the file and the run's last
  complete checkpoint (:func:`write_failure_message`), also appended to ``log.txt`` when it can be.
"""
from __future__ import annotations

import datetime as _dt
import errno
import subprocess
from pathlib import Path

from minibasis import distributed
from minibasis.experiments.errors import UserError, first_line
from minibasis.training import RunFolder, read_json

__all__ = ["RESUME_MAY_DIFFER", "VALUE_BEFORE_OPTION_EXISTED", "default_output", "run_config", "check_run_folder", "prepare_run_folder",
           "holds_a_run", "git_commit", "WRITE_ERRNOS", "write_failure_message"]

# Settings a resumed run may change: where the run lives, how chatty it is, how it is
# evaluated, anomaly checks, and (``train``) the number of epochs, to extend a run: the
# schedule does not depend on it, so the parameters still equal an uninterrupted run's. A
# different device continues the run too, equal to rounding rather than bit for bit.
RESUME_MAY_DIFFER = frozenset({"resume", "overwrite", "output", "device", "quiet", "verb", "limit",
                               "detect_anomaly", "epochs", "argv", "minibasis_version", "git_commit"})

# Options added after runs were recorded: a config.json without one was written before the option
# existed, and that run behaved as this value does (so it resumes under today's defaults).
VALUE_BEFORE_OPTION_EXISTED = {"allocation": "uniform", "distill": False, "distill_weight": None,
                               "temperature": None, "teacher": None, "calibration_images": None,
                               "learn_basis": False, "basis_lr_scale": None}

# What a verb writes into its run folder (``--overwrite`` deletes these, and nothing else).
RUN_FILES = ("config.json", "log.txt", "checkpoint-*.npz", "metrics-*.json", "metrics-*.csv", "results.json",
             "results.csv", "model.npz", "report.json", "sweep.json", "sweep.csv", "eval.json", "compare.json", "*.png")


def default_output(verb: str) -> Path:
    """``runs/<verb>-<YYYYmmdd-HHMMSS>`` under the current directory."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{verb}-{stamp}"


def git_commit() -> str | None:
    """The commit of the source tree minibasis runs from, or None (not a git checkout, no git)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _without_output(argv: list[str]) -> list[str]:
    """``argv`` less ``--output DIR`` (or ``--output=DIR``, or an abbreviation argparse accepts)."""
    kept, skip_next = [], False
    for item in argv:
        if skip_next:
            skip_next = False
            continue
        name = item.split("=", 1)[0]
        if len(name) >= len("--ou") and "--output".startswith(name):
            skip_next = "=" not in item
            continue
        kept.append(item)
    return kept


def run_config(run) -> dict:
    """What ``config.json`` records: the options of the :class:`~minibasis.experiments.options.RunSpec`
    ``run`` (its ``config``: every option and the command line), the minibasis version and the
    git commit; not the run folder's own path."""
    import minibasis

    config = {k: v for k, v in run.config.items() if k != "output"}
    config["argv"] = _without_output(list(config.get("argv") or []))
    return {**config, "minibasis_version": minibasis.__version__, "git_commit": git_commit()}


def holds_a_run(folder: Path) -> bool:
    folder = Path(folder)
    return folder.is_dir() and ((folder / "config.json").exists() or (folder / "log.txt").exists()
                                or any(folder.glob("checkpoint-*.npz")))


def _read_config(folder: Path) -> dict | None:
    try:
        return read_json(Path(folder) / "config.json")
    except ValueError as exc:
        raise UserError(first_line(exc)) from None


def _check_same_settings(saved: dict | None, current: dict, folder: Path) -> None:
    if saved is None:
        raise UserError(f"--resume: {folder} holds no config.json; it is not a run folder of this command")
    if saved.get("verb") != current.get("verb"):
        raise UserError(f"--resume: {folder} is a '{saved.get('verb')}' run, not a '{current.get('verb')}' run")
    saved = {**{k: v for k, v in VALUE_BEFORE_OPTION_EXISTED.items() if k in current}, **saved}
    differ = [k for k in sorted(set(saved) | set(current))
              if k not in RESUME_MAY_DIFFER and saved.get(k) != current.get(k)]
    if differ:
        details = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} then, {current.get(k)!r} now" for k in differ[:4])
        raise UserError(f"--resume: the run in {folder} was started with other settings ({details}); "
                        "resume with the same options")


def check_run_folder(run) -> None:
    """A :class:`UserError` unless ``--output`` may be used as ``run`` (a RunSpec) asks; no side
    effects, so verbs call it before loading data. Under mpirun rank 0 looks and every rank gets
    its verdict."""
    distributed.main_process_decides(_check_run_folder, run)


def _check_run_folder(run) -> None:
    if run.resume and run.overwrite:
        raise UserError("give --resume (continue the run) or --overwrite (replace it), not both")
    if run.resume:
        if run.output is None:
            raise UserError("--resume needs --output DIR: the folder of the run to continue")
        folder = Path(run.output)
        _check_same_settings(_read_config(folder), run_config(run), folder)
        return
    if run.output is not None and holds_a_run(Path(run.output)) and not run.overwrite:
        hint = " --resume to continue it," if run.resume is not None else ""
        raise UserError(f"--output {run.output} already holds a run; pass{hint} --overwrite to replace it, "
                        "or choose another --output")


def prepare_run_folder(run) -> RunFolder:
    """Create (or, with ``--resume``, reopen) the run folder of ``run`` (a RunSpec) and record
    ``config.json``. Under mpirun rank 0 checks and creates it before any rank writes, and every
    rank gets its path (the default one carries a time stamp) or its error."""
    return RunFolder(distributed.main_process_decides(_create_run_folder, run))


def _create_run_folder(run) -> Path:
    _check_run_folder(run)
    folder_path = Path(run.output) if run.output is not None else default_output(run.verb)
    if run.overwrite and folder_path.is_dir():
        for pattern in RUN_FILES:
            for old in folder_path.glob(pattern):
                if old.is_file():
                    old.unlink()
    try:
        folder = RunFolder(folder_path)
    except OSError as exc:
        raise UserError(f"cannot create the output folder {folder_path}: {exc.strerror or exc}") from None
    if not run.resume:
        folder.write_config(run_config(run))
    return folder_path


# Errors of a write that found no room: they never come from reading, so the file named is
# one being written.
WRITE_ERRNOS = frozenset(getattr(errno, name) for name in ("ENOSPC", "EFBIG", "EDQUOT", "EROFS") if hasattr(errno, name))


def write_failure_message(exc: OSError) -> str | None:
    """``cannot write FILE: REASON; the last complete checkpoint is CHECKPOINT`` (or ``; no
    checkpoint was completed``) for an ``OSError`` in :data:`WRITE_ERRNOS` naming its file, else
    None. When FILE lies in a run folder, the message is appended to its ``log.txt`` if that
    can still be written (the folder's checkpoints are all complete: they are written to a
    temporary file and renamed)."""
    if exc.errno not in WRITE_ERRNOS or exc.filename is None:
        return None
    target = Path(exc.filename)
    message = f"cannot write {target}: {exc.strerror or errno.errorcode.get(exc.errno)}"
    folder = target.parent
    if not holds_a_run(folder):
        return message
    checkpoints = sorted(folder.glob("checkpoint-*.npz"), key=lambda p: p.stat().st_mtime)
    message += (f"; the last complete checkpoint is {checkpoints[-1]}" if checkpoints
                else "; no checkpoint was completed")
    if distributed.is_main_process():
        try:
            RunFolder(folder, quiet=True).log(f"error: {message}")
        except OSError:
            pass  # the log is what cannot be written: the message still reaches the terminal
    return message
