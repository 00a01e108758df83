"""``python -m pipelines.app`` in a real headless Chromium: the page generates, shows the seed it used, downloads the
saved PNG with its metadata, inpaints with a mask painted with the mouse, and shows a bad input's message (no stack
trace), all on the shipped model. It takes a screenshot of the page; ``LDM_UPDATE_SCREENSHOT=1`` writes it to
``docs/app.png``, the one the README shows. Plus the app's plain pieces and its command line without a browser.

The browser test needs Chromium (``apt-get install chromium``, or ``CHROMIUM=/path/to/chrome``) and playwright's
Python package (requirements-dev.txt; its own browser download is not used); it is skipped, saying which is missing,
where either is not there.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from pipelines import DEFAULT_MODEL
from pipelines.app import SHAPES_EXAMPLES, SettingsInputs, build_app, editor_image_and_mask, example_prompts, main
from pipelines.generation_defaults import GenerationDefaults
from pipelines.studio import Studio

REPO_ROOT = Path(__file__).resolve().parents[2]
README_SCREENSHOT = REPO_ROOT / "docs" / "app.png"
# Without the background-networking switches Chromium keeps calling home, which a machine without a network refuses.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STARTUP_SECONDS = 600  # minutes only on a machine busy with other work; seconds otherwise
WAIT_MS = 300_000  # four images of the shipped model take about two seconds; minutes only on a busy machine
PROMPT = "a red circle on the left"
THUMBNAILS_LOADED = """() => {
    const images = [...document.querySelectorAll('button[aria-label^="Thumbnail"] img')];
    return images.length > 0 && images.every((image) => image.complete && image.naturalWidth > 0);
}"""


def find_chromium() -> str | None:
    """``$CHROMIUM``, else the first Chromium / Chrome on ``PATH``."""
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (path := shutil.which(name)):
            return path
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_serving(url: str, port: int, process: subprocess.Popen, log: Path) -> None:
    """Wait for the port to open, then for the page. Polling is by bare connections, so the page is asked for once:
    on a busy machine a page request competes with the app's own start-up check of it."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the app exited with status {process.returncode}:\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        except OSError:  # not listening yet
            time.sleep(1)
            continue
        with urllib.request.urlopen(url, timeout=max(deadline - time.monotonic(), 1)):
            return
    pytest.fail(f"the app did not answer at {url} within {STARTUP_SECONDS} s:\n{log.read_text()}")


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """The app's URL, output folder and log: ``python -m pipelines.app`` on the shipped model (its defaults), on a
    free local port."""
    model = DEFAULT_MODEL
    port, out, log = free_port(), tmp_path / "out", tmp_path / "app.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_TEMP_DIR": str(tmp_path / "gradio"),
    }
    command = [
        sys.executable,
        "-m",
        "pipelines.app",
        "--model",
        str(model),
        "--port",
        str(port),
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    with log.open("w") as log_file:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/", port, process, log)
        yield f"http://127.0.0.1:{port}/", out, log
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture
def page(tmp_path: Path):
    """A page of a headless Chromium with a fresh profile."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-dev.txt)")
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium found: apt-get install chromium, or set CHROMIUM to a Chromium or Chrome binary")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path / "profile",
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1100, "height": 860},
            accept_downloads=True,
        )
        yield context.new_page()
        context.close()


def set_number(page, label: str, value: int) -> None:
    field = page.get_by_label(f"number input for {label}")
    field.fill(str(value))
    field.press("Enter")


def wait_for_images(page, thumbnail, log: Path) -> None:
    """Wait for ``thumbnail``, failing at once, with the page's message and the app's log, if an error shows."""
    toast = page.get_by_test_id("toast-body")
    try:
        thumbnail.or_(toast).first.wait_for(timeout=WAIT_MS)
    except Exception as err:  # playwright's TimeoutError: say what the page and the app were doing instead
        shot = log.with_name("timeout.png")
        page.screenshot(path=shot, full_page=True)
        pytest.fail(
            f"no images after {WAIT_MS // 1000} s ({type(err).__name__}); page screenshot {shot}\n"
            f"page text:\n{page.inner_text('body')[-2000:]}\napp log:\n{log.read_text()[-4000:]}"
        )
    if toast.count():
        pytest.fail(f"the page showed an error instead of images: {toast.first.inner_text()!r}\n{log.read_text()}")


def canvas_pixels(canvas) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(canvas.screenshot())).convert("L"), dtype=np.float32)


def wait_for_canvas(canvas, ready, what: str, timeout_s: float = WAIT_MS / 1000) -> np.ndarray | None:
    """Poll screenshots of the editor's canvas until ``ready(pixels)``; the editor draws asynchronously (WebGL), and
    a stroke painted before it has drawn the upload is lost. Fails after ``WAIT_MS``; with a shorter ``timeout_s``,
    returns None instead so that the caller can try again."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready(pixels := canvas_pixels(canvas)):
            return pixels
        time.sleep(0.2)
    if timeout_s < WAIT_MS / 1000:
        return None
    pytest.fail(f"the image editor never showed {what}")


def upload_to_editor(editor, path: Path) -> tuple[object, np.ndarray]:
    """Upload ``path`` into the image editor and wait until its canvas shows it. On a busy machine the editor can miss
    an upload made while it is still mounting (seen once in CI: the canvas stayed blank for the whole five minutes),
    so the upload is repeated, a few times, until the canvas shows the image."""
    file_input = editor.locator("input[type=file]")
    file_input.wait_for(state="attached", timeout=WAIT_MS)
    canvas = editor.locator("canvas").first
    tries = 5
    for _ in range(tries):
        file_input.set_input_files(path)
        editor.get_by_role("button", name="Brush", exact=True).wait_for(timeout=WAIT_MS)
        wait_s = WAIT_MS / 1000 / tries
        loaded = wait_for_canvas(canvas, lambda pixels: pixels.std() > 30, "the upload", timeout_s=wait_s)
        if loaded is not None:
            return canvas, loaded
    pytest.fail(f"the image editor never showed the uploaded image after {tries} uploads")


def save_screenshot(page, path: Path) -> None:
    """The top of the page, once the gallery's images have loaded, as a small PNG (64 colours) for the README."""
    page.wait_for_function(THUMBNAILS_LOADED, timeout=WAIT_MS)
    page.evaluate("window.scrollTo(0, 0)")
    shot = PIL.Image.open(io.BytesIO(page.screenshot()))
    path.parent.mkdir(exist_ok=True)
    shot.convert("RGB").quantize(colors=64, method=PIL.Image.Quantize.MEDIANCUT).save(path, optimize=True)


@pytest.mark.slow
def test_the_page_generates_downloads_inpaints_and_shows_errors(app, page, tmp_path) -> None:
    url, out, log = app
    defaults = GenerationDefaults.load(DEFAULT_MODEL)
    page.goto(url)
    prompt = page.get_by_label("Prompt", exact=True)
    prompt.fill(PROMPT)
    page.get_by_label("Random seed").uncheck()
    set_number(page, "Images", 4)
    page.get_by_label("Seed", exact=True).fill("42")
    page.get_by_role("button", name="Generate").click()
    wait_for_images(page, page.get_by_role("button", name="Thumbnail 4 of 4"), log)
    assert page.get_by_label("Seed used").input_value() == "42"
    save_screenshot(page, README_SCREENSHOT if os.environ.get("LDM_UPDATE_SCREENSHOT") else tmp_path / "app.png")

    # The download is the PNG the app saved, byte for byte: size, prompt, seed and the model's default settings.
    page.get_by_role("button", name="Thumbnail 2 of 4").first.click()
    with page.expect_download() as download:
        page.get_by_role("button", name="Download", exact=True).click()
    downloaded = Path(download.value.path()).read_bytes()
    png = PIL.Image.open(io.BytesIO(downloaded))
    assert png.size == (64, 64)
    expected = {
        "prompt": PROMPT,
        "seed": "43",
        "steps": str(defaults.num_inference_steps),
        "guidance_scale": str(float(defaults.guidance_scale)),
    }
    assert png.text.items() >= expected.items()
    saved = [p for p in out.glob("*.png") if p.name == download.value.suggested_filename]
    assert len(saved) == 1 and saved[0].read_bytes() == downloaded

    # Inpainting with a mask painted with the mouse and a random seed: the seed shown is the PNG's, and the pixels
    # away from the stroke are the upload's.
    upload = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    upload.save(tmp_path / "upload.png")
    page.get_by_label("Random seed").check()
    set_number(page, "Images", 1)
    page.get_by_role("tab", name="Inpaint").click()
    editor = page.locator("#inpaint-editor")
    canvas, loaded = upload_to_editor(editor, tmp_path / "upload.png")
    box = canvas.bounding_box()
    x, y = box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 40, y + 20, steps=8)
    page.mouse.up()
    wait_for_canvas(canvas, lambda pixels: pixels.shape != loaded.shape or (pixels != loaded).any(), "the stroke")
    page.get_by_role("button", name="Inpaint", exact=True).click()
    thumbnail = page.get_by_role("button", name="Thumbnail 1 of 1").first
    wait_for_images(page, thumbnail, log)
    png = PIL.Image.open(io.BytesIO(page.request.get(thumbnail.locator("img").get_attribute("src")).body()))
    assert png.size == upload.size and png.text["mode"] == "inpaint"
    assert png.text["seed"] == page.get_by_label("Seed used").input_value()
    changed = (np.asarray(png.convert("RGB")) != np.asarray(upload)).any(axis=-1)
    assert changed.any() and not changed[:, -16:].any()

    # A bad input: the message in the page says what to change, and no stack trace shows.
    prompt.fill("")
    page.get_by_role("button", name="Inpaint", exact=True).click()
    page.get_by_text("the prompt is empty; type what the image should show").wait_for(timeout=WAIT_MS)
    assert "Traceback" not in page.inner_text("body")


