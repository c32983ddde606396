"""The search page in a real browser: Debian's chromium, driven by Playwright.

Screenshots of the page with results go to out/serve-screenshot*.png.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_serve import TOKEN, luma_subset, running_server, small_catalog
from vestis.serve import create_app

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parents[1] / "out"


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, luma_rows, data_dir) -> Iterator[str]:
    from vestis.catalog import Catalog
    from vestis.catalog.annotate import annotate_attributes
    from vestis.models.attributes import load_attribute_model

    catalog = small_catalog(tmp_path_factory, luma_rows, data_dir)
    with Catalog(catalog) as opened:
        annotate_attributes(opened, load_attribute_model())
    with running_server(create_app(catalog, token=TOKEN)) as base:
        yield base


@pytest.fixture(scope="module")
def rows(luma_rows) -> list[dict]:
    return luma_subset(luma_rows)


@pytest.fixture
def page(browser, base_url):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    outside: list[str] = []
    local = (base_url, "blob:", "data:")
    page.on("request", lambda r: None if r.url.startswith(local) else outside.append(r.url))
    page.goto(base_url)
    page.wait_for_selector("#stats:has-text('items')")
    page.check("#whole")  # these tests find a catalog photo's own item: search it whole
    yield page
    context.close()
    assert outside == [], f"the page reached outside the server: {outside}"


def photo_of(rows, data_dir, view: str = "main") -> tuple[str, Path]:
    row = next(r for r in rows if r["view"] == view)
    return row["item_id"], data_dir / "luma" / row["image"]


def cards_of(page) -> list[str]:
    page.wait_for_selector(".card")
    return page.eval_on_selector_all(".card", "cards => cards.map(c => c.dataset.item)")


def wait_for_images(page, selector: str) -> None:
    """Every image under ``selector`` loaded (and decodable)."""
    page.wait_for_function(
        "s => [...document.querySelectorAll(s)].every(i => i.complete && i.naturalWidth > 0)",
        arg=f"{selector} img",
    )


def test_uploading_a_photo_shows_the_garment_and_its_item_first(page, rows, data_dir):
    item_id, photo = photo_of(rows, data_dir)
    page.set_input_files("#file", str(photo))
    assert cards_of(page)[0] == item_id
    assert page.locator(".box").count() == 1
    assert "whole image" in page.inner_text(".box")
    first = page.locator(".card").first
    assert "score 1.000" in first.inner_text()
    wait_for_images(page, "#garments")
    wait_for_images(page, "#preview")
    assert page.locator("#status").inner_text().endswith("ms")
    SCREENSHOTS.mkdir(exist_ok=True)
    shot = SCREENSHOTS / "serve-screenshot.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")


def test_attribute_chips_and_complete_the_look(page, rows, data_dir):
    item_id, photo = photo_of(rows, data_dir)
    page.set_input_files("#file", str(photo))
    cards_of(page)
    assert page.locator("#garments .card").first.locator(".chip").count() > 0
    page.click("#complete")
    page.wait_for_selector("#outfit .card")
    assert page.inner_text("#outfit h3").startswith("Goes with")
    suggested = page.eval_on_selector_all("#outfit .card", "cs => cs.map(c => c.dataset.item)")
    assert suggested and item_id not in suggested
    page.screenshot(path=str(SCREENSHOTS / "serve-screenshot-outfit.png"), full_page=True)


def test_search_by_words_without_a_photo(page, rows):
    row = rows[0]
    page.fill("#text", f"{row['colour']} {row['name']}")
    page.press("#text", "Enter")
    assert cards_of(page)[0] == row["item_id"]
    assert row["name"] in page.inner_text("#garments h3")


def test_a_street_photo_shows_one_box_and_result_list_per_garment(page, data_dir):
    page.uncheck("#whole")
    page.set_input_files("#file", str(data_dir / "ccp" / "photos" / "0001.jpg"))
    page.wait_for_selector("section.garment")
    boxes = page.locator(".box")
    assert boxes.count() >= 3
    assert page.locator("section.garment").count() == boxes.count()
    labels = " ".join(boxes.all_inner_texts())
    assert "lower" in labels and "footwear" in labels
    page.screenshot(path=str(SCREENSHOTS / "serve-screenshot-garments.png"), full_page=True)


def test_filter_by_category_and_see_an_items_other_images(page, rows, data_dir):
    _, photo = photo_of(rows, data_dir)
    page.set_input_files("#file", str(photo))
    cards_of(page)
    category = rows[-1]["category"]
    page.select_option("#category", category)
    page.wait_for_function(
        "c => [...document.querySelectorAll('.card .meta')]"
        ".every(m => m.textContent.replaceAll('\\u200b', '').includes(c))",
        arg=category,
    )
    in_category = {r["item_id"] for r in rows if r["category"] == category}
    assert set(cards_of(page)) <= in_category

    page.locator(".card").first.click()
    dialog = page.locator("#item-dialog")
    dialog.wait_for(state="visible")
    wait_for_images(page, "#item-images")
    item = page.locator(".card").first.get_attribute("data-item")
    n_images = sum(1 for r in rows if r["item_id"] == item)
    assert page.locator("#item-images img").count() == n_images
    page.keyboard.press("Escape")
    dialog.wait_for(state="hidden")
    assert page.evaluate("document.activeElement.dataset.item") == item


def test_keyboard_paste_and_drop_all_start_a_search(page, rows, data_dir):
    item_id, photo = photo_of(rows, data_dir)
    # Listening before the page loads: Playwright intercepts choosers only once it listens.
    choosers = []
    page.on("filechooser", lambda chooser: choosers.append(chooser))
    page.reload()
    page.wait_for_selector("#stats:has-text('items')")
    page.evaluate("document.querySelector('#whole').checked = true")  # focus stays put
    page.keyboard.press("Tab")  # the first stop is the photo chooser
    assert page.evaluate("document.activeElement.id") == "file"
    page.keyboard.press("Enter")
    for _ in range(100):
        if choosers:
            break
        page.wait_for_timeout(50)
    choosers[0].set_files(str(photo))
    assert cards_of(page)[0] == item_id

    other_id, other = photo_of(rows[::-1], data_dir)
    for event in ["paste", "drop"]:
        page.evaluate("document.querySelector('#garments').replaceChildren()")
        page.evaluate(
            """async ([event, bytes]) => {
                const file = new File([new Uint8Array(bytes)], "photo.jpg", {type: "image/jpeg"});
                const data = new DataTransfer();
                data.items.add(file);
                const init = {bubbles: true, cancelable: true};
                const e = event === "paste"
                  ? new ClipboardEvent("paste", {...init, clipboardData: data})
                  : new DragEvent("drop", {...init, dataTransfer: data});
                (event === "paste" ? document : document.querySelector("#drop")).dispatchEvent(e);
            }""",
            [event, list(other.read_bytes())],
        )
        assert cards_of(page)[0] == other_id, event


def test_a_bad_file_gets_a_readable_message(page, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a photo")
    page.set_input_files("#file", str(text))
    status = page.locator("#status.error")
    status.wait_for()
    assert "notes.txt: not an image file" in status.inner_text()
    assert page.locator(".card").count() == 0


def test_readable_on_a_phone(browser, base_url, rows, data_dir):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    page = context.new_page()
    page.goto(base_url)
    page.wait_for_selector("#stats:has-text('items')")
    page.check("#whole")
    item_id, photo = photo_of(rows, data_dir)
    page.set_input_files("#file", str(photo))
    assert cards_of(page)[0] == item_id
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    card = page.locator(".card").first.bounding_box()
    assert 120 <= card["width"] <= 200  # two cards a row
    wait_for_images(page, "#garments li:nth-child(-n+2)")  # the rest load lazily
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "serve-screenshot-phone.png"), full_page=True)
    context.close()


def test_the_api_docs_render_offline(browser, base_url):
    page = browser.new_page()
    page.goto(f"{base_url}/docs")
    page.wait_for_selector("text=/search")
    assert page.locator(".opblock").count() >= 7
    page.close()
