"""The web page at / in a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven
by selenium): upload one real IU PNG, wait for the streamed report, check text and timing fields.

Skips, saying how to install, where the browser or the driver is missing. With
ECHOCXR_SCREENSHOT=path (and optionally ECHOCXR_SCREENSHOT_CKPT=a trained checkpoint) it also
saves a screenshot of the finished page (docs/img/serve_page.png was made that way).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from echocxr.serve.app import create_app
from echocxr.serve.backend import ReportBackend
from echocxr.serve.background import BackgroundServer
from echocxr.serve.config import ServeConfig

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
HOW = "install it with `sudo apt-get install -y chromium chromium-driver` (scripts/setup.sh does when run as root)"


@pytest.fixture(scope="module")
def browser():
    if not (os.access(CHROMIUM, os.X_OK) and os.access(DRIVER, os.X_OK)):
        pytest.skip(f"headless Chromium not found at {CHROMIUM} / {DRIVER}: {HOW}")
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed (pip install selenium)"
    )
    profile = tempfile.mkdtemp(prefix="echocxr-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1180,760",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(flag)
    from selenium.webdriver.chrome.service import Service

    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    trained = os.environ.get("ECHOCXR_SCREENSHOT_CKPT")
    if trained:
        return Path(trained)
    from test_serve import build_ckpt  # the same tiny random-weight checkpoint as test_serve.py

    torch.set_num_threads(1)
    return build_ckpt(tmp_path_factory.mktemp("page") / "dcd")


def test_page_uploads_a_real_png_and_streams_the_report(browser, ckpt, iu_images):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    png = sorted(iu_images.glob("*.png"))[0]
    backend = ReportBackend(ckpt, device="cpu")
    with BackgroundServer(create_app(backend, ServeConfig(max_batch=4, max_wait_ms=5))) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: "stage" in d.find_element(By.ID, "model").text)
        banner = browser.find_element(By.ID, "banner")
        if backend.trained_on != "real":
            assert banner.is_displayed() and "phantom" in banner.text
        browser.find_element(By.ID, "file").send_keys(str(png))
        go = browser.find_element(By.ID, "go")
        wait.until(lambda d: go.is_enabled())
        go.click()
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith(("Done", "Failed")))
        assert browser.find_element(By.ID, "error").text == ""
        status = browser.find_element(By.ID, "status").text
        assert status.startswith("Done") and backend.cfg.decoder in status
        report = browser.find_element(By.ID, "report").text
        assert report.strip()
        fields = {
            k: browser.find_element(By.ID, k).text
            for k in ("forwards", "tokens", "elapsed", "prefill", "decode")
        }
        assert int(fields["forwards"]) >= 1 and int(fields["tokens"]) >= 1
        assert float(fields["elapsed"]) > 0 and float(fields["prefill"]) >= 0
        shot = os.environ.get("ECHOCXR_SCREENSHOT")
        if shot:
            browser.execute_script("window.scrollTo(0, 0)")
            browser.save_screenshot(shot)
