"""The demo page in a real browser: Debian's chromium, headless, driven by Playwright, against the demo server started
on a free localhost port in this process. Screenshots go to artifacts/demo/ (git-ignored)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "demo"
ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]
WAIT_MS = 90_000  # one request on two busy CPU cores

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (`make test` installs it)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve(model: str, examples: Path):
    from vtprune.demo import launch
    from vtprune.demo.ui import build_demo

    page = build_demo(model=model, examples_dir=examples, max_new_tokens=4, repeats=1)
    port = free_port()
    launch(page, examples, port=port, prevent_thread_lock=True, quiet=True)
    return page, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def url(saved_model, tmp_path_factory):
    """The demo with a tiny random LLaVA preselected."""
    page, address = serve(str(saved_model), tmp_path_factory.mktemp("browser-examples"))
    yield address
    page.close()


@pytest.fixture(scope="module")
def toy_url(tmp_path_factory):
    """The demo as `vtprune demo` starts it: the embedded default model preselected."""
    page, address = serve("toy", tmp_path_factory.mktemp("browser-examples"))
    yield address
    page.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM), headless=True, args=ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        context.set_default_timeout(WAIT_MS)
        yield context
        context.close()


def open_page(browser, url: str):
    """A tab on the demo, loaded; yields it, then checks that it loaded nothing from outside the demo server."""
    tab = browser.new_page()
    outside = []
    tab.on("request", lambda request: None if request.url.startswith(url) else outside.append(request.url))
    tab.goto(url)
    tab.locator("#run").wait_for()
    yield tab
    tab.close()
    assert outside == []


@pytest.fixture
def page(browser, url):
    yield from open_page(browser, url)


@pytest.fixture
def toy_page(browser, toy_url):
    yield from open_page(browser, toy_url)


def shows(page, elem_id: str, text: str) -> None:
    """Wait until the component shows `text`."""
    from playwright.sync_api import expect

    expect(page.locator(f"#{elem_id}")).to_contain_text(text, timeout=WAIT_MS)


def status_says(page, text: str) -> None:
    shows(page, "status", text)


def use_example(page, label: str, last_file: str) -> None:
    page.get_by_text(label).click()
    shows(page, "files", last_file)  # the file list shows names as stem + suffix


def set_textbox(page, elem_id: str, value: str) -> None:
    page.locator(f"#{elem_id} textarea, #{elem_id} input").first.fill(value)


def set_model(page, value: str) -> None:
    box = page.locator("#model input")
    box.fill(value)
    box.press("Enter")


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_the_embedded_model_answers_a_toy_scene_and_shows_what_it_kept(toy_page, examples):
    page = toy_page
    example = next(e for label, e in examples.items() if label.startswith("Toy scene") and "small object" in label)
    use_example(page, example.label, Path(example.files[0]).stem)
    page.locator("#run").click()
    status_says(page, "Done: vtc-cls")
    assert page.locator("#dense-answer textarea").input_value().strip() == example.answer
    assert page.locator("#pruned-answer textarea").input_value().strip()
    assert "576" in page.locator("#metrics").inner_text()
    assert "of 576 patches kept" in page.locator("#heatmaps").inner_text()
    screenshot(page, "toy.png")


def test_a_bundled_example_shows_both_answers_the_costs_and_the_heatmaps(page):
    use_example(page, "GUI screenshots (3)", "screen_3")
    page.locator("#run").click()
    status_says(page, "Done: vtc-cls")
    dense = page.locator("#dense-answer textarea").input_value()
    pruned = page.locator("#pruned-answer textarea").input_value()
    assert dense.strip() and pruned.strip()
    metrics = page.locator("#metrics").inner_text()
    assert "48" in metrics and "12" in metrics and "0.25×" in metrics  # 3 screenshots x 16 tokens, a quarter kept
    assert "prefill time" in metrics and "peak memory" in metrics
    images = page.locator("#heatmaps img")
    images.nth(2).wait_for()
    assert images.count() == 3
    widths = images.evaluate_all("images => images.map(image => image.complete ? image.naturalWidth : 0)")
    assert widths == [3 * 336 + 20] * 3
    assert "screen_2.png: 4 of 16 patches kept" in page.locator("#heatmaps").inner_text()
    screenshot(page, "run.png")


def test_bad_input_is_a_message_on_the_page_and_the_server_keeps_serving(page, saved_model, tmp_path):
    page.locator("#run").click()
    status_says(page, "ask a question: the question box is empty")

    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    set_textbox(page, "question", "w1 w2")
    page.locator("#files input[type=file]").set_input_files(str(notes))
    shows(page, "files", "notes")
    page.locator("#run").click()
    status_says(page, "notes.txt is neither an image nor a video")

    use_example(page, "GUI screenshots (3)", "screen_3")
    set_textbox(page, "budget", "100")
    page.locator("#run").click()
    status_says(page, "keep=100 is more than the 16 visual tokens")

    set_textbox(page, "budget", "0.25")
    set_model(page, "/no/such/model")
    page.locator("#run").click()
    status_says(page, "model path '/no/such/model' does not exist")
    screenshot(page, "error.png")

    set_model(page, str(saved_model))
    page.locator("#run").click()
    status_says(page, "Done: vtc-cls")
    assert page.locator("#pruned-answer textarea").input_value().strip()


def test_compare_mode_shows_a_table_and_heatmaps_and_the_adapters_refusal(page, saved_qwen):
    use_example(page, "GUI screenshots (3)", "screen_3")
    set_model(page, str(saved_qwen))
    page.get_by_role("tab", name="Compare methods").click()
    for box in page.locator("#chosen label").all():
        if (box.inner_text().strip() in ("vtc-cls", "pool")) != box.locator("input").is_checked():
            box.click()
    page.locator("#compare").click()
    status_says(page, "Compared 2 methods (1 gave no result")
    table = page.locator("#table").inner_text()
    for text in ("dense", "pool", "vtc-cls", "[CLS]", "the qwen2-vl tower has none"):
        assert text in table
    images = page.locator("#compare-heatmaps img")
    images.nth(2).wait_for()
    assert images.count() == 3  # pool on three screenshots; the refused method has none
    screenshot(page, "compare.png")
