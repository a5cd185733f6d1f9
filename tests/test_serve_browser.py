"""The page in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright loads the page
from a running server, uploads an image, waits for k result tiles, clicks one, sees new results, and
saves screenshots at laptop and phone widths."""
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run installs it)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install '.[dev]')")
pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install '.[serve]'")

from ghindex.serve import make_server  # noqa: E402
from test_serve import make_image_index  # noqa: E402

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
LAPTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}


class RunningServer:
    """`ghindex serve` in a thread of this process, on 127.0.0.1 and a free port."""

    def __init__(self, index, model=None, **options):
        self.server, self.sock, self.url, _ = make_server(index, model, host="127.0.0.1", port=0, **options)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_index(tmp_path_factory.mktemp("browser"))


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def images_loaded(page):
    page.wait_for_function(
        "() => [...document.querySelectorAll('#grid img, #query-img')].every(i => i.complete && "
        "(i.naturalWidth > 0 || i.parentElement.classList.contains('missing')))",
        timeout=20000)


def test_upload_then_click_a_result(browser, data, tmp_path):
    k = 10
    with RunningServer(data["index"], data["model"]) as server:
        page = browser.new_page(viewport=LAPTOP)
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        outside = []
        page.on("request", lambda req: None if req.url.startswith(server.url) or req.url.startswith(("blob:", "data:"))
                else outside.append(req.url))
        page.goto(server.url)
        page.wait_for_function("() => document.getElementById('summary').textContent.includes('images')")
        assert f"{len(data['ids'])} images" in page.text_content("#summary")

        page.set_input_files("#file", data["paths"][0])
        page.wait_for_function(f"() => document.querySelectorAll('#grid .tile').length === {k}")
        images_loaded(page)
        assert page.text_content("#query-name") == Path(data["paths"][0]).name
        assert "ms" in page.text_content("#timing")
        first = page.eval_on_selector_all("#grid .tile", "els => els.map(e => e.dataset.id)")
        assert page.text_content("#grid .tile .dist") == "0 bits"  # the image itself is stored
        page.screenshot(path=str(tmp_path / "upload-laptop.png"), full_page=True)

        # click the last result: its id becomes the query, and new neighbours come
        target = first[-1]
        page.click(f"#grid .tile[data-id='{target}']")
        page.wait_for_function(f"() => document.getElementById('query-name').textContent === 'id {target}'")
        page.wait_for_function(f"() => document.querySelectorAll('#grid .tile').length === {k}")
        images_loaded(page)
        second = page.eval_on_selector_all("#grid .tile", "els => els.map(e => e.dataset.id)")
        assert second[0] == target and second != first
        assert page.url.endswith(f"#id={target}&k={k}")
        page.screenshot(path=str(tmp_path / "id-laptop.png"), full_page=True)

        # change k: the same query, more tiles
        page.select_option("#k", "20")
        page.wait_for_function("() => document.querySelectorAll('#grid .tile').length === 20")
        images_loaded(page)

        # phone width: one column of controls, the grid still fits the screen
        page.set_viewport_size(PHONE)
        page.wait_for_timeout(200)
        assert page.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"]
        page.screenshot(path=str(tmp_path / "id-phone.png"), full_page=True)

        # a bad id shows a message, not a broken page
        page.fill("#id-input", "123456789")
        page.click("#id-form button[type=submit]")
        page.wait_for_selector("#error:not([hidden])")
        assert "unknown id" in page.text_content("#error")
        assert not errors, errors
        assert not outside, outside
        page.close()


def test_token_is_asked_for_and_kept_in_the_tab(browser, data, tmp_path):
    with RunningServer(data["index"], token="open sesame") as server:
        page = browser.new_page(viewport=LAPTOP)
        page.goto(server.url)
        page.wait_for_selector("#token-form:not([hidden])")
        page.fill("#token-input", "open sesame")
        page.click("#token-form button[type=submit]")
        page.wait_for_function("() => document.getElementById('summary').textContent.includes('images')")
        page.fill("#id-input", str(int(data["ids"][4])))
        page.click("#id-form button[type=submit]")
        page.wait_for_function("() => document.querySelectorAll('#grid .tile').length === 10")
        images_loaded(page)  # images come through fetch with the token, shown from blobs
        assert page.evaluate("() => sessionStorage.getItem('ghindex-token')") == "open sesame"
        # without --model the drop zone says why it is off
        assert "--model" in page.text_content("#drop-note")
        page.screenshot(path=str(tmp_path / "token.png"), full_page=True)
        page.close()
