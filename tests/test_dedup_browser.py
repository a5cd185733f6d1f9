"""The duplicates review page (`ghindex serve --duplicates`) in a real browser: headless Chromium (Debian's
`chromium`) driven by Playwright loads /duplicates from a running server, sees the groups largest first
with their images, distances and kept marks, follows a neighbour link, opens the search page from an
image, and fits a phone's width."""
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
from test_dedup import find_groups, make_duplicates_index  # noqa: E402

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
LAPTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}


class RunningServer:
    """`ghindex serve --duplicates` in a thread of this process, on 127.0.0.1 and a free port."""

    def __init__(self, index, duplicates, **options):
        self.server, self.sock, self.url, _ = make_server(index, host="127.0.0.1", port=0, duplicates=duplicates,
                                                          **options)
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
    return make_duplicates_index(tmp_path_factory.mktemp("dedup-browser"))


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def images_loaded(page):
    page.wait_for_function(
        "() => [...document.querySelectorAll('.member img')].every(i => i.parentElement.classList.contains('missing')"
        " || (i.complete && i.naturalWidth > 0))", timeout=20000)


def test_review_groups_follow_a_neighbour_and_search_by_an_image(browser, data, tmp_path):
    groups = find_groups(data["codes"], 2)
    ids = data["ids"]
    with RunningServer(data["index"], data["jsonl"]) as server:
        page = browser.new_page(viewport=LAPTOP)
        errors, outside = [], []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("request", lambda req: None if req.url.startswith(server.url) or req.url.startswith(("blob:", "data:"))
                else outside.append(req.url))
        page.goto(server.url + "duplicates")
        page.wait_for_function(f"() => document.querySelectorAll('.group').length === {len(groups)}")
        images_loaded(page)
        assert page.text_content("#summary").startswith(f"{len(groups)} groups")
        shown = page.eval_on_selector_all(".group", "els => els.map(g => [...g.querySelectorAll('.member')]"
                                                     ".map(m => Number(m.dataset.id)))")
        assert shown == [[int(ids[i]) for i in g["ids"]] for g in groups]  # largest first, ids ascending
        first = page.locator(".group").first
        assert "4 images" in first.text_content()
        kept = page.eval_on_selector_all(".member.kept", "els => els.map(m => Number(m.dataset.id))")
        assert kept == [int(ids[i]) for g in groups for i in g["kept"]]
        chained = page.eval_on_selector_all(".group", "els => els.map(g => !!g.querySelector('.chip.chain'))")
        assert chained == [g["diameter"] > 2 for g in groups] and any(chained)
        assert "diameter 4 bits" in page.locator(".group").nth(1).text_content()  # the chain of 3
        # an image whose file is gone says so; the others show their pictures
        gone = int(ids[29])
        assert page.locator(f".member[data-id='{gone}'] .thumb.missing").count() == 1
        # the first member's neighbours, with distances; following one flashes it
        first_id = shown[0][0]
        near = page.locator(f".member[data-id='{first_id}'] .near a")
        assert near.count() == 3
        assert near.first.text_content() == f"{shown[0][3]} (0 bits)"  # the exact copy comes first
        near.first.click()
        page.wait_for_selector(f".member[data-id='{shown[0][3]}'].flash")
        page.screenshot(path=str(tmp_path / "duplicates-laptop.png"), full_page=True)
        # an image links to the search page's query by its id
        page.click(f".member[data-id='{first_id}'] a.thumb")
        page.wait_for_function(f"() => document.getElementById('query-name') && "
                               f"document.getElementById('query-name').textContent === 'id {first_id}'")
        page.wait_for_function("() => document.querySelectorAll('#grid .tile').length === 10")
        assert page.url.endswith(f"/#id={first_id}&k=10")
        # back on the review page at a phone's width: one column, nothing wider than the screen
        page.goto(server.url + "duplicates")
        page.set_viewport_size(PHONE)
        page.wait_for_function(f"() => document.querySelectorAll('.group').length === {len(groups)}")
        images_loaded(page)
        assert page.evaluate("() => document.documentElement.scrollWidth") <= PHONE["width"]
        page.screenshot(path=str(tmp_path / "duplicates-phone.png"), full_page=True)
        assert not errors, errors
        assert not outside, outside
        page.close()


def test_review_page_asks_for_the_token(browser, data):
    with RunningServer(data["index"], data["jsonl"], token="open sesame") as server:
        page = browser.new_page(viewport=LAPTOP)
        page.goto(server.url + "duplicates")
        page.wait_for_selector("#token-form:not([hidden])")
        page.fill("#token-input", "open sesame")
        page.click("#token-form button[type=submit]")
        page.wait_for_function("() => document.querySelectorAll('.group').length > 0")
        images_loaded(page)  # images come through fetch with the token, shown from blobs
        assert page.evaluate("() => sessionStorage.getItem('ghindex-token')") == "open sesame"
        page.close()