def test_editor_value_gives_the_image_and_the_painted_mask() -> None:
    background = PIL.Image.new("RGBA", (96, 64), (10, 20, 30, 255))
    layer = np.zeros((128, 192, 4), np.uint8)  # painted at twice the size: the mask is scaled to the image
    layer[32:64, 0:40] = (255, 255, 255, 255)
    image, mask = editor_image_and_mask({"background": background, "layers": [PIL.Image.fromarray(layer)]})
    assert image.mode == "RGB" and image.size == (96, 64)
    expected = np.zeros((64, 96), np.uint8)
    expected[16:32, 0:20] = 255
    assert np.array_equal(np.asarray(mask), expected)

    assert editor_image_and_mask(None) == (None, None)
    assert editor_image_and_mask({"background": None, "layers": []}) == (None, None)
    with pytest.raises(ValueError, match="nothing is painted: paint the area to regenerate"):
        editor_image_and_mask({"background": background, "layers": [PIL.Image.new("RGBA", (96, 64))]})


def test_every_mode_is_wired_and_queued_one_at_a_time(tiny_sd_dir, tmp_path) -> None:
    import gradio as gr
    import torch

    demo = build_app(Studio.load(tiny_sd_dir, tmp_path, torch.device("cpu")))
    clicks = [fn for fn in demo.fns.values() if fn.name == "run"]
    assert len(clicks) == 4  # text to image, image to image, inpaint, outpaint
    assert all(fn.concurrency_id == "generate" and fn.concurrency_limit == 1 for fn in clicks)
    labels = [block.label for block in demo.blocks.values() if isinstance(block, gr.Slider)]
    assert {"Steps", "Guidance scale", "Images", "Width", "Height", "Strength"} <= set(labels)


