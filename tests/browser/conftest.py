"""The web page in a real headless Chromium (Playwright) against the real running stack.

Chromium comes from the system (`apt-get install chromium`), never from `playwright install`;
PHOTO3D_CHROMIUM points elsewhere. PHOTO3D_SCREENSHOTS=docs/screenshots refreshes the
screenshots the docs show; otherwise they go to a temporary folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.images import object_photo
from tests.support.required import missing
from tests.support.stack import ROOT, Stack, module_stack

CHROMIUM = os.environ.get("PHOTO3D_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]
VIEWER = ROOT / "serve_app" / "static" / "vendor" / "model-viewer.min.js"


@pytest.fixture(scope="module")
def chromium() -> str:
    """The Chromium binary; skips the module where the browser tooling is not installed (fails
    in CI, where .ci/run installs it)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing("playwright is not installed (pip install playwright)")
    if not Path(CHROMIUM).is_file():
        missing(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    if not VIEWER.is_file():
        missing(f"{VIEWER.relative_to(ROOT)} is missing (make builds it with npm ci)")
    return CHROMIUM


@pytest.fixture(scope="module")
def stack(
    chromium: str, pg_admin: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """`photo3d serve` with the CPU backend and the FAKE slow one (for progress and cancel)."""
    yield from module_stack(pg_admin, tmp_path_factory.mktemp("stack"), "browser")


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any, stack: Stack) -> Iterator[Any]:
    """A fresh browser profile on the app's home page; fails the test on any uncaught JS error."""
    context = browser.new_context(
        viewport={"width": 1280, "height": 900}, accept_downloads=True, base_url=stack.url
    )
    context.set_default_timeout(20_000)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    tab.goto("/")
    yield tab
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = os.environ.get("PHOTO3D_SCREENSHOTS")
    folder = Path(target) if target else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("photos") / "toy.png"
    path.write_bytes(object_photo(448, seed=5))
    return path
