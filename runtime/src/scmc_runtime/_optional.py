"""Import an optional dependency, or say which extra to install."""

import importlib
from types import ModuleType


def require(module: str, purpose: str, extra: str) -> ModuleType:
    """``importlib.import_module(module)``, with an install hint when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{purpose} needs the optional dependency {module.split('.')[0]!r}: " f"pip install 'scmc-runtime[{extra}]'"
        ) from error
