"""Process groups: who am I, how many are we, and the collectives the rest of the package uses.

Three communicators share one small interface (``rank``, ``size``, ``allreduce_``,
``broadcast_``, ``allgather_object``, ``broadcast_object``, ``barrier``, ``abort``):

* :class:`SingleProcess`: world size 1, every collective is the identity. It is what you get
  when nothing launched the program under MPI, so code written for several processes runs
  unchanged in one.
* :class:`MPICommunicator`: mpi4py on ``COMM_WORLD``. Host (NumPy) arrays go through MPI
  directly. CuPy arrays go through NCCL (:class:`NCCLReducer`) when ``cupy.cuda.nccl`` is
  available, else they are staged through host memory: CUDA-aware MPI is never assumed.
* The NCCL communicator is created lazily, by every rank at the same collective (the first one
  handed a CuPy array), from a unique id that rank 0 draws and broadcasts over MPI.

mpi4py is imported only when the program was started by an MPI launcher (or ``init("mpi")``
asks for it), so ``import minibasis.distributed`` costs nothing in a single process.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import traceback
from typing import Any

import numpy

__all__ = [
    "Communicator", "SingleProcess", "MPICommunicator", "NCCLReducer",
    "init", "get_world", "is_initialized", "get_rank", "get_world_size", "get_local_rank",
    "is_main_process", "barrier", "abort", "finalize", "launched_by_mpi", "DistributedError",
    "main_process_decides",
]

REDUCE_OPS = ("sum", "max", "min")

# Environment variables that MPI launchers set in every process they start (Open MPI, PMIx,
# MPICH/Hydra, Intel MPI); their presence means "we were started under mpirun".
_LAUNCHER_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK", "MPI_LOCALNRANKS")


class DistributedError(RuntimeError):
    """A distributed set-up that cannot work (missing mpi4py under a launcher, ranks that disagree)."""


def _check_op(op: str) -> str:
    if op not in REDUCE_OPS:
        raise ValueError(f"reduction op must be one of {REDUCE_OPS}, got {op!r}")
    return op


def _is_host_array(array) -> bool:
    return isinstance(array, numpy.ndarray)


class Communicator:
    """The collectives minibasis needs. In-place methods end in ``_`` and return their argument."""

    name = "abstract"
    rank = 0
    size = 1
    local_rank = 0

    def allreduce_(self, array, op: str = "sum"):
        raise NotImplementedError

    def broadcast_(self, array, root: int = 0):
        raise NotImplementedError

    def allgather_object(self, obj) -> list:
        raise NotImplementedError

    def broadcast_object(self, obj, root: int = 0):
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def abort(self, code: int = 1) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


class SingleProcess(Communicator):
    """World size 1: every collective returns its input."""

    name = "single"

    def allreduce_(self, array, op: str = "sum"):
        _check_op(op)
        return array

    def broadcast_(self, array, root: int = 0):
        if root != 0:
            raise ValueError(f"broadcast root must be a rank in [0, 1), got {root}")
        return array

    def allgather_object(self, obj) -> list:
        return [obj]

    def broadcast_object(self, obj, root: int = 0):
        return obj

    def barrier(self) -> None:
        return None

    def abort(self, code: int = 1) -> None:
        os._exit(code)


class NCCLReducer:
    """All-reduce and broadcast of CuPy arrays through NCCL, one GPU per process.

    The unique id that NCCL needs to form the clique is drawn on rank 0 and broadcast over
    the MPI communicator ``mpi_comm`` (a plain host-side exchange), so no CUDA-aware MPI is
    needed. Collectives are enqueued on CuPy's current stream, which orders them after the
    kernels that produced the data and before those that read the result.
    """

    def __init__(self, mpi_comm):
        from cupy.cuda import nccl

        self._nccl = nccl
        unique_id = nccl.get_unique_id() if mpi_comm.Get_rank() == 0 else None
        unique_id = mpi_comm.bcast(unique_id, root=0)
        self.comm = nccl.NcclCommunicator(mpi_comm.Get_size(), unique_id, mpi_comm.Get_rank())
        self._dtypes = {
            numpy.dtype(numpy.float16): nccl.NCCL_FLOAT16, numpy.dtype(numpy.float32): nccl.NCCL_FLOAT32,
            numpy.dtype(numpy.float64): nccl.NCCL_FLOAT64, numpy.dtype(numpy.int32): nccl.NCCL_INT32,
            numpy.dtype(numpy.int64): nccl.NCCL_INT64, numpy.dtype(numpy.uint8): nccl.NCCL_UINT8,
        }
        self._ops = {"sum": nccl.NCCL_SUM, "max": nccl.NCCL_MAX, "min": nccl.NCCL_MIN}

    def _dtype(self, array) -> int:
        try:
            return self._dtypes[numpy.dtype(array.dtype)]
        except KeyError:
            raise TypeError(f"NCCL cannot reduce dtype {array.dtype}; expected one of "
                            f"{sorted(str(d) for d in self._dtypes)}") from None

    @staticmethod
    def _stream() -> int:
        import cupy
        return cupy.cuda.get_current_stream().ptr

    def allreduce_(self, array, op: str):
        ptr = array.data.ptr
        self.comm.allReduce(ptr, ptr, array.size, self._dtype(array), self._ops[op], self._stream())
        return array

    def broadcast_(self, array, root: int):
        self.comm.bcast(array.data.ptr, array.size, self._dtype(array), root, self._stream())
        return array


class MPICommunicator(Communicator):
    """``MPI.COMM_WORLD`` through mpi4py; CuPy arrays through NCCL (or host staging)."""

    name = "mpi"

    def __init__(self, use_nccl: bool | None = None):
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise DistributedError(
                "minibasis.distributed needs mpi4py to run under an MPI launcher: "
                f"pip install 'minibasis[mpi]' ({exc})") from exc
        self._MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        # Processes sharing a node (and its GPUs): the rank among them picks the GPU.
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank = node.Get_rank()
        self.local_size = node.Get_size()
        node.Free()
        if use_nccl is None:
            use_nccl = os.environ.get("MINIBASIS_NCCL", "1") != "0"
        self.use_nccl = bool(use_nccl)
        self._nccl: NCCLReducer | None = None
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}

    # -- device arrays ---------------------------------------------------
    def _device_reducer(self) -> NCCLReducer | None:
        """The NCCL communicator, made on first use (a collective: every rank reaches it together)."""
        if not self.use_nccl:
            return None
        if self._nccl is None:
            from cupy.cuda import nccl
            if not nccl.available:
                self.use_nccl = False
                return None
            self._nccl = NCCLReducer(self.comm)
        return self._nccl

    @staticmethod
    def _contiguous_check(array, what: str) -> None:
        flags = getattr(array, "flags", None)
        if flags is not None and not flags.c_contiguous:
            raise ValueError(f"{what} needs a C-contiguous array, got shape {array.shape} with strides {array.strides}")

    # -- collectives -----------------------------------------------------
    def allreduce_(self, array, op: str = "sum"):
        _check_op(op)
        self._contiguous_check(array, "allreduce_")
        if _is_host_array(array):
            self.comm.Allreduce(self._MPI.IN_PLACE, array, op=self._ops[op])
            return array
        reducer = self._device_reducer()
        if reducer is not None:
            return reducer.allreduce_(array, op)
        host = numpy.ascontiguousarray(array.get())  # staged: CUDA-aware MPI is not assumed
        self.comm.Allreduce(self._MPI.IN_PLACE, host, op=self._ops[op])
        array.set(host)
        return array

    def broadcast_(self, array, root: int = 0):
        if not 0 <= root < self.size:
            raise ValueError(f"broadcast root must be a rank in [0, {self.size}), got {root}")
        self._contiguous_check(array, "broadcast_")
        if _is_host_array(array):
            self.comm.Bcast(array, root=root)
            return array
        reducer = self._device_reducer()
        if reducer is not None:
            return reducer.broadcast_(array, root)
        host = numpy.ascontiguousarray(array.get())
        self.comm.Bcast(host, root=root)
        array.set(host)
        return array

    def allgather_object(self, obj) -> list:
        return self.comm.allgather(obj)

    def broadcast_object(self, obj, root: int = 0):
        return self.comm.bcast(obj, root=root)

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, code: int = 1) -> None:
        self.comm.Abort(code)


# ---------------------------------------------------------------------------
# The process-wide world
# ---------------------------------------------------------------------------
_world: Communicator | None = None
_previous_excepthook = None


def launched_by_mpi() -> bool:
    """Whether an MPI launcher (mpirun, mpiexec, srun with PMI) started this process."""
    return any(name in os.environ for name in _LAUNCHER_SIZE_VARIABLES)


def _select_local_gpu(world: Communicator) -> None:
    """Pin each process on a node to its own GPU (local rank modulo GPU count), if CuPy has GPUs.

    NCCL requires distinct devices per rank, and CuPy allocates on the current device, so this
    must happen before the first CuPy array is made: hence in :func:`init`.
    """
    if importlib.util.find_spec("cupy") is None:
        return
    try:
        import cupy
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no driver or no device: the run stays on the CPU
        return
    if count > 0:
        cupy.cuda.Device(world.local_rank % count).use()


def _abort_on_uncaught_exception(exc_type, exc, tb) -> None:
    """sys.excepthook under MPI: report which rank failed, then abort every rank.

    Without it, a rank that dies leaves the others blocked forever in their next collective.
    """
    world = _world
    rank, size = (world.rank, world.size) if world is not None else (0, 1)
    try:
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        sys.stderr.write(f"[rank {rank}] {text}")
        sys.stderr.write(f"minibasis.distributed: rank {rank} of {size} failed with "
                         f"{exc_type.__name__}: {exc}; aborting all {size} ranks\n")
        sys.stderr.flush()
        sys.stdout.flush()
    finally:
        if world is not None and world.size > 1:
            world.abort(1)
        elif _previous_excepthook is not None:
            _previous_excepthook(exc_type, exc, tb)


def init(comm: str = "auto", abort_on_exception: bool = True, use_nccl: bool | None = None) -> Communicator:
    """Set up the process group once (later calls return the same one) and return it.

    Args:
        comm: ``"auto"`` (MPI when an MPI launcher started this process, else a single process),
            ``"mpi"`` (always mpi4py, even for one process) or ``"single"``.
        abort_on_exception: with more than one rank, install a ``sys.excepthook`` that prints
            the failing rank and its traceback and calls ``MPI.COMM_WORLD.Abort``, so that one
            rank's exception ends every rank instead of leaving them blocked in a collective.
        use_nccl: reduce CuPy arrays through NCCL (default: yes where available, unless the
            environment sets ``MINIBASIS_NCCL=0``); otherwise they are staged through host memory.

    Under a launcher without mpi4py installed this raises :class:`DistributedError` rather than
    letting every rank train alone on the full data set.
    """
    global _world, _previous_excepthook
    if comm not in ("auto", "mpi", "single"):
        raise ValueError(f"init: comm must be 'auto', 'mpi' or 'single', got {comm!r}")
    if _world is not None:
        if comm != "auto" and comm != _world.name:
            raise DistributedError(f"init({comm!r}): already initialized as {_world.name!r}")
        return _world
    if comm == "single" or (comm == "auto" and not launched_by_mpi()):
        _world = SingleProcess()
        return _world
    world = MPICommunicator(use_nccl=use_nccl)
    _world = world
    if world.size > 1:
        _select_local_gpu(world)
        if abort_on_exception:
            _previous_excepthook = sys.excepthook
            sys.excepthook = _abort_on_uncaught_exception
    return world


def get_world() -> Communicator:
    """The initialized communicator, or a :class:`SingleProcess` one when ``init`` was not called."""
    return _world if _world is not None else SingleProcess()


def is_initialized() -> bool:
    return _world is not None


def get_rank() -> int:
    return get_world().rank


def get_world_size() -> int:
    return get_world().size


def get_local_rank() -> int:
    return get_world().local_rank


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the one that writes checkpoints, logs, plots."""
    return get_world().rank == 0


