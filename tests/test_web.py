"""The web page, for real: app.py serves the shipped demo model on loopback and headless Chromium
(Debian's ``chromium``, driven by Playwright, no browser download) uses it as a person would."""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import av
import pytest
from PIL import Image

from sat.config import load_config
from sat.parallel import free_port
from sgm.models.wan_vae import read_vae_strides
from sgm.pipeline import SamplingConfig
from sgm.web import load_uploads, reference_specs

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs/sampling/shapes.yaml"
EXAMPLES = ROOT / "assets/kaleido-shapes/examples"
CHROMIUM = os.environ.get("KALEIDO_CHROMIUM", "/usr/bin/chromium")
# As the machine's notes advise: without the background-networking flags Chromium keeps trying
# (and failing) to reach Google's hosts on a closed network.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_frame_choices_and_unreadable_uploads_are_each_reported(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (20, 20), (255, 0, 0)).save(good)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    specs, errors = reference_specs([str(good), None, str(bad), None], ["", "3", "", "x"])
    assert specs == [str(good), str(bad)]
    assert errors == [
        "reference 2: a frame is given but no file is uploaded",
        "reference 4: a frame is given but no file is uploaded",
    ]
    specs, errors = reference_specs([str(good), str(good)], ["2.5s", "twelve"])
    assert specs == [f"{good}#2.5s"] and errors == [
        "reference 2: frame 'twelve': expected a frame number (12) or a time (1.5s)"
    ]
    images, errors = load_uploads([str(good), str(bad), f"{good}#2"])
    assert len(images) == 1 and images[0].getpixel((0, 0)) == (255, 0, 0)
    assert errors[0].startswith("reference 2: broken.png: not a readable image")  # no server folder shown
    assert errors[1] == "reference 3: good.png#2: a frame selector needs a video clip, not an image"


def expected_frames() -> int:
    """Video frames of the demo config: t·(latent frames − 1) + 1 with the VAE's own temporal stride."""
    config = load_config(SamplingConfig, [str(DEMO)])
    temporal, _ = read_vae_strides(ROOT / config.vae.path)
    return temporal * (config.sampling_num_frames - 1) + 1


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} not found: the browser tests need Debian's chromium (make test installs it)")
    out = tmp_path_factory.mktemp("app")
    port = free_port()
    log = open(out / "app.log", "w")
    env = {**os.environ, "GRADIO_TEMP_DIR": str(out / "gradio")}
    process = subprocess.Popen(
        [sys.executable, "app.py", "--config", str(DEMO), f"output_dir={out}", "--port", str(port)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            break
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                pytest.fail(f"app.py did not serve {url}:\n{(out / 'app.log').read_text()[-3000:]}")
            time.sleep(0.5)
    yield url, out
    process.terminate()
    process.wait(timeout=30)
    log.close()


@pytest.fixture()
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(server[0], wait_until="domcontentloaded")
        page.wait_for_selector("#generate", timeout=60_000)
        yield page
        browser.close()


def test_two_references_and_a_prompt_give_a_playable_video(server, page, tmp_path):
    url, out = server
    page.locator("#prompt textarea").fill("the first object bounces while the second object moves left")
    page.locator("#reference-1 input[type=file]").set_input_files(str(EXAMPLES / "heldout_00009_ref1.png"))
    page.locator("#reference-2 input[type=file]").set_input_files(str(EXAMPLES / "heldout_00019_ref1.png"))
    page.wait_for_selector("#reference-2 a, #reference-2 .file-name", timeout=30_000)  # both uploads listed
    page.locator("#generate").click()
    page.wait_for_function(
        "() => { const v = document.querySelector('#video video'); return v && v.readyState >= 1 }",
        timeout=120_000,
    )
    state = page.evaluate(
        "() => { const v = document.querySelector('#video video');"
        " return {src: v.src, width: v.videoWidth, height: v.videoHeight, duration: v.duration, error: v.error} }"
    )
    assert state["error"] is None and (state["width"], state["height"]) == (96, 96)  # Chromium decoded it
    frames = expected_frames()
    assert state["duration"] == pytest.approx(frames / 8, abs=0.05)  # sampling_fps 8
    video = tmp_path / "served.mp4"
    video.write_bytes(urllib.request.urlopen(state["src"], timeout=30).read())
    with av.open(str(video)) as container:
        decoded = [f for f in container.decode(video=0)]
    assert len(decoded) == frames  # the configured frame count, every frame present
    page.wait_for_selector("#sheet img", timeout=30_000)
    link = page.locator("#download a[download='output.mp4']").get_attribute("href")
    assert urllib.request.urlopen(link, timeout=30).read() == video.read_bytes()  # the download is the video
    (item,) = (out / "app").iterdir()
    meta = json.loads((item / "meta.json").read_text())
    assert meta["references"] == ["heldout_00009_ref1.png", "heldout_00019_ref1.png"]
    assert meta["video"]["frames"] == frames
    assert len(list(item.glob("subject_*.png"))) == 2
    shot = os.environ.get("KALEIDO_APP_SCREENSHOT")
    page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
    if shot:  # the README's picture: KALEIDO_APP_SCREENSHOT=docs/app.png pytest tests/test_web.py
        shutil.copyfile(tmp_path / "app.png", shot)


def test_a_bad_upload_gets_a_message_not_a_video(server, page, tmp_path):
    _, out = server
    before = set((out / "app").glob("*")) if (out / "app").exists() else set()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not an image")
    page.locator("#prompt textarea").fill("the first object moves left")
    page.locator("#reference-1 input[type=file]").set_input_files(str(broken))
    page.wait_for_selector("#reference-1 a, #reference-1 .file-name", timeout=30_000)
    page.locator("#generate").click()
    message = page.get_by_text("reference 1: broken.png: not a readable image")
    message.first.wait_for(timeout=60_000)
    assert page.get_by_text("Traceback").count() == 0
    assert page.locator("#video video").count() == 0
    after = set((out / "app").glob("*")) if (out / "app").exists() else set()
    assert after == before  # nothing written for a refused request


def test_concurrent_requests_wait_for_each_other(tmp_path):
    """Two requests at once: both are made, never two inside the pipeline at the same time."""
    import threading

    from sgm.pipeline import KaleidoPipeline
    from sgm.web import Request, Studio
    from tests.helpers import demo_config

    config = demo_config("num_steps=2", f"output_dir={tmp_path}")
    studio = Studio(KaleidoPipeline.from_config(config, device="cpu"), config)
    inside, most = [0], [0]
    original = studio.pipeline.generate_latents

    def counted(*args, **kwargs):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        try:
            return original(*args, **kwargs)
        finally:
            inside[0] -= 1

    studio.pipeline.generate_latents = counted
    reference = str(EXAMPLES / "heldout_00009_ref1.png")
    requests = [
        Request(f"the first object moves {w}", [reference, None, None], ["", "", ""], 96, 96, 9, 2, 4.0, seed=n)
        for n, w in enumerate(("left", "right"))
    ]
    folders = []
    threads = [threading.Thread(target=lambda r=r: folders.append(studio.generate(r))) for r in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(folders) == 2 and len(set(folders)) == 2 and most[0] == 1
    assert all((folder / "output.mp4").is_file() for folder in folders)
