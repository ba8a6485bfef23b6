"""Shared fixtures: the two real models, skipped with a reason when not installed."""

from pathlib import Path

import pytest

from refengine.models import ModelNotFound, resolve_model

REAL_MODELS = ["gemma3-270m", "smollm2-135m"]


def model_path(name: str) -> Path:
    try:
        return resolve_model(name)
    except ModelNotFound as e:
        pytest.skip(f"{e} (install the test models with `make install`)")


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    return model_path("gemma3-270m")


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    return model_path("smollm2-135m")


@pytest.fixture(scope="session", params=REAL_MODELS)
def real_model_path(request) -> Path:
    return model_path(request.param)
