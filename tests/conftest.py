"""Shared fixtures: the two real models, skipped with a reason when not installed, and tiny synthetic ones."""

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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(arch, variant="f32") -> the path of a tiny synthetic model (refengine.testing),
    made once per session: arch is a name of refengine.testing.MODELS, variant "f32" or "q4_k_m"
    (quantized from the f32 file by refengine's quantizer, byte-identical to llama.cpp's)."""
    from refengine.testing import quantize_q4_k_m, write_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    made: dict[tuple[str, str], Path] = {}

    def get(arch: str, variant: str = "f32") -> Path:
        if (arch, variant) not in made:
            path = root / f"{arch}-{variant}.gguf"
            if variant == "f32":
                made[arch, variant] = write_tiny_model(arch, path)
            elif variant == "q4_k_m":
                made[arch, variant] = quantize_q4_k_m(get(arch, "f32"), path)
            else:
                raise ValueError(f"tiny model variant {variant!r}: use 'f32' or 'q4_k_m'")
        return made[arch, variant]

    return get
