"""Optional test tools: skipped with a reason on a workstation, a failure in CI (CI=true)."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def require(module: str, install: str) -> ModuleType:
    """Import `module`; outside CI skip the test when it is missing, in CI fail it."""
    if os.environ.get("CI", "").lower() == "true":
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} is not installed ({install})")
