"""The console in a real browser: Playwright drives Debian's Chromium (`chromium`, installed by `.ci/run`; nothing is
downloaded) against a whole platform started with `flywheel up --detach`, through the console's one address.

A failed test leaves a screenshot of its page in `test-results/console/<test>.png` (the path is printed)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.client import Flywheel
from tests.conftest import INTERNAL_TOKEN
from tests.e2e.conftest import running_platform  # noqa: F401 - the platform the console runs on

SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-results" / "console"
PICTURES = os.environ.get("FLYWHEEL_CONSOLE_PICTURES")
"""A folder to photograph the main pages into as the tests pass them (the README's pictures: docs/console/)."""

pytestmark = [pytest.mark.slow]


def chromium_path() -> str:
    path = os.environ.get("FLYWHEEL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("the console's browser tests need Debian's chromium (apt-get install chromium), as .ci/run does")
    return path


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def open_page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """`open_page(url, width=1280, height=800)`: a fresh browser context (its own session storage) on a page; any
    page still open when the test fails is photographed."""
    contexts: list[Any] = []

    def open_(url: str, *, width: int = 1280, height: int = 800) -> Any:
        context = browser.new_context(viewport={"width": width, "height": height})
        context.set_default_timeout(20_000)
        contexts.append(context)
        page = context.new_page()
        page.goto(url)
        return page

    yield open_
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for number, context in enumerate(contexts):
            for index, page in enumerate(context.pages):
                path = SCREENSHOTS / f"{request.node.name}-{number}-{index}.png"
                page.screenshot(path=str(path), full_page=True)
                print(f"\nscreenshot of the failed page: {path}")
    for context in contexts:
        context.close()


@pytest.fixture
def console(running_platform: tuple[dict[str, str], Path]) -> dict[str, Any]:  # noqa: F811
    """The console's address on a running platform, and the operator's client for setting up what a test needs."""
    urls, _ = running_platform
    return {"url": f"{urls['labeling']}/console/", "urls": urls, "operator": Flywheel.from_urls(urls, INTERNAL_TOKEN)}


def picture(page: Any, name: str) -> None:
    """Photograph `page` as `<name>.png` when FLYWHEEL_CONSOLE_PICTURES names a folder; otherwise nothing."""
    if PICTURES:
        Path(PICTURES).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(PICTURES) / f"{name}.png"), full_page=True)


def sign_in(page: Any, token: str) -> None:
    page.fill("#token", token)
    page.press("#token", "Enter")
