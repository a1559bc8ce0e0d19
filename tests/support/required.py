"""A part a test needs (a binary, a package, ../shared) that is missing: outside CI the test
skips with the reason; in CI (`CI=true`) it fails, so CI cannot go green on skipped tests."""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def missing(reason: str) -> NoReturn:
    """Skip (fail in CI) because a required part is missing."""
    if in_ci():
        pytest.fail(f"required part missing in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def require(module: str, install: str) -> ModuleType:
    """Import `module`; outside CI skip the test when it is missing, in CI fail it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        missing(f"{module} is not installed ({install})")
