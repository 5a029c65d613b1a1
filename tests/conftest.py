"""Shared test set-up: 8 host CPU devices for sharding tests, reference data."""
import os
import pathlib

# Must be set before jax is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
REFERENCE_DIR = pathlib.Path(
    os.environ.get("SEARCHER_REFERENCE", REPO_ROOT.parent / "shared" / "reference"))


@pytest.fixture(scope="session")
def reference_dir() -> pathlib.Path:
    if not REFERENCE_DIR.is_dir():
        pytest.fail(f"reference data not found at {REFERENCE_DIR}; set SEARCHER_REFERENCE "
                    "to the shared/reference directory")
    return REFERENCE_DIR