def barrier() -> None:
    get_world().barrier()


def main_process_decides(fn, *args, **kwargs):
    """Call ``fn(*args, **kwargs)`` on rank 0 only and give every rank its result, or raise its
    exception on every rank.

    For what must happen once and be agreed on before anything else is written, such as
    checking and creating a run folder: were each rank to look for itself, one could see the
    files another has just written. The exception raised on every rank carries
    ``on_every_rank = True``, so that a command line can end all ranks with the same status
    without aborting them (:func:`finalize`). In one process this is ``fn(*args, **kwargs)``.
    """
    world = get_world()
    if world.size == 1:
        return fn(*args, **kwargs)
    outcome = None
    if world.rank == 0:
        try:
            outcome = (True, fn(*args, **kwargs))
        except Exception as exc:  # handed to every rank below, raised there
            outcome = (False, _picklable(exc))
    succeeded, value = world.broadcast_object(outcome, root=0)
    if succeeded:
        return value
    value.on_every_rank = True
    raise value


def _picklable(exc: Exception) -> Exception:
    """``exc`` itself when it survives pickling (how MPI sends objects), else a DistributedError
    with its type and message."""
    import pickle
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return DistributedError(f"{type(exc).__name__}: {exc}")


def abort(code: int = 1, message: str | None = None) -> None:
    """Print ``message`` (with the rank) and end every rank with exit status ``code``."""
    world = get_world()
    if message:
        sys.stderr.write(f"minibasis.distributed: rank {world.rank} of {world.size}: {message}\n")
        sys.stderr.flush()
    world.abort(code)


def finalize(exit_code: int, on_every_rank: bool = False) -> int:
    """Call at the end of a program with its exit status. A non-zero status on one rank of
    several aborts all of them (a rank that simply returned would leave the others blocked in
    their next collective, or in MPI's own finalization), unless ``on_every_rank`` says that
    every rank ends with this status (an error from :func:`main_process_decides`); the status
    is returned."""
    world = get_world()
    if exit_code and world.size > 1 and not on_every_rank:
        abort(int(exit_code), f"exiting with status {exit_code}; aborting all {world.size} ranks")
    return exit_code


def describe() -> dict[str, Any]:
    """What the process group is: for logs and the README's diagnostics."""
    world = get_world()
    info: dict[str, Any] = {"comm": world.name, "rank": world.rank, "size": world.size,
                            "local_rank": world.local_rank}
    if isinstance(world, MPICommunicator):
        info["mpi_library"] = world._MPI.Get_library_version().splitlines()[0].strip()
        info["nccl"] = world.use_nccl
    return info
