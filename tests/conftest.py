"""Shared pytest configuration: hypothesis profiles and thread count."""

import os

import torch
from hypothesis import HealthCheck, settings

# CI runs derandomized so that a run is reproducible; locally hypothesis explores new examples.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# one thread: the suite runs many tiny ops and step loops, where a second thread only adds synchronisation
torch.set_num_threads(1)


def skip_unless_ci(reason: str):
    """Skip a test whose optional part (compiler, fused engine) is missing here; in CI, where .ci/run
    installs everything, the same condition is a failure, so a broken build cannot hide behind a skip."""
    import pytest

    if os.environ.get("CI"):
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


def pytest_sessionstart(session):
    """A run with S4LIB_BACKEND naming one backend tests that backend: it must be usable here (and in
    CI it is required), so that such a run never passes on a silent fallback."""
    import pytest

    name = os.environ.get("S4LIB_BACKEND", "auto").strip().lower()
    if name in ("", "auto"):
        return
    from s4lib.ops import dispatch

    if name not in dispatch.BACKEND_MODULES:
        raise pytest.UsageError(f"S4LIB_BACKEND={name!r}: expected one of {dispatch.BACKEND_NAMES}")
    if dispatch.prepare(name) != name:
        raise pytest.UsageError(f"S4LIB_BACKEND={name!r}, but that backend cannot run here: "
                                f"{dispatch.backend_status(name)[1]}")
