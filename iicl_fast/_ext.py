"""The one place that imports the C++ extension iicl_fast._C (csrc/lora_bank.cpp)."""
from __future__ import annotations

from .config import IICLError

try:
    from . import _C
    _IMPORT_ERROR = None
except ImportError as e:   # not built: torch was not importable when the package was installed
    _C = None
    _IMPORT_ERROR = str(e)


def ext():
    """The extension module, or IICLError saying how to build it."""
    if _C is None:
        raise IICLError("the C++ extension iicl_fast._C is not built "
                        f"({_IMPORT_ERROR}): reinstall with `pip install --no-build-isolation -e .` "
                        "from the source checkout (needs torch installed first and a C++17 compiler)")
    return _C


def available() -> bool:
    return _C is not None
