"""Trace one `minibasis finetune` from the verb's run() to the first call of eigen_basis.

sys.setprofile sees every Python call/return. A *stop* is a call made from top-floor code
(minibasis/cli.py, minibasis/experiments/*) into a function of another minibasis file; a
*return* is a return from a top-floor function to top-floor code in another file. Comprehensions,
generator expressions and lambdas are not functions of their own (their frames are skipped).

Usage: ``python3 bench/trace_finetune.py [REPOSITORY]`` (default: this checkout). Runs on synthetic
data with the shared pretrained ResNet-20 ($MINIBASIS_SHARED), in a temporary folder.
"""
import os
import sys
import tempfile
from pathlib import Path

root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]).resolve() / "minibasis"
sys.path.insert(0, str(root.parent))
workdir = tempfile.mkdtemp(prefix="trace-finetune-")
os.chdir(workdir)
import minibasis.cli  # noqa: E402

def rel(code):
    try:
        return str(Path(code.co_filename).resolve().relative_to(root.parent))
    except ValueError:
        return None

def top(f):
    return f is not None and (f == "minibasis/cli.py" or f.startswith("minibasis/experiments/"))

SKIP = ("<listcomp>", "<genexpr>", "<lambda>", "<dictcomp>", "<setcomp>")
stops, returns, started, seen = [], 0, False, []

class Done(Exception):
    pass

def caller_of(frame):
    f = frame.f_back
    while f is not None and f.f_code.co_name in SKIP:
        f = f.f_back
    return f

def prof(frame, event, arg):
    global returns, started
    if event not in ("call", "return") or frame.f_code.co_name in SKIP:
        return
    callee = rel(frame.f_code)
    if callee is None:
        return
    caller = caller_of(frame)
    cfile = rel(caller.f_code) if caller is not None else None
    if event == "call" and not started:
        started = callee == "minibasis/experiments/finetune.py" and frame.f_code.co_name == "run"
        if not started:
            return
    if not started:
        return
    if event == "call":
        if any(f is frame for f in seen):   # a generator resumed, not a new call
            return
        seen.append(frame)
        if frame.f_code.co_name == "eigen_basis":
            sys.setprofile(None)
            raise Done
        if top(cfile) and callee != cfile:
            stops.append(f"{callee}:{frame.f_code.co_name}")
    elif top(callee) and top(cfile) and callee != cfile:
        returns += 1

argv = ["finetune", "--dataset", "synthetic", "--train-subset", "16", "--limit", "16", "--epochs1", "1",
        "--epochs2", "0", "--quiet", "--output", str(Path(workdir) / "run")]
sys.setprofile(prof)
try:
    minibasis.cli.main(argv)
except Done:
    pass
finally:
    sys.setprofile(None)
files = []
for s in stops:
    f = s.split(":")[0]
    if not files or files[-1] != f:
        files.append(f)
print(f"{len(stops)} stops in {len(set(s.split(':')[0] for s in stops))} files, {returns} returns")
print(" -> ".join(stops))
