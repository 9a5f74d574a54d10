"""The demo in a real browser (headless Chromium from the system, driven by Playwright): the page
loads, one comparison runs from the Compare button, and the score table appears. The screenshot is
saved (``ALIGN_SCREENSHOT_DIR``, default the test's tmp folder) for a person to look at."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("gradio")
playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (scripts/test.sh installs Debian's as root)")
def test_a_comparison_in_the_browser_shows_the_score_table(tmp_path):
    from PIL import Image

    from demos.app import DemoSettings, build_app

    app = build_app(DemoSettings(runs=tmp_path / "runs"))
    app.launch(prevent_thread_lock=True, quiet=True)
    shots = Path(os.environ.get("ALIGN_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    try:
        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1300})
            page.goto(app.local_url)
            page.locator("#prompts textarea").fill("a red digit 3\na green digit 5")
            page.locator("#compare").click()
            table = page.locator("#scores")
            table.get_by_text("digit_judge", exact=True).first.wait_for(timeout=120_000)
            assert table.get_by_text("a green digit 5", exact=True).count() > 0  # every prompt's rows
            page.wait_for_timeout(1500)  # the gallery's images finish loading
            page.screenshot(path=str(shots / "demo.png"), full_page=True)
            browser.close()
    finally:
        app.close()
    image = Image.open(shots / "demo.png")
    assert image.width >= 1400 and image.height >= 800
