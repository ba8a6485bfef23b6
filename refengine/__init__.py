"""refengine: a CPU reference inference engine for GGUF language models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("refengine")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
