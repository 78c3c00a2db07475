"""Shared fixtures: where the read-only shared material lives, and backend hygiene."""
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_path() -> Path:
    """The shared folder: $MINIBASIS_SHARED, or ../shared beside the repository."""
    return Path(os.environ.get("MINIBASIS_SHARED", REPO_ROOT.parent / "shared"))


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
def _numpy_backend_between_tests():
    """Every test starts and ends on the NumPy backend, whatever it switched to."""
    import minibasis

    minibasis.use("numpy")
    yield
    minibasis.use("numpy")
