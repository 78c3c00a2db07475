"""minibasis: a small NumPy/CuPy deep-learning framework for the BasisConv paper.

Layers (dependencies point down only)::

    cli / experiments        minibasis.cli, minibasis.experiments (the verbs)
    training / measurement   minibasis.training, minibasis.measure, minibasis.model_files
    models / compression     minibasis.models, minibasis.compress, minibasis.basis, minibasis.formulas
    nn                       minibasis.nn, minibasis.optim, minibasis.data, minibasis.io
    functions                minibasis.functions
    autograd + counting      minibasis.autograd, minibasis.counting
    backend                  minibasis.backend, minibasis.parallel (worker threads for the chunk loops),
                             minibasis.host_memory (freed memory kept for reuse)
"""
from minibasis import backend, host_memory
from minibasis.autograd import Function, Tensor, gradcheck, no_grad, tensor
from minibasis.backend import manual_seed, to_numpy, use
from minibasis.counting import count_mults
from minibasis.host_memory import get_memory_retention, set_memory_retention
from minibasis.parallel import get_num_threads, set_num_threads
from minibasis import functions, nn, optim
from minibasis.functions.chunking import chunk_sizes

__version__ = "0.1.0"

# Freed host memory is kept for reuse unless $MINIBASIS_RETAIN_MEMORY=0 (glibc only; see host_memory).
host_memory.apply_default()


def __getattr__(name):
    # Upper layers load on first use so that `import minibasis` stays light.
    if name == "compress":
        from minibasis.compress import compress
        return compress
    if name == "summary":
        from minibasis.model_summary import summary
        return summary
    if name == "deploy":
        from minibasis.deployment import deploy
        return deploy
    if name == "fuse_batch_norm":
        from minibasis.fusion import fuse_batch_norm
        return fuse_batch_norm
    if name in ("save_model", "load_model", "ModelMetadata", "ModelFileError"):
        from minibasis import model_files
        return getattr(model_files, name)
    if name in ("basis", "formulas", "models", "data", "io", "serialization", "experiments", "distributed",
                "measure", "training", "verify"):
        import importlib
        return importlib.import_module(f"minibasis.{name}")
    raise AttributeError(f"module 'minibasis' has no attribute {name!r}")


__all__ = ["backend", "use", "to_numpy", "manual_seed", "Tensor", "Function", "tensor", "no_grad", "gradcheck",
           "count_mults", "set_num_threads", "get_num_threads", "chunk_sizes", "set_memory_retention", "get_memory_retention", "functions", "nn", "optim", "compress", "summary", "fuse_batch_norm", "deploy",
           "save_model", "load_model", "ModelMetadata", "ModelFileError"]
