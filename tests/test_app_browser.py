"""A real headless Chromium (Playwright) drives the served explorer: pick an image and a target, run,
see the panels, pick the semantic rules (the gate fields follow), change T, run again, see the pullback
change; a screenshot is saved."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("gradio")
playwright = pytest.importorskip("playwright.sync_api")
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


CHROMIUM = next(
    (
        p
        for p in (
            shutil.which("chromium"),
            shutil.which("chromium-browser"),
            shutil.which("chromium-headless-shell"),
            "/usr/bin/chromium-headless-shell",
            "/usr/lib/chromium/chromium-headless-shell",
        )
        if p and Path(p).is_file()
    ),
    None,
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def image_src(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} img").first.get_attribute("src")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on this machine (apt-get install chromium)")
def test_page_runs_and_follows_temperature(served_app, tmp_path):
    url, _ = served_app
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.locator("#gallery .gallery-item").nth(5).click()  # 5_digit_5.png
            page.wait_for_selector("#image img", timeout=30_000)
            # the file name sets the target; then choose digit 6 through the filterable dropdown
            page.locator("#target-class input").click()
            page.locator("#target-class input").fill("digit 6")
            page.get_by_role("option", name="digit 6 (6)").click()
            page.click("#run")
            page.wait_for_selector("#out-ex-step img", timeout=120_000)
            for elem in ("out-input", "out-vanilla", "out-excitation", "out-strip"):
                assert page.locator(f"#{elem} img").count() == 1, elem
            assert "digit 6 (6)" in page.locator("#command").inner_text()
            before = image_src(page, "out-excitation")
            number = page.locator("#temperature input[type=number]")
            assert number.input_value() == "0.3" and page.locator("#pool-temperature textarea").input_value() == ""
            page.locator("#rules input").click()
            page.get_by_role("option", name="semantic", exact=True).click()
            page.wait_for_function(
                "() => document.querySelector('#temperature input[type=number]').value === '0.6'", timeout=30_000
            )
            assert page.locator("#pool-temperature textarea").input_value() == "0.3"
            assert page.locator("#shape input").input_value() == "normal_cdf"
            number.fill("1.5")
            number.press("Enter")
            page.click("#run")
            page.wait_for_function(
                "src => { const i = document.querySelector('#out-excitation img'); return i && i.src !== src; }",
                arg=before,
                timeout=120_000,
            )
            page.wait_for_timeout(500)
            assert "gate=semantic gate.shape=normal_cdf gate.temperature=1.5" in page.locator("#command").inner_text()
            page.screenshot(path=str(tmp_path / "explorer.png"), full_page=True)
            assert image_src(page, "out-excitation") != before
            assert (tmp_path / "explorer.png").stat().st_size > 10_000
        finally:
            browser.close()


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on this machine (apt-get install chromium)")
def test_a_bad_upload_is_a_message_in_the_page(served_app, tmp_path):
    """A file that is no image, uploaded through the page: Run shows the one-line message, and the page goes on
    to run a gallery image."""
    url, _ = served_app
    bad = tmp_path / "photo.png"
    bad.write_bytes(b"this is not an image")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.locator("#image input[type=file]").set_input_files(str(bad))
            page.wait_for_timeout(1000)
            page.click("#run")
            message = page.get_by_text("cannot read image photo.png: not an image file PIL can identify")
            message.first.wait_for(timeout=60_000)
            assert message.first.is_visible()
            page.locator("#gallery .gallery-item").nth(2).click()
            page.wait_for_selector("#image img", timeout=30_000)
            page.click("#run")
            page.wait_for_function(
                "() => document.querySelector('#note').innerText.includes('02_digit_2.png')", timeout=120_000
            )
            assert page.locator("#out-method img").count() == 1
        finally:
            browser.close()
