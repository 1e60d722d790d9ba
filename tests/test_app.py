"""app.py, the Gradio demo: driven in headless Chromium (Debian's chromium + chromium-driver) and through gradio_client
against the shared tiny trained model, and its messages for a model that cannot be loaded."""

import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import REPO_ROOT
from PIL import Image, ImageOps
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = [  # headless as root in a closed network: no sandbox, GPU, updates or background requests
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
MAX_NEW_TOKENS = 32  # app.py's default
COLUMNS = ["file", "caption", "vision ms", "prefill ms", "decode ms", "image tokens"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_served(url: str, process: subprocess.Popen, log_path, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"app.py exited with code {process.returncode} before serving:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"app.py did not answer at {url} within {timeout:.0f} s:\n{log_path.read_text()}")


@pytest.fixture(scope="module")
def app_module():
    spec = importlib.util.spec_from_file_location("cnngemma_app", REPO_ROOT / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def app_url(trained_demo, tmp_path_factory):
    """`python app.py --model <trained demo>` on a free port of 127.0.0.1, offline, stopped after this module."""
    model_dir, _ = trained_demo
    folder = tmp_path_factory.mktemp("app")
    port, log_path = free_port(), folder / "app.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(folder / "hf-home"),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_TEMP_DIR": str(folder / "uploads"),  # Gradio's default is /tmp/gradio, left behind
    }
    env.pop("SPACE_ID", None)
    command = [sys.executable, str(REPO_ROOT / "app.py"), "--model", str(model_dir), "--port", str(port)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until_served(url, process, log_path)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium through chromium-driver, with a 1280 x 900 viewport and a fresh profile."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    if missing:
        pytest.fail(
            f"{missing} not found: this test drives Debian's Chromium. Install it with "
            "`apt-get install -y chromium chromium-driver` (see README, Tests)."
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        # set_window_size sets the outer window; screenshots show the viewport inside it
        driver.set_window_size(1280, 900 + driver.execute_script("return window.outerHeight - window.innerHeight"))
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def scene(trained_demo, tmp_path_factory):
    """The first test-split image of the demo data, written as the JPEG bytes the dataset stores."""
    import datasets

    _, dataset_dir = trained_demo
    test = datasets.load_from_disk(dataset_dir / "grouped")["test"]
    row = test.cast_column("image", datasets.Image(decode=False))[0]
    path = tmp_path_factory.mktemp("upload") / row["image_id"]
    path.write_bytes(row["image"]["bytes"])
    return path


@pytest.fixture(scope="module")
def generate_caption(trained_demo):
    """`model.generate`'s caption for an image file, with the trained folder loaded as a Hub user loads it."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model_dir, _ = trained_demo
    model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)

    def caption(path, num_beams: int = 1, max_new_tokens: int = MAX_NEW_TOKENS) -> str:
        inputs = processor(images=[Image.open(path).convert("RGB")])
        with torch.inference_mode():
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
        return processor.post_process_image_text_to_text(generated, input_ids=inputs["input_ids"])[0]

    return caption


def wait_for(driver, condition, timeout: float = 60):
    # The page builds itself with JavaScript and re-renders components when results arrive: an element may not
    # exist yet, or be gone a moment after it was found
    ignored = [NoSuchElementException, StaleElementReferenceException]
    return WebDriverWait(driver, timeout, ignored_exceptions=ignored).until(condition)


def upload_and_caption(driver, paths):
    field = wait_for(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#images input[type=file]"))
    field.send_keys("\n".join(map(str, paths)))
    wait_for(driver, lambda d: all(path.stem in d.find_element(By.ID, "images").text for path in paths))
    driver.find_element(By.ID, "caption-button").click()


def result_rows(driver, count: int) -> list[list[str]]:
    """The results table's body rows, once there are `count` of them."""

    def rows(d):
        found = [
            [cell.text for cell in row.find_elements(By.CSS_SELECTOR, "[role=gridcell]")]
            for row in d.find_elements(By.CSS_SELECTOR, "#results [role=row]")
        ]
        found = [row for row in found if row]  # the header row has column headers, not grid cells
        return found if len(found) == count else None

    return wait_for(driver, rows)


def test_page_captions_an_upload_as_generate_does_and_names_broken_files(
    app_url, browser, scene, generate_caption, trained_demo, tmp_path
):
    browser.get(app_url)
    upload_and_caption(browser, [scene])
    expected = generate_caption(scene)
    [row] = result_rows(browser, 1)
    num_image_tokens = json.loads((trained_demo[0] / "config.json").read_text())["num_image_tokens"]
    assert row[:2] == [scene.name, expected]
    assert row[5] == str(num_image_tokens)
    assert all(float(ms) > 0 for ms in row[2:5]), row  # vision, prefill and decode each took some time
    assert [image.get_attribute("alt") for image in browser.find_elements(By.CSS_SELECTOR, "#gallery img")] == [
        expected
    ]
    # the gallery loads its images lazily: wait for them before the screenshot
    wait_for(
        browser,
        lambda d: d.execute_script(
            "return [...document.querySelectorAll('#gallery img')].every(img => img.complete && img.naturalWidth > 0)"
        ),
    )
    screenshot = tmp_path / "app_screenshot.png"
    assert browser.save_screenshot(str(screenshot))
    assert Image.open(screenshot).size == (1280, 900)
    if os.environ.get("CNNGEMMA_SCREENSHOT"):
        shutil.copyfile(screenshot, os.environ["CNNGEMMA_SCREENSHOT"])

    # A text file named .jpg and a truncated JPEG next to a good image: each named, the good one still captioned.
    notes, cut = tmp_path / "notes.jpg", tmp_path / "cut.jpg"
    notes.write_bytes(b"these are notes, not an image")
    cut.write_bytes(scene.read_bytes()[: scene.stat().st_size // 2])
    browser.refresh()
    upload_and_caption(browser, [notes, scene, cut])
    [row] = result_rows(browser, 1)
    assert row[:2] == [scene.name, expected]
    notes_line, cut_line = browser.find_element(By.ID, "message").text.splitlines()
    assert notes_line == (
        "notes.jpg could not be read as an image (UnidentifiedImageError: cannot identify image file 'notes.jpg'). "
        "Upload a JPEG, PNG, TIFF or another format that Pillow opens."
    )
    assert cut_line.startswith("cut.jpg could not be read as an image (OSError: image file is truncated")
    assert "Traceback" not in browser.page_source


def test_gradio_client_calls_the_caption_endpoint(app_url, scene, generate_caption, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(app_url, verbose=False, download_files=str(tmp_path))
    notes = tmp_path / "notes.jpg"
    notes.write_bytes(b"these are notes, not an image")
    # (decoding, beams generate uses, maximum length): the beams slider counts for beam search only
    for decoding, num_beams, max_new_tokens in (
        ("greedy", 1, MAX_NEW_TOKENS),
        ("beam search", 3, MAX_NEW_TOKENS),
        ("greedy", 1, 3),
    ):
        gallery, table, message = client.predict(
            files=[handle_file(str(scene)), handle_file(str(notes))],
            decoding=decoding,
            num_beams=3,
            max_new_tokens=max_new_tokens,
            api_name="/caption",
        )
        expected = generate_caption(scene, num_beams=num_beams, max_new_tokens=max_new_tokens)
        assert table["headers"] == COLUMNS
        assert [row[:2] for row in table["data"]] == [[scene.name, expected]]
        assert [item["caption"] for item in gallery] == [expected]
        assert message.startswith("- **notes.jpg** could not be read as an image (UnidentifiedImageError")
    assert generate_caption(scene, max_new_tokens=3) != generate_caption(scene)  # the 3-token case did cut short
    kwargs = dict(decoding="greedy", num_beams=4, max_new_tokens=MAX_NEW_TOKENS, api_name="/caption")
    assert client.predict(files=[], **kwargs) == (
        [],
        {"headers": COLUMNS, "data": [], "metadata": None},
        "No image given: upload one or more images, or pick an example.",
    )


def test_page_captions_a_scene_upload_and_the_example_as_caption_py_does(
    app_url, browser, app_module, trained_demo, tmp_path
):
    # The scene tab in the browser: an uploaded GeoTIFF, then the bundled example picked, each gives the preview
    # picture and the GeoJSON download that the same model gives in-process.
    from cnngemma import inference

    model_dir, _ = trained_demo
    expected_preview, expected_geojson, _ = app_module.Captioner(
        *inference.load_model(str(model_dir)), str(model_dir)
    ).scene(str(app_module.SCENE_EXAMPLE), 128)
    expected = without_scene(json.loads(Path(expected_geojson).read_text())["features"])
    expected_picture = np.asarray(Image.open(expected_preview))
    upload = tmp_path / "my_scene.tif"
    shutil.copyfile(app_module.SCENE_EXAMPLE, upload)
    browser.get(app_url)
    field = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#scene input[type=file]"))

    def caption_and_download(name: str) -> tuple[list[dict], np.ndarray]:
        wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, f"#scene td.filename[aria-label='{name}']"))
        browser.find_element(By.ID, "scene-button").click()
        message = wait_for(
            browser, lambda d: "tiles captioned in" in (text := d.find_element(By.ID, "scene-message").text) and text
        )
        assert message.startswith(
            f"{name}: 384 x 384 px, uint16 (B04 red, B03 green, B02 blue), EPSG:32618; 9 tile(s)"
        )
        link = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#scene-geojson a[href]"))
        source = wait_for(browser, lambda d: d.execute_script(
            "const img = document.querySelector('#scene-preview img'); return img && img.complete && img.naturalWidth > 0 && img.src"
        ))  # fmt: skip
        with urllib.request.urlopen(source, timeout=30) as response:
            picture = np.asarray(Image.open(io.BytesIO(response.read())))
        with urllib.request.urlopen(link.get_attribute("href"), timeout=30) as response:
            features = json.loads(response.read())["features"]
        assert all(feature["properties"]["scene"] == name for feature in features)
        return without_scene(features), picture

    field.send_keys(str(upload))
    features, picture = caption_and_download("my_scene.tif")
    assert features == expected
    assert np.array_equal(picture[:384], expected_picture[:384])  # the scene and its tiles; no attribution below
    browser.refresh()
    example = "//button[contains(@class, 'gallery-item')][contains(., 'sentinel2_eastern_shore.tif')]"
    wait_for(browser, lambda d: d.find_element(By.XPATH, example)).click()
    features, picture = caption_and_download("sentinel2_eastern_shore.tif")
    assert features == expected and np.array_equal(picture, expected_picture)
    assert "Traceback" not in browser.page_source


def without_scene(features: list[dict]) -> list[dict]:
    return [{**item, "properties": {k: v for k, v in item["properties"].items() if k != "scene"}} for item in features]


def test_uploads_reach_the_model_as_the_training_data_were_decoded(app_module, trained_demo, tmp_path):
    # The Space has only the Hub model: it decodes uploads with the model's own load_image (remote code), which
    # turns an EXIF-rotated JPEG upright as `datasets` does for training images.
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model_dir, _ = trained_demo
    model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    Image.fromarray(np.arange(24 * 40 * 3, dtype=np.uint8).reshape(24, 40, 3)).save(path, exif=exif)
    with Image.open(path) as image:
        upright = np.asarray(ImageOps.exif_transpose(image))  # what `datasets` gives for the stored file
    seen = []

    def record(image, num_beams, max_new_tokens):  # instead of generating: what reached the model
        seen.append(np.asarray(image))
        return "a caption", {"vision": 0.0, "prefill": 0.0, "decode": 0.0}

    before_load_image = SimpleNamespace(image_processor=SimpleNamespace())  # a model saved before load_image existed
    for captioner in (app_module.Captioner(model, processor), app_module.Captioner(model, before_load_image)):
        captioner.generate = record
        row = ["rotated.jpg", "a caption", 0.0, 0.0, 0.0, model.config.num_image_tokens]
        assert captioner.caption([str(path)], "greedy", 1, 4)[1:] == ([row], "")
    assert np.array_equal(seen[0], upright)
    assert seen[1].shape == (24, 40, 3)  # Pillow alone leaves it on its side


def test_cli_names_a_model_it_cannot_load_and_exits_1(app_module, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("CNNGEMMA_MODEL", raising=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    cases = {
        str(tmp_path / "missing"): f"error: --model='{tmp_path / 'missing'}': no such folder. Pass a folder "
        "written by train_hf.py or a Hub id (user/name).",
        str(tmp_path / "empty"): f"error: --model='{tmp_path / 'empty'}' is a folder without config.json: not a "
        "saved model.",
        str(tmp_path / "bert"): f"error: --model='{tmp_path / 'bert'}' could not be loaded as a CNNGemma model: ",
        "someone/cnngemma": "error: --model='someone/cnngemma' looks like a Hub id, but HF_HUB_OFFLINE=1 forbids "
        "downloads.",
    }
    for source, start in cases.items():
        assert app_module.main(["--model", source]) == 1
        assert capsys.readouterr().err.startswith(start)

    assert app_module.main([]) == 1
    assert capsys.readouterr().err == (
        "error: No model given: pass --model DIR_OR_HUB_ID or set the CNNGEMMA_MODEL variable.\n"
    )
    monkeypatch.setenv("CNNGEMMA_MODEL", str(tmp_path / "missing"))
    assert app_module.main([]) == 1
    assert capsys.readouterr().err.startswith(f"error: CNNGEMMA_MODEL='{tmp_path / 'missing'}': no such folder.")


def test_on_a_space_the_page_says_why_the_model_did_not_load(app_module, browser, tmp_path, monkeypatch):
    # A Space shows visitors the page, not the log: main() serves a page that explains instead of exiting.
    launch, launched = app_module.gr.Blocks.launch, []
    monkeypatch.setattr(app_module.gr.Blocks, "launch", lambda demo, **kwargs: launched.append(demo))
    monkeypatch.setenv("SPACE_ID", "someone/cnngemma-demo")
    monkeypatch.delenv("CNNGEMMA_MODEL", raising=False)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    assert app_module.main([]) == 0
    [demo] = launched
    port = free_port()
    launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        problem = (
            "The model could not be loaded. No model given: pass --model DIR_OR_HUB_ID or set the CNNGEMMA_MODEL "
            "variable."
        )
        assert wait_for(browser, lambda d: d.find_element(By.ID, "model-error").text) == problem
        browser.find_element(By.ID, "caption-button").click()
        assert wait_for(browser, lambda d: d.find_element(By.ID, "message").text) == problem
    finally:
        demo.close()