def test_the_shipped_model_shows_its_example_prompts_and_others_none(tiny_sd_dir, tmp_path) -> None:
    import gradio as gr
    import torch

    from shapes.pairs import is_held_out, parse_pair_prompt
    from shapes.world import parse_prompt

    pairs = [parse_pair_prompt(prompt) for prompt in SHAPES_EXAMPLES]
    assert all(parse_prompt(p) for p, pair in zip(SHAPES_EXAMPLES, pairs) if pair is None)  # one-object prompts
    objects = [pair for pair in pairs if pair is not None]
    assert len(objects) >= 2  # two-object prompts, one of them a pairing never seen together in training
    assert any(is_held_out(*zip(*((o[k]["colour"], o[k]["shape"]) for k in ("first", "second")))) for o in objects)

    demo = build_app(Studio.load(DEFAULT_MODEL, tmp_path, torch.device("cpu")))
    shown = [block.samples for block in demo.blocks.values() if isinstance(block, gr.Dataset)]
    assert shown == [[[prompt] for prompt in SHAPES_EXAMPLES]]
    assert example_prompts(tiny_sd_dir) == []
    other = build_app(Studio.load(tiny_sd_dir, tmp_path, torch.device("cpu")))
    assert not [block for block in other.blocks.values() if isinstance(block, gr.Dataset)]


def test_settings_are_read_from_the_page_values() -> None:
    import gradio as gr

    inputs = SettingsInputs(
        gr.Textbox(), gr.Textbox(), gr.Slider(), gr.Slider(), gr.Number(), gr.Checkbox(), gr.Slider(), gr.Dropdown()
    )
    values = {
        inputs.prompt: "a circle",
        inputs.negative_prompt: None,
        inputs.steps: 3.0,
        inputs.guidance_scale: 2,
        inputs.seed: 5,
        inputs.random_seed: False,
        inputs.num_images: 2.0,
        inputs.scheduler: "ddim",
    }
    settings = inputs.read(values)
    assert (settings.prompt, settings.negative_prompt, settings.steps, settings.seed) == ("a circle", "", 3, 5)
    assert (settings.guidance_scale, settings.num_images, settings.scheduler) == (2.0, 2, "ddim")
    assert inputs.read({**values, inputs.random_seed: True}).seed is None  # random: drawn when generating
    with pytest.raises(ValueError, match="type a seed, or tick Random seed"):
        inputs.read({**values, inputs.seed: None})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "70000"], "must be a port number from 1 to 65535; got 70000"),
        (["--model", "./no-such-model"], "no such folder"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(capsys, tmp_path, argv, message) -> None:
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "out").exists()
