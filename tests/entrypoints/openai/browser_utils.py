"""Headless Chromium for the chat page's tests: Debian's `chromium` (installed by
`scripts/setup.sh --test`) driven by Playwright, whose own browser download is not used."""

from __future__ import annotations

import shutil
from contextlib import contextmanager

# NOTE: the background-networking flags matter on a machine without outside network: without
# them Chromium's component updates and field trials stall or fail its start.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
INSTALL_HINT = "install them with `bash scripts/setup.sh --test` (Debian's chromium, playwright)"


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return f"the Python package playwright is not installed; {INSTALL_HINT}"
    if chromium_path() is None:
        return f"no chromium executable on PATH; {INSTALL_HINT}"
    return None


@contextmanager
def chromium():
    """A headless Chromium (Playwright's Browser), closed on exit. Playwright gives it a fresh
    temporary profile (--user-data-dir) of its own."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True,
                                    args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
