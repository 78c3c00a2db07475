"""Shared fixtures: where the read-only shared material lives, and the backend each test runs on.

The engine's test files (autograd, functions, conv paths, pooling, batch norm, nn, BasisConv,
counting, optim, learning) carry ``pytestmark = pytest.mark.engine``; they run on the backend
that ``--backend numpy|strict|cupy`` (or ``$MINIBASIS_TEST_BACKEND``) names, default numpy, and
compare with float64 NumPy references on the host. Every other test runs on NumPy.
``tests/gpu/test_gpu_engine_on_strict.py`` reruns the engine files on ``strict`` in the default run;
bench/gpu.py runs them on ``cupy`` on a GPU machine.
"""
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
BACKEND_CHOICES = ("numpy", "strict", "cupy")
BACKEND_ENV = "MINIBASIS_TEST_BACKEND"


def shared_path() -> Path:
    """The shared folder: $MINIBASIS_SHARED, or ../shared beside the repository."""
    return Path(os.environ.get("MINIBASIS_SHARED", REPO_ROOT.parent / "shared"))


def pytest_addoption(parser):
    parser.addoption(
        "--backend", choices=BACKEND_CHOICES, default=None,
        help=f"backend for the engine tests (marked 'engine'); default ${BACKEND_ENV} or numpy")


def pytest_configure(config):
    option = config.getoption("--backend")
    name = option or os.environ.get(BACKEND_ENV) or "numpy"
    source = "--backend" if option else BACKEND_ENV
    if name not in BACKEND_CHOICES:
        raise pytest.UsageError(f"{source}={name!r}: expected one of {', '.join(BACKEND_CHOICES)}")
    if name == "cupy":  # asked for explicitly: a machine without a usable GPU is an error, not a skip
        import minibasis

        try:
            minibasis.use("cupy")
        except RuntimeError as exc:
            raise pytest.UsageError(f"{source}=cupy: {exc}") from exc
        finally:
            minibasis.use("numpy")
    config.engine_backend = name


def pytest_report_header(config):
    return f"minibasis engine tests on backend: {config.engine_backend}"


@dataclass(frozen=True)
class BackendUnderTest:
    """The backend an engine test runs on, with the explicit host/device copies the tests need.

    ``device(a)`` copies a host array onto it (``cupy.asarray``), ``host(a)`` copies an array or
    Tensor back to a NumPy array (``cupy.asnumpy``); on numpy both are the identity.
    Tests that need a host-only feature skip with the reason (``require_host_memory``).
    """

    name: str

    @property
    def xp(self) -> Any:
        from minibasis import backend
        return backend.xp

    @staticmethod
    def device(array):
        from minibasis import backend
        return backend.asarray(array)

    @staticmethod
    def host(array):
        from minibasis import backend
        return backend.to_numpy(array)

    def require_host_memory(self, what: str) -> None:
        """Skip on a real device (cupy): ``what`` sees host memory only (strict's "device" is host memory)."""
        if self.name == "cupy":
            pytest.skip(f"host memory only ({what}); on cupy, bench/gpu.py measures the device memory pool")


@pytest.fixture
def serial_engine():
    """The serial chunk loop, for tests that count a conv's chunks or buffers (minibasis.set_num_threads)."""
    import minibasis
    previous = minibasis.set_num_threads(1)
    yield
    minibasis.set_num_threads(previous)


@pytest.fixture(scope="session")
def on_backend(pytestconfig) -> BackendUnderTest:
    """The backend the engine tests run on (selected before each of them): ``name``, ``xp``,
    ``device()``, ``host()``, ``require_host()``. Session-scoped, so hypothesis tests may use it."""
    return BackendUnderTest(pytestconfig.engine_backend)


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.engine_backend = config.engine_backend if item.get_closest_marker("engine") else "numpy"


@pytest.fixture(scope="session")
def launcher():
    """The MPI launcher (``minibasis.distributed.launcher.find_launcher``) for tests that start
    ``mpirun`` themselves; they skip with the reason where there is none or no mpi4py."""
    import importlib.util

    from minibasis.distributed.launcher import find_launcher

    found = find_launcher()
    if found is None:
        pytest.skip("no MPI launcher (mpirun/mpiexec) found beside python or on PATH: pip install '.[mpi]'")
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed: pip install '.[mpi]'")
    return found


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    path = shared_path()
    if not path.is_dir():
        pytest.skip(f"shared material not found at {path} (set MINIBASIS_SHARED)")
    return path


@pytest.fixture(scope="session")
def cifar10_dir(shared_dir) -> Path:
    path = shared_dir / "data" / "cifar-10-batches-py"
    if not (path / "test_batch").is_file():
        pytest.skip(f"CIFAR-10 not found at {path}")
    return path


@pytest.fixture(scope="session")
def akamaster_dir(shared_dir) -> Path:
    path = shared_dir / "models" / "akamaster"
    if not path.is_dir():
        pytest.skip(f"pretrained akamaster checkpoints not found at {path}")
    return path


@pytest.fixture(autouse=True)
def _backend_between_tests(request):
    """Every test starts on its backend (the one under test for engine tests, else NumPy) and ends on NumPy."""
    import minibasis

    minibasis.use(getattr(request.node, "engine_backend", "numpy"))
    yield
    minibasis.use("numpy")
