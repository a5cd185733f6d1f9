"""The duplicates review page (`ghindex serve --duplicates`) in a real browser: headless Chromium (Debian's
`chromium`) driven by Playwright loads /duplicates from a running server, sees the groups largest first
with their images, distances and kept marks, follows a neighbour link, opens the search page from an
image, and fits a phone's width."""
import pytest

from test_dedup import find_groups, make_duplicates_index
# the browser, the server in a thread and the viewports are the search page test's (it skips without Chromium)
from test_serve_browser import LAPTOP, PHONE, RunningServer, browser  # noqa: F401 - browser: a fixture


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_duplicates_index(tmp_path_factory.mktemp("dedup-browser"))


def images_loaded(page):
    page.wait_for_function(
        "() => [...document.querySelectorAll('.member img')].every(i => i.parentElement.classList.contains('missing')"
        " || (i.complete && i.naturalWidth > 0))", timeout=20000)


def test_review_groups_follow_a_neighbour_and_search_by_an_image(browser, data, tmp_path):
    groups = find_groups(data["codes"], 2)
    ids = data["ids"]
    with RunningServer(data["index"], duplicates=data["jsonl"]) as server:
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
    with RunningServer(data["index"], duplicates=data["jsonl"], token="open sesame") as server:
        page = browser.new_page(viewport=LAPTOP)
        page.goto(server.url + "duplicates")
        page.wait_for_selector("#token-form:not([hidden])")
        page.fill("#token-input", "open sesame")
        page.click("#token-form button[type=submit]")
        page.wait_for_function("() => document.querySelectorAll('.group').length > 0")
        images_loaded(page)  # images come through fetch with the token, shown from blobs
        assert page.evaluate("() => sessionStorage.getItem('ghindex-token')") == "open sesame"
        page.close()
