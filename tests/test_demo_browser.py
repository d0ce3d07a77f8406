"""`uniref demo` end to end in a real headless browser: Debian's chromium and chromium-driver, driven by Selenium.

The server is a real `uniref demo` subprocess on a free port, with the embedded default model. The test
uploads the references of examples/compose, types its prompt, runs, reads the PNG behind the download
link, then uploads a corrupt file and waits for the page's error message; on the synthetic-world tab it
runs a sampled task and reads the reward scores. Screenshots go to the test's
tmp_path; with UNIREF_DEMO_SCREENSHOT=PATH the screenshot after the run is also written to PATH (that is
how the README's docs/demo.png is made:
``UNIREF_DEMO_SCREENSHOT=docs/demo.png pytest tests/test_demo_browser.py``).
"""

from __future__ import annotations

import io
import os
import shutil
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from test_demo import start_demo, stop_demo

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "compose"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# The browser runs without network and without any profile state of its own.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1500",
]
STEPS = 4


def _missing() -> list[str]:
    missing = [
        f"{name} ({path})"
        for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER))
        if not os.access(path, os.X_OK)
    ]
    for module in ("selenium", "gradio"):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"the Python package {module}")
    return missing


pytestmark = pytest.mark.skipif(
    bool(_missing()),
    reason=f"needs {', '.join(_missing())}: apt-get install chromium chromium-driver; pip install -e '.[test]'",
)


@pytest.fixture
def demo_server(tmp_path):
    proc, url = start_demo(tmp_path)  # a real `uniref demo` subprocess on a free port
    try:
        yield proc, url
    finally:
        stop_demo(proc)


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    # Service with an explicit path: Selenium Manager (which would download a driver) never runs.
    driver = webdriver.Chrome(
        service=Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log")), options=options
    )
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, what: str, condition, timeout: float = 120):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.25).until(condition)
    except TimeoutException:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


def _set_number(driver, css: str, value) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element(By.CSS_SELECTOR, css)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(str(value), Keys.TAB)


def test_demo_in_a_browser(demo_server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    proc, url = demo_server
    browser.get(url)
    upload = _wait(
        browser,
        "the references' upload field",
        lambda d: d.find_elements(By.CSS_SELECTOR, "#references input[type=file]"),
    )[0]

    # references, prompt and a short run; the plan appears as soon as the references are in
    upload.send_keys("\n".join(str(EXAMPLE / f"ref{k}.png") for k in (1, 2, 3)))
    _wait(browser, "the plan of 3 references", lambda d: "ref 3" in d.find_element(By.ID, "plan").text)
    plan = browser.find_element(By.ID, "plan").text
    assert "total" in plan and "per-image tokens" in plan, plan
    browser.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys((EXAMPLE / "prompt.txt").read_text().strip())
    _set_number(browser, "#steps input[type=number]", STEPS)
    browser.find_element(By.ID, "run").click()
    links = _wait(
        browser,
        "the download link of the output",
        lambda d: d.find_elements(By.CSS_SELECTOR, "#download a[href]"),
        timeout=180,
    )
    message = browser.find_element(By.ID, "message").text
    assert f"{STEPS} steps" in message, message
    _wait(browser, "the output image", lambda d: d.find_elements(By.CSS_SELECTOR, "#output img[src]"))
    _wait(browser, "the result in the gallery", lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery img"))

    with urllib.request.urlopen(links[0].get_attribute("href"), timeout=30) as r:
        data = r.read()
    assert data.startswith(b"\x89PNG\r\n\x1a\n"), data[:16]
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG" and image.size == (64, 64), (image.format, image.size)

    browser.save_screenshot(str(tmp_path / "demo.png"))
    if os.environ.get("UNIREF_DEMO_SCREENSHOT"):
        target = Path(os.environ["UNIREF_DEMO_SCREENSHOT"])
        target = target if target.is_absolute() else ROOT / target
        assert browser.save_screenshot(str(target)), target

    # a corrupt upload is reported in the page, and the server keeps serving
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not an image" * 10)
    browser.find_element(By.CSS_SELECTOR, "#references input[type=file]").send_keys(str(corrupt))
    _wait(
        browser, "the error message about corrupt.png", lambda d: "corrupt.png" in d.find_element(By.ID, "message").text
    )
    message = browser.find_element(By.ID, "message").text
    assert "Error" in message and "Traceback" not in browser.page_source, message
    browser.save_screenshot(str(tmp_path / "demo-error.png"))
    assert proc.poll() is None

    # the synthetic world: a sampled task is run and scored
    next(t for t in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if "Synthetic" in t.text).click()
    _wait(
        browser,
        "the sampled task's instruction",
        lambda d: d.find_element(By.CSS_SELECTOR, "#syn-prompt textarea").get_attribute("value"),
    )
    _set_number(browser, "#syn-steps input[type=number]", STEPS)
    browser.find_element(By.ID, "syn-run").click()
    _wait(browser, "the reward scores", lambda d: "overall" in d.find_element(By.ID, "syn-scores").text, timeout=180)
    _wait(
        browser, "references | output | exact answer", lambda d: d.find_elements(By.CSS_SELECTOR, "#syn-strip img[src]")
    )
    scores = browser.find_element(By.ID, "syn-scores").text.split()
    assert all(0 <= float(v) <= 1 for v in scores[-4:]), scores
    browser.save_screenshot(str(tmp_path / "demo-synthetic.png"))
