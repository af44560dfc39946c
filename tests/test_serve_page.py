"""The page at ``/`` in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium).

It uploads a CSV, checks the channels are plotted, asks, waits for the streamed answer (which must be
the API's own answer to the same request) and saves a screenshot to benchmarks/results/serve_page.png.
Without chromium the test is skipped, except in CI (``CI`` set), where it fails: .ci/run installs it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("openai")
pytest.importorskip("fastapi")

from test_serve import (  # noqa: E402
    CHANNELS,
    MODEL,
    Server,
    build_tiny_checkpoint,
    csv_base64,
    recording,
    sensor_part,
    text_part,
    user,
)

SCREENSHOT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "serve_page.png"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,820"]
QUESTION = "What is the person doing?"


def chromium_driver():
    """A headless Chromium under chromedriver; skips (or fails, in CI) when they are not installed."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    missing = [name for name, found in (("chromium", chromium), ("chromedriver", driver_path)) if not found]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("the selenium package")
    if missing:
        reason = (f"the page test needs {', '.join(missing)}: apt-get install chromium chromium-driver "
                  "(and pip install selenium, in the dev extra)")
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; .ci/run installs them, so CI must run this test")
        pytest.skip(reason)
    options = Options()
    options.binary_location = chromium
    for argument in CHROMIUM_ARGS:
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(executable_path=driver_path), options=options)


def test_the_page_plots_an_uploaded_csv_and_streams_the_answer(tmp_path, monkeypatch):
    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium must not look for drivers on the internet
    driver = chromium_driver()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = Server(build_tiny_checkpoint(tmp_path), tmp_path / "server.log")
    try:
        values = recording(40, seed=21)
        upload = tmp_path / "walking.csv"
        upload.write_text("\n".join([",".join(CHANNELS)] + [",".join(f"{v:.3f}" for v in row) for row in values]) + "\n")
        api = server.client(key=None).chat.completions.create(
            model=MODEL, max_tokens=32, messages=user(sensor_part(format="csv", data=csv_base64(values)),
                                                      text_part(QUESTION)))

        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "ask").is_enabled())
        assert driver.find_element(By.ID, "model").text == f"model {MODEL} · sensor modalities: imu"

        driver.find_element(By.ID, "file").send_keys(str(upload))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#plot polyline")) == 6)
        lines = driver.find_elements(By.CSS_SELECTOR, "#plot polyline")
        assert [line.get_attribute("data-channel") for line in lines] == CHANNELS
        assert all(len(line.get_attribute("points").split()) == 40 for line in lines)
        assert driver.find_element(By.ID, "summary").text == "walking.csv: 40 steps × 6 channels"

        question = driver.find_element(By.ID, "question")
        question.clear()
        question.send_keys(QUESTION)
        driver.execute_script("""
            window.answerUpdates = 0;
            new MutationObserver(() => { window.answerUpdates += 1; })
              .observe(document.getElementById('answer'), {childList: true, characterData: true, subtree: true});""")
        driver.find_element(By.ID, "ask").click()
        wait.until(lambda d: d.find_element(By.ID, "answer").get_attribute("data-state") in ("done", "error"))

        answer = driver.find_element(By.ID, "answer")
        assert answer.get_attribute("data-state") == "done", driver.find_element(By.ID, "error").text
        assert answer.get_property("textContent") == api.choices[0].message.content
        assert driver.execute_script("return window.answerUpdates") > 3  # it arrived in pieces, not at once
        assert driver.find_element(By.ID, "usage").text == (
            f"finish: length · prompt {api.usage.prompt_tokens} + completion 32 = {api.usage.total_tokens} tokens")
        fetched = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert fetched and all(url.startswith(server.url + "/") for url in fetched), fetched  # nothing from elsewhere

        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(SCREENSHOT))
    finally:
        driver.quit()
        server.stop()
