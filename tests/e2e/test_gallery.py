"""The web gallery in a real headless Chromium (Debian's ``chromium``, driven by Playwright), at
a laptop's width (1366x900) and a phone's (390x844): browsing and paging, the view kept in the
URL (Back, Forward, shared links), errors that clear stale results, the filter's messages, the
viewer, keyboard use. Screenshots go to $CLIPSEARCH_SCREENSHOTS when it is set.

Locally the test is skipped when no Chromium is installed; CI sets CLIPSEARCH_REQUIRE_BROWSER=1
(and installs Chromium), so there it fails instead.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from clipsearch.encoders import ModelIdentity, ModelSpec, load_encoder
from clipsearch.pipeline import IngestOptions, Ingestor
from clipsearch.server import ServerSettings, create_app
from clipsearch.sources import FolderSource
from clipsearch.store import NewItem, SQLiteStore

from ..conftest import RunningServer, write_photos

CHROMIUM = os.environ.get("CLIPSEARCH_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # this machine has no route out; background fetches would only produce refused connections
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

if not CHROMIUM:
    if os.environ.get("CLIPSEARCH_REQUIRE_BROWSER") == "1":
        raise RuntimeError("CLIPSEARCH_REQUIRE_BROWSER=1 but no chromium is installed (apt-get install chromium)")
    pytest.skip("no chromium installed (apt-get install chromium)", allow_module_level=True)

playwright_api = pytest.importorskip("playwright.sync_api")


SIZES = {"desktop": (1366, 900), "phone": (390, 844)}
SHAPES = [("red", "circle"), ("blue", "square"), ("green", "triangle")]
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60)}


def write_shapes(folder: Path, per_folder: int = 30) -> None:
    """Coloured shapes, ``per_folder`` in each of red_circle/, blue_square/, green_triangle/:
    more items than a page, in folders whose names are words."""
    rng = np.random.default_rng(0)
    for colour, shape in SHAPES:
        sub = folder / f"{colour}_{shape}"
        sub.mkdir(parents=True)
        for i in range(per_folder):
            img = Image.new("RGB", (96, 96), tuple(int(c) for c in rng.integers(200, 256, 3)))
            draw = ImageDraw.Draw(img)
            x, y = (int(v) for v in rng.integers(30, 66, 2))
            r = int(rng.integers(14, 28))
            box = (x - r, y - r, x + r, y + r)
            if shape == "circle":
                draw.ellipse(box, fill=COLOURS[colour])
            elif shape == "square":
                draw.rectangle(box, fill=COLOURS[colour])
            else:
                draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=COLOURS[colour])
            img.save(sub / f"{i:03d}.png")


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, tiny_openclip):
    """A served store with four namespaces: ``default`` (six photos), ``shapes`` (90 shapes in
    three folders), ``other`` (vectors of another model: browsable, not searchable by text) and
    ``empty``."""
    root = tmp_path_factory.mktemp("gallery")
    photos = write_photos(root / "photos")
    # one photo as a phone writes it: the camera and the time taken, for the viewer to show
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0132] = "Apple", "iPhone 13", "2024:06:01 18:30:00"
    Image.open(photos[0]).save(photos[0], "JPEG", quality=90, exif=exif)
    write_shapes(root / "shapes")
    spec = ModelSpec(weights=tiny_openclip, device="cpu")
    store = SQLiteStore(root / "g.db")
    encoder = load_encoder(spec)
    Ingestor(store, encoder, spec, "default", IngestOptions()).run([FolderSource(root / "photos")])
    Ingestor(store, encoder, spec, "shapes", IngestOptions()).run([FolderSource(root / "shapes")])
    store.bind_namespace("empty", encoder.identity, {})
    store.bind_namespace("other", ModelIdentity("open_clip", "another-model", "", encoder.dim, {}), {})
    vectors = np.random.default_rng(1).normal(size=(len(photos), encoder.dim)).astype(np.float32)
    items = [NewItem(f"o{i}", {"path": str(p), "filename": p.name}, f"s{i}") for i, p in enumerate(photos)]
    store.write_batch("other", items, vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    store.close()
    app = create_app(ServerSettings(db=str(root / "g.db"), api_key="gallery-key"), lambda: (load_encoder(spec), spec))
    with RunningServer(app) as srv:
        yield srv.wait_ready(), root


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def shots(root: Path) -> Path:
    return Path(os.environ.get("CLIPSEARCH_SCREENSHOTS", root))


def signed_in(browser, server, size: str = "desktop", path: str = "/", key: str = "gallery-key"):
    """A page of the gallery with the API key stored, opened at ``path``; and the list its page
    errors go to."""
    width, height = SIZES[size]
    page = browser.new_page(viewport={"width": width, "height": height})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.add_init_script(f"localStorage.setItem('clipsearch-api-key', {key!r})")
    page.goto(server.url + path)
    return page, errors


def status(page) -> str:
    return page.eval_on_selector("#status", "s => s.textContent")


def wait_status(page, text: str, timeout: float = 15000) -> None:
    try:
        page.wait_for_function(
            "t => document.querySelector('#status').textContent.includes(t)", arg=text, timeout=timeout
        )
    except Exception:
        raise AssertionError(f"status {status(page)!r}, waiting for {text!r}") from None


def card_ids(page) -> list[str]:
    return page.eval_on_selector_all(".card", "cs => cs.map(c => c.dataset.id)")


def names(page) -> list[str]:
    return page.eval_on_selector_all(".card .name", "ns => ns.map(n => n.textContent)")


def images_drawn(page) -> None:
    page.wait_for_function("[...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth > 0)")


def search(page, text: str) -> None:
    page.fill("#query", text)
    page.press("#query", "Enter")


def open_options(page) -> None:
    """On a phone the namespace, mode and filter sit behind the Options button."""
    if not page.is_visible("#filter"):
        page.click("#options-toggle")


def set_filter(page, text: str) -> None:
    open_options(page)
    page.fill("#filter", text)
    page.press("#filter", "Enter")


def test_the_key_prompt_then_browse_without_a_query(gallery, browser):
    server, root = gallery
    page = browser.new_page(viewport={"width": 1366, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_selector("#key-form:not([hidden])")
    assert page.eval_on_selector("label[for=api-key]", "l => l.textContent") == "API key"  # a visible label
    page.fill("#api-key", "gallery-key")
    page.press("#api-key", "Enter")
    # no query: the namespace's items, newest first
    wait_status(page, "6 items")
    assert page.text_content("#context-text") == "All items, newest first"
    assert len(card_ids(page)) == 6
    images_drawn(page)
    assert errors == []
    page.close()


def test_a_wrong_key_is_said_to_be_rejected(gallery, browser):
    server, _ = gallery
    page, errors = signed_in(browser, server, key="wrong-key")
    wait_status(page, "the API key was rejected")
    assert page.is_visible("#api-key") and card_ids(page) == []
    page.close()


@pytest.mark.parametrize("size", ["desktop", "phone"])
def test_browse_pages_as_the_grid_scrolls_by_order_and_folder(gallery, browser, size):
    server, root = gallery
    page, errors = signed_in(browser, server, size, "/?ns=shapes")
    wait_status(page, "90 items (40 shown)")
    newest = card_ids(page)
    assert len(newest) == 40
    images_drawn(page)
    page.screenshot(path=str(shots(root) / f"gallery-browse-{size}.png"))
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    wait_status(page, "90 items (80 shown)")
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    page.wait_for_function("document.querySelector('#status').textContent === '90 items'")
    ids = card_ids(page)
    assert len(ids) == 90 == len(set(ids)) and ids[:40] == newest
    assert page.is_hidden("#load-more")  # nothing more to load

    page.select_option("#order", "oldest")
    wait_status(page, "(40 shown)")
    assert card_ids(page)[:3] == ids[::-1][:3] and "order=oldest" in page.url
    page.select_option("#folder", label="red_circle (30)")
    wait_status(page, "30 items")
    assert page.text_content("#context-text") == "All items, oldest first · in red_circle"
    assert set(page.eval_on_selector_all(".card .folder", "fs => fs.map(f => f.textContent)")) == {"red_circle"}
    # the × leaves the folder
    page.click("#context-clear")
    wait_status(page, "90 items (40 shown)")
    assert errors == []
    page.close()


@pytest.mark.parametrize("size", ["desktop", "phone"])
def test_back_forward_and_a_shared_link_show_the_same_results(gallery, browser, size):
    server, root = gallery
    page, errors = signed_in(browser, server, size)
    wait_status(page, "6 items")
    search(page, "a photo")
    wait_status(page, "6 results")
    assert "q=a+photo" in page.url and page.text_content("#context-text") == "Results for “a photo”"
    first = card_ids(page)
    first_url = page.url
    page.screenshot(path=str(shots(root) / f"gallery-search-{size}.png"))

    # the viewer's "Similar": a new view, in the URL and the caption; the query box is emptied
    page.click(".card >> nth=2")
    page.wait_for_selector("#viewer[open]")
    name = page.text_content("#viewer-title")
    page.click("#viewer-similar")
    wait_status(page, "5 results")
    assert page.text_content("#context-text") == f"Similar to {name}"
    assert "similar=" in page.url and page.input_value("#query") == ""
    assert first[2] not in card_ids(page)

    page.go_back()
    wait_status(page, "6 results")
    assert card_ids(page) == first and page.input_value("#query") == "a photo"
    page.go_forward()
    wait_status(page, "5 results")
    assert page.text_content("#context-text") == f"Similar to {name}"
    page.go_back()
    page.go_back()
    wait_status(page, "6 items")  # where the page started: browse

    other, other_errors = signed_in(browser, server, size, first_url.replace(server.url, ""))
    wait_status(other, "6 results")
    assert card_ids(other) == first and other.input_value("#query") == "a photo"
    assert errors == [] and other_errors == []
    other.close()
    page.close()


@pytest.mark.parametrize("size", ["desktop", "phone"])
def test_errors_clear_stale_results_and_context_changes_search_again(gallery, browser, tmp_path, size):
    server, root = gallery
    page, errors = signed_in(browser, server, size)
    wait_status(page, "6 items")
    search(page, "a photo")
    wait_status(page, "6 results")

    # a file that is not an image: an error, and the earlier results go
    not_image = tmp_path / "notimage.png"
    not_image.write_bytes(b"this is no image")
    page.set_input_files("#image-file", str(not_image))
    page.wait_for_function("document.querySelector('#status').classList.contains('error')")
    assert card_ids(page) == [] and status(page).startswith("notimage.png: not an image")
    assert page.is_hidden("#context-image")  # no broken image

    # a mode change searches again; keyword mode finds folder words
    open_options(page)
    page.select_option("#namespace", "shapes")
    page.select_option("#mode", "keyword")
    search(page, "circle")
    wait_status(page, "30 results")
    assert "mode=keyword" in page.url and "ns=shapes" in page.url
    assert page.eval_on_selector_all(".card .score", "s => s.length") == 0  # BM25 scores are no cosines
    page.select_option("#mode", "vector")
    wait_status(page, "40+ results")
    assert page.eval_on_selector_all(".card .score", "s => s.length") == 40

    # a namespace of another model: one line, details behind a toggle, no cards of the last one
    page.select_option("#namespace", "other")
    wait_status(page, "holds vectors of another model")
    assert card_ids(page) == [] and len(status(page)) < 200
    assert page.is_visible("#status-details") and "another-model" in page.text_content("#status-detail-text")
    page.screenshot(path=str(shots(root) / f"gallery-other-model-{size}.png"))
    # ... which can still be browsed, and searched by "similar"
    page.click("#context-text")  # nothing: the caption is no control
    page.select_option("#mode", "keyword")
    page.click("#home")
    wait_status(page, "6 items")
    page.click(".card >> nth=0")
    page.click("#viewer-similar")
    wait_status(page, "5 results")

    open_options(page)
    page.select_option("#namespace", "empty")
    wait_status(page, "is empty")
    assert card_ids(page) == []
    page.screenshot(path=str(shots(root) / f"gallery-empty-{size}.png"))
    assert errors == []
    page.close()


@pytest.mark.parametrize("size", ["desktop", "phone"])
def test_filter_mistakes_are_said_inline(gallery, browser, size):
    server, root = gallery
    page, errors = signed_in(browser, server, size)
    wait_status(page, "6 items")
    search(page, "a photo")
    wait_status(page, "6 results")

    set_filter(page, "colour=red")
    page.wait_for_selector("#filter-error:not([hidden])")
    message = page.text_content("#filter-error")
    assert "no item has the metadata key 'colour'" in message and "camera_make" in message and "width" in message
    assert card_ids(page) == []
    page.screenshot(path=str(shots(root) / f"gallery-filter-error-{size}.png"))

    set_filter(page, "width=>100")
    page.wait_for_function("document.querySelector('#filter-error').textContent.includes('did you mean width>=100?')")
    set_filter(page, "width>=abc")
    page.wait_for_function("document.querySelector('#filter-error').textContent.includes('is a number in every item')")

    # a filter that is right: chips, and the results narrowed (widths are 371 to 640)
    set_filter(page, "width>=500 width<600")
    wait_status(page, "2 results")
    assert page.is_hidden("#filter-error")
    assert page.eval_on_selector_all(".chip", "cs => cs.map(c => c.textContent)") == ["width>=500 ×", "width<600 ×"]
    page.click(".chip >> nth=1")
    wait_status(page, "4 results")
    assert "filter=width%3E%3D500" in page.url

    # suggestions: the keys (a number's as a range), then a key's values
    page.fill("#filter", "")
    page.type("#filter", "w")
    page.wait_for_function(
        "[...document.querySelectorAll('#filter-suggestions option')].some(o => o.value === 'width>=')"
    )
    page.fill("#filter", "")
    page.type("#filter", "filename=")
    page.wait_for_function(
        "[...document.querySelectorAll('#filter-suggestions option')].some(o => o.value === 'filename=coffee.jpg')"
    )

    # a value of the right key that matches nothing says how filters match
    set_filter(page, "filename=coffee")
    wait_status(page, "matches whole values")
    assert errors == []
    page.close()


@pytest.mark.parametrize("size", ["desktop", "phone"])
def test_the_viewer_by_keyboard(gallery, browser, size):
    server, root = gallery
    page, errors = signed_in(browser, server, size)
    wait_status(page, "6 items")
    images_drawn(page)
    # one tab stop for the grid; the arrow keys move within it
    assert page.eval_on_selector_all(".card", "cs => cs.filter(c => c.tabIndex === 0).length") == 1
    page.focus(".card[tabindex='0']")
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.dataset.index") == "1"
    label = page.evaluate("document.activeElement.getAttribute('aria-label')")
    assert label.endswith(", in photos") and "score" not in label  # browsing has no scores
    page.keyboard.press("Enter")
    page.wait_for_selector("#viewer[open]")
    assert page.evaluate("document.activeElement.id") == "viewer-close"
    second = names(page)[1]
    assert page.text_content("#viewer-title") == second
    page.wait_for_function("document.querySelector('#viewer-image').naturalWidth > 0")
    assert page.get_attribute("#viewer-image", "alt") == f"{second}, in photos"
    assert page.text_content("#viewer-position") == "2 of 6"
    facts = page.text_content("#viewer-facts")
    assert "Folder" in facts and "Size" in facts and " × " in facts

    page.keyboard.press("ArrowRight")
    page.wait_for_function("t => document.querySelector('#viewer-title').textContent === t", arg=names(page)[2])
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    page.wait_for_function("t => document.querySelector('#viewer-title').textContent === t", arg=names(page)[0])
    assert page.is_disabled("#viewer-prev")

    with page.expect_download() as download:
        page.click("#viewer-download")
    assert download.value.suggested_filename == names(page)[0]

    page.keyboard.press("Escape")
    page.wait_for_selector("#viewer:not([open])", state="attached")
    # focus back on the card of the item last viewed (not the one that opened the viewer)
    page.wait_for_function("document.activeElement.dataset.index === '0'", timeout=5000)

    # what the camera wrote, in words
    page.click(".card >> nth=5")
    page.wait_for_selector("#viewer[open]")
    facts = page.text_content("#viewer-facts")
    assert "TakenJune 1, 2024" in facts and "CameraApple iPhone 13" in facts, facts
    page.wait_for_function("document.querySelector('#viewer-image').naturalWidth > 0")
    page.screenshot(path=str(shots(root) / f"gallery-viewer-{size}.png"))
    page.click("#viewer-close")
    page.wait_for_selector("#viewer:not([open])", state="attached")
    assert errors == []
    page.close()


@pytest.mark.parametrize("size", ["desktop", "phone"])
def test_keyboard_only_image_search(gallery, browser, size):
    server, root = gallery
    page, errors = signed_in(browser, server, size)
    wait_status(page, "6 items")
    # the chooser is answered by a listener set up ahead: one that expect_file_chooser sets up as
    # the key is pressed can miss a chooser that opens at once
    chosen: list[str] = []
    page.on("filechooser", lambda fc: (chosen.append("yes"), fc.set_files(str(root / "photos" / "coffee.jpg"))))
    page.focus("#query")
    for _ in range(5):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "pick-image":
            break
    assert page.evaluate("document.activeElement.id") == "pick-image"
    page.keyboard.press("Enter")
    wait_status(page, "6 results")
    assert chosen == ["yes"] and page.text_content("#context-text") == "Image: coffee.jpg"
    assert page.evaluate("document.querySelector('#context-image').naturalWidth") > 0
    assert names(page)[0] == "coffee.jpg" and "image=" in page.url
    page.screenshot(path=str(shots(root) / f"gallery-image-{size}.png"))
    page.click("#context-clear")
    wait_status(page, "6 items")
    assert errors == []
    page.close()


@pytest.mark.parametrize("size", ["desktop", "phone"])
def test_an_item_whose_file_vanished_shows_a_placeholder(gallery, browser, size):
    server, root = gallery
    import httpx

    headers = {"Authorization": "Bearer gallery-key"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as c:
        data = (root / "photos" / "coffee.jpg").read_bytes()
        form = {"namespace": f"vanish-{size}"}
        item = c.post("/api/v1/items", files={"file": ("c.jpg", data, "image/jpeg")}, data=form)
        assert item.status_code == 201, item.text
    Path(item.json()["metadata"]["path"]).unlink()  # the file goes; the item stays

    page, errors = signed_in(browser, server, size, f"/?ns=vanish-{size}")
    page.wait_for_selector(".card img.missing")
    img = page.locator(".card img").first
    assert img.get_attribute("alt") == "image file missing"
    assert page.evaluate("document.querySelector('.card img').naturalWidth") > 0  # drawn, not broken
    page.click(".card")
    page.wait_for_selector("#viewer[open] #viewer-image.missing")
    assert page.is_disabled("#viewer-open") is False  # the path is recorded; opening it says it is gone
    page.screenshot(path=str(shots(root) / f"gallery-missing-{size}.png"))
    assert errors == []
    page.close()


def test_phone_header_is_compact(gallery, browser):
    server, root = gallery
    page, errors = signed_in(browser, server, "phone")
    wait_status(page, "6 items")
    assert page.evaluate("document.querySelector('header').getBoundingClientRect().height") < 140
    assert not page.is_visible("#filter")
    page.click("#options-toggle")
    assert page.is_visible("#filter") and page.get_attribute("#options-toggle", "aria-expanded") == "true"
    page.evaluate("window.scrollTo(0, 400)")
    assert page.evaluate("document.querySelector('header').getBoundingClientRect().bottom") <= 400  # scrolls away
    assert errors == []
    page.close()
