"""vestis serve: the HTTP API over real HTTP (uvicorn + httpx), on a catalog of real photos."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from PIL import Image

from vestis.catalog import Catalog
from vestis.serve import create_app

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
N_CATEGORIES = 6  # one product per category: about 30 photos
REPO = Path(__file__).resolve().parents[1]

_template: list[Path] = []


# -- shared with test_serve_browser.py ----------------------------------------------------
def luma_subset(luma_rows: list[dict]) -> list[dict]:
    """Every photo of the first product of the first categories, in catalog order."""
    by_category = defaultdict(list)
    for row in luma_rows:
        by_category[row["category"]].append(row)
    chosen = []
    for category in sorted(by_category)[:N_CATEGORIES]:
        product = sorted({row["product"] for row in by_category[category]})[0]
        chosen += [row for row in by_category[category] if row["product"] == product]
    return chosen


def small_catalog(tmp_path_factory, luma_rows, data_dir) -> Path:
    """A fresh copy of a small catalog of real Luma photos (indexed once per session)."""
    if not _template:
        folder = tmp_path_factory.mktemp("serve-template")
        source = folder / "source.csv"
        with open(source, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(luma_rows[0]))
            writer.writeheader()
            for row in luma_subset(luma_rows):
                writer.writerow({**row, "image": str(data_dir / "luma" / row["image"])})
        with Catalog(folder / "catalog") as catalog:  # whole photos: searched whole below
            report = catalog.add(source, crop="none")
            assert not report.failed
        _template.append(folder / "catalog")
    copy = tmp_path_factory.mktemp("serve-catalog") / "catalog"
    shutil.copytree(_template[0], copy)
    return copy


def wait_ready(get, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = get("/health")
        if response.status_code == 200:
            return
        assert response.json()["status"] == "loading", response.text
        time.sleep(0.1)
    raise TimeoutError("server not ready")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(app) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free local port; yields the base URL once ready."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        with httpx.Client(base_url=base) as client:
            wait_ready(client.get)
        yield base
    finally:
        server.should_exit = True
        thread.join(30)


@contextmanager
def serving(app) -> Iterator[httpx.Client]:
    """An HTTP client for ``app`` served by uvicorn on a local port."""
    with running_server(app) as base, httpx.Client(base_url=base, timeout=60) as http:
        yield http


# -- fixtures -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def photos(luma_rows, data_dir) -> dict[str, Path]:
    """Catalog photos by item id (their main view where there is one)."""
    found = {}
    for row in luma_subset(luma_rows):
        if row["item_id"] not in found or row["view"] == "main":
            found[row["item_id"]] = data_dir / "luma" / row["image"]
    return found


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory, luma_rows, data_dir) -> Path:
    return small_catalog(tmp_path_factory, luma_rows, data_dir)


@pytest.fixture(scope="module")
def client(catalog_dir) -> Iterator[httpx.Client]:
    with serving(create_app(catalog_dir, token=TOKEN)) as http:
        yield http


def search(client, path_or_bytes, name: str = "query.jpg", **form) -> httpx.Response:
    """POST /search; the photo is searched whole unless ``whole`` is given (per-garment
    search has its own tests)."""
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return client.post("/search", files={"image": (name, data)}, data={"whole": "true", **form})


def matches_of(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    return response.json()["garments"][0]["matches"]


def item_count(client) -> int:
    return client.get("/stats").json()["items"]


# -- reads --------------------------------------------------------------------------------
def test_health_and_stats_describe_the_catalog(client, photos):
    assert client.get("/health").json() == {"status": "ready", "ready": True, "detail": None}
    stats = client.get("/stats").json()
    assert stats["items"] == len(photos)
    assert stats["images"] >= stats["items"]
    assert stats["model"] == "vestis-lite0"
    assert stats["index"] == "Flat"
    assert "category" in stats["metadata_fields"] and "path" not in stats


def test_a_catalog_photo_finds_its_own_item_first(client, photos):
    item_id, path = sorted(photos.items())[0]
    body = search(client, path, k=5).json()
    width, height = Image.open(path).size
    assert (body["width"], body["height"]) == (width, height)
    [garment] = body["garments"]
    assert garment["group"] == "whole image"
    assert garment["box"] == [0, 0, width, height]
    top = garment["matches"][0]
    assert top["item_id"] == item_id
    assert top["score"] == pytest.approx(1.0, abs=1e-3)
    assert top["metadata"]["category"] and top["metadata"]["name"]
    assert len({m["item_id"] for m in garment["matches"]}) == len(garment["matches"]) == 5
    image = client.get(top["image_url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert image.content == path.read_bytes()


def test_a_street_photo_is_searched_garment_by_garment_in_compatible_groups(client, data_dir):
    photo = data_dir / "ccp" / "photos" / "0001.jpg"
    response = search(client, photo, k=3, whole="false")
    assert response.status_code == 200, response.text
    garments = response.json()["garments"]
    groups = [g["group"] for g in garments]
    assert len(groups) >= 3 and {"lower", "footwear"} <= set(groups)
    allowed = {"upper": {"upper", "outer", "dress"}, "outer": {"outer", "upper"},
               "lower": {"lower", "dress"}, "dress": {"dress", "upper", "lower"}}
    for garment in garments:
        assert 0 < garment["score"] <= 1
        for match in garment["matches"]:
            assert match["metadata"]["garment"] in allowed.get(garment["group"],
                                                               {garment["group"]})
    lower = search(client, photo, k=3, whole="false", garment="lower").json()["garments"]
    assert lower and {g["group"] for g in lower} == {"lower"}
    bad = search(client, photo, whole="false", garment="socks")
    assert bad.status_code == 422 and "garment" in bad.json()["detail"]


def test_complete_the_look_and_describe_over_http(client, photos):
    from vestis.taxonomy import leaf_key

    item_id, path = sorted(photos.items())[0]
    response = client.post("/complete", files={"image": ("q.jpg", path.read_bytes())},
                           data={"k": "4"})
    assert response.status_code == 200, response.text
    body = response.json()
    own = leaf_key(body["category"])
    assert body["matches"] and len(body["matches"]) <= 4
    assert all(leaf_key(m["metadata"]["category"]) != own for m in body["matches"])
    assert item_id not in {m["item_id"] for m in body["matches"]}
    described = client.post("/describe", files={"image": ("q.jpg", path.read_bytes())})
    assert described.status_code == 200
    assert described.json()["category"]["name"] and described.json()["attributes"]
    bad = client.post("/complete", files={"image": ("q.jpg", b"not an image")})
    assert bad.status_code in (415, 422) and bad.json()["detail"]


def test_a_photo_too_small_to_describe_is_refused_not_described(client):
    tiny = io.BytesIO()
    Image.new("RGB", (1, 1), (90, 90, 90)).save(tiny, "PNG")
    response = client.post("/describe", files={"image": ("dot.png", tiny.getvalue())})
    assert response.status_code == 422, response.text
    assert response.json()["detail"] == ("dot.png: 1x1 pixels is too small to describe (at "
                                         "least 32x32 is needed)")


def test_search_by_words_and_by_photo_changed_by_words(client, photos):
    item_id, path = sorted(photos.items())[0]
    meta = client.get(f"/items/{item_id}").json()["metadata"]
    words = f"{meta['colour']} {meta['name']}"
    response = client.post("/search/text", data={"text": words, "k": "3"})
    assert response.status_code == 200, response.text
    assert response.json()["matches"][0]["item_id"] == item_id
    bm25 = client.post("/search/text", data={"text": words, "mode": "bm25"}).json()
    assert bm25["matches"][0]["item_id"] == item_id
    changed = search(client, path, k=3, text="in red")
    assert changed.status_code == 200, changed.text
    [garment] = changed.json()["garments"]
    assert garment["group"] == "whole image" and garment["matches"]
    for bad in ({"text": "   "}, {"text": "x", "mode": "fuzzy"}):
        refused = client.post("/search/text", data=bad)
        assert refused.status_code == 422 and refused.json()["detail"]


def test_a_video_is_searched_track_by_track_over_http(client, photos, tmp_path):
    from vestis.video.synth import make_clip

    item_id, path = sorted(photos.items())[0]
    clip = make_clip([path], tmp_path / "clip.mp4", seconds=4, size=(240, 320), motion="pan")
    response = client.post("/search/video", files={"video": ("clip.mp4", clip.read_bytes())},
                           data={"k": "3", "fusion": "mean"})
    assert response.status_code == 200, response.text
    tracks = response.json()["tracks"]
    assert tracks and item_id in {t["matches"][0]["item_id"] for t in tracks}
    assert all(t["thumbnail"].startswith("data:image/jpeg;base64,") for t in tracks)
    import tempfile

    for body in (b"\x00" * 100, clip.read_bytes()[: clip.stat().st_size // 3]):
        bad = client.post("/search/video", files={"video": ("dir/clip.mp4", body)})
        detail = bad.json()["detail"]
        assert bad.status_code == 422 and detail.startswith("clip.mp4: "), detail
        assert tempfile.gettempdir() not in detail and ".mp4:" not in detail[9:], detail
    unknown = client.post("/search/video", files={"video": ("clip.mp4", clip.read_bytes())},
                          data={"fusion": "median"})
    assert unknown.status_code == 422 and "fusion" in unknown.json()["detail"]


def test_filters_keep_only_matching_items(client, photos):
    path = sorted(photos.values())[0]
    categories = client.get("/facets").json()["category"]["values"]
    assert len(categories) == N_CATEGORIES
    wanted = categories[-1]
    found = matches_of(search(client, path, k=10, where=f"category={wanted}"))
    assert found and all(m["metadata"]["category"] == wanted for m in found)
    both = search(client, path, k=10, where=[f"category={wanted}", "colour=no-such-colour"])
    assert matches_of(both) == []


def test_a_photo_cropped_at_ingest_is_served_as_the_file_it_was(tmp_path, luma_subset_csv):
    """The garment box the parser found at ingest is not part of the stored content hash
    (the file as given is): the file is unchanged, so it is served."""
    with Catalog(tmp_path / "catalog", model="lite0") as catalog:
        catalog.add(luma_subset_csv, crop="garment")
        row = next(image for item_id in catalog.item_ids()
                   for image in catalog.get(item_id).images if image.box is not None)
    with serving(create_app(tmp_path / "catalog", token=TOKEN)) as client:
        response = client.get(f"/images/{row.image_id}")
        assert response.status_code == 200
        assert response.content == Path(row.path).read_bytes()


def test_item_and_image_lookups(client, photos):
    item_id = sorted(photos)[0]
    item = client.get(f"/items/{item_id}").json()
    assert item["item_id"] == item_id and item["images"]
    assert all(client.get(image["url"]).status_code == 200 for image in item["images"])
    assert client.get("/items/no-such-item").status_code == 404
    assert client.get("/images/99999999").status_code == 404
    # Images are addressed by id only: a path is not an id.
    assert client.get("/images/..%2F..%2Fetc%2Fpasswd").status_code in (404, 422)
    assert client.get("/images/etc/passwd").status_code == 404


def test_bad_search_parameters_get_a_one_line_reason(client, photos):
    path = sorted(photos.values())[0]
    response = search(client, path, k=0)
    assert response.status_code == 422
    assert isinstance(response.json()["detail"], str) and "k" in response.json()["detail"]
    assert search(client, path, where="no-equals-sign").status_code == 422
    missing = client.post("/search", data={"k": 3})
    assert missing.status_code == 422 and "image" in missing.json()["detail"]


# -- malformed uploads --------------------------------------------------------------------
def _png_of_size(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def _malformed(kind: str, photo: Path) -> tuple[str, bytes]:
    if kind == "truncated jpeg":
        data = photo.read_bytes()
        return "truncated.jpg", data[: len(data) // 2]
    if kind == "zero bytes":
        return "empty.jpg", b""
    if kind == "text file":
        return "notes.txt", b"this is not a photo\n" * 50
    if kind == "30 MB file":
        return "huge.jpg", os.urandom(30 * 2**20)
    return "bomb.png", _png_of_size(20000, 20000)


@pytest.mark.parametrize(
    ("kind", "status", "words"),
    [
        ("truncated jpeg", 422, "truncated"),
        ("zero bytes", 422, "empty"),
        ("text file", 415, "not an image"),
        ("30 MB file", 413, "too large"),
        ("20000x20000 png", 422, "decompression bomb"),
    ],
)
def test_malformed_uploads_are_refused_and_the_server_keeps_serving(
    client, photos, kind, status, words
):
    photo = sorted(photos.values())[0]
    name, data = _malformed(kind, photo)
    response = search(client, data, name=name)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert words in detail and "\n" not in detail
    assert matches_of(search(client, photo, k=1))


def test_a_chunked_upload_over_the_limit_is_refused(catalog_dir, photos):
    photo = sorted(photos.values())[0].read_bytes()
    boundary = "vestis-test-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()

    def body():  # a generator: no Content-Length, so the server must count
        yield head
        for _ in range(3):
            yield photo * 4
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    app = create_app(catalog_dir, max_upload_mb=len(photo) * 8 / 2**20)
    with serving(app) as small_limit:
        response = small_limit.post("/search", content=body(), headers=headers)
        assert response.status_code == 413, response.text
        assert "too large" in response.json()["detail"]
        assert matches_of(search(small_limit, photo, k=1))


# -- writes -------------------------------------------------------------------------------
def test_writes_need_the_token(client, photos):
    item_id = sorted(photos)[0]
    photo = ("a.jpg", photos[item_id].read_bytes())
    for headers, status in [({}, 401), ({"Authorization": "Bearer wrong-token"}, 403)]:
        assert client.post("/items", files={"images": photo}, headers=headers).status_code == (
            status
        )
        patch = client.patch(f"/items/{item_id}", json={"metadata": {"x": "1"}}, headers=headers)
        assert patch.status_code == status
        assert client.delete(f"/items/{item_id}", headers=headers).status_code == status
    assert client.get(f"/items/{item_id}").json()["metadata"].get("x") is None


def test_without_a_token_file_writes_are_disabled(catalog_dir, photos):
    with serving(create_app(catalog_dir)) as no_token:
        item_id = sorted(photos)[0]
        response = no_token.delete(f"/items/{item_id}", headers=AUTH)
        assert response.status_code == 403 and "--token-file" in response.json()["detail"]


def test_a_private_server_needs_the_token_for_reads(catalog_dir, photos):
    with serving(create_app(catalog_dir, token=TOKEN, private=True)) as private:
        photo = sorted(photos.values())[0]
        assert search(private, photo).status_code == 401
        assert private.get("/stats").status_code == 401
        assert private.get("/images/1").status_code == 401
        found = private.post(
            "/search", files={"image": ("q.jpg", photo.read_bytes())}, headers=AUTH
        )
        assert matches_of(found)


def test_add_update_delete_an_item(client, photos, catalog_dir):
    item_id, photo = sorted(photos.items())[1]
    other = next(p for i, p in sorted(photos.items()) if i != item_id)
    before = item_count(client)
    files = [
        ("images", ("front.jpg", photo.read_bytes())),
        ("images", ("x.jpg", other.read_bytes())),
    ]
    metadata = '{"name": "Uploaded jacket", "category": "Uploads", "price": 42}'
    created = client.post(
        "/items", files=files, data={"item_id": "new-item", "metadata": metadata}, headers=AUTH
    )
    assert created.status_code == 201, created.text
    assert len(created.json()["images"]) == 2
    assert created.json()["metadata"] == {
        "name": "Uploaded jacket",
        "category": "Uploads",
        "price": 42,
    }
    assert item_count(client) == before + 1
    found = matches_of(search(client, photo, k=3, where="category=Uploads"))
    assert found[0]["item_id"] == "new-item"
    assert client.get(found[0]["image_url"]).content in (photo.read_bytes(), other.read_bytes())

    again = client.post("/items", files=files, data={"item_id": "new-item"}, headers=AUTH)
    assert again.status_code == 409

    patched = client.patch(
        "/items/new-item", json={"metadata": {"category": "Sale", "price": None}}, headers=AUTH
    )
    assert patched.status_code == 200
    assert patched.json()["metadata"] == {"name": "Uploaded jacket", "category": "Sale"}
    assert matches_of(search(client, photo, k=3, where="category=Sale"))[0]["item_id"] == "new-item"
    assert matches_of(search(client, photo, k=3, where="category=Uploads")) == []

    deleted = client.delete("/items/new-item", headers=AUTH)
    assert deleted.json() == {"item_id": "new-item", "removed_images": 2}
    assert all(m["item_id"] != "new-item" for m in matches_of(search(client, photo, k=50)))
    assert client.get("/items/new-item").status_code == 404
    assert client.delete("/items/new-item", headers=AUTH).status_code == 404
    assert client.patch("/items/new-item", json={"metadata": {}}, headers=AUTH).status_code == 404
    assert item_count(client) == before
    assert not list((catalog_dir / "uploads").iterdir())


@pytest.mark.parametrize(
    ("form", "bad_file", "status"),
    [
        ({"item_id": "half-good"}, ("broken.jpg", b"\xff\xd8\xff\xe0 not really"), 422),
        ({"item_id": "half-good"}, ("notes.txt", b"plain text"), 415),
        ({"item_id": "bad id/with slash"}, None, 422),
        ({"item_id": "bad-metadata", "metadata": "[1, 2]"}, None, 422),
        ({"item_id": "bad-metadata", "metadata": '{"a": {"nested": 1}}'}, None, 422),
        ({"item_id": "bad-metadata", "metadata": '{"item_id": "x"}'}, None, 422),
        ({"item_id": "bad-json", "metadata": "{oops"}, None, 422),
    ],
)
def test_a_failed_write_leaves_the_catalog_unchanged(
    client, photos, catalog_dir, form, bad_file, status
):
    before = client.get("/stats").json()
    files = [("images", ("good.jpg", sorted(photos.values())[2].read_bytes()))]
    if bad_file:
        files.append(("images", bad_file))
    response = client.post("/items", files=files, data=form, headers=AUTH)
    assert response.status_code == status, response.text
    assert "\n" not in response.json()["detail"]
    assert client.get("/stats").json() == before
    assert client.get(f"/items/{form['item_id']}").status_code in (404, 422)
    uploads = catalog_dir / "uploads"
    assert not uploads.exists() or not list(uploads.iterdir())


def test_patch_validates_metadata(client, photos):
    item_id = sorted(photos)[0]
    bad = client.patch(f"/items/{item_id}", json={"metadata": {"x": [1, 2]}}, headers=AUTH)
    assert bad.status_code == 422 and isinstance(bad.json()["detail"], str)


# -- serving concurrently -----------------------------------------------------------------
def test_searches_run_while_items_are_added_and_deleted(catalog_dir, photos):
    """Real HTTP: 4 search clients and 1 writer at once, and not one error."""
    paths = sorted(photos.values())
    errors: list[str] = []
    with running_server(create_app(catalog_dir, token=TOKEN)) as base:
        stop = threading.Event()

        def writer() -> int:
            rounds = 0
            with httpx.Client(base_url=base, headers=AUTH, timeout=60) as http:
                while not stop.is_set():
                    item = f"churn-{rounds}"
                    files = {"images": ("p.jpg", paths[rounds % len(paths)].read_bytes())}
                    added = http.post("/items", files=files, data={"item_id": item})
                    removed = http.delete(f"/items/{item}")
                    for response in (added, removed):
                        if response.status_code >= 400:
                            errors.append(f"write {response.status_code}: {response.text}")
                    rounds += 1
            return rounds

        def searcher(worker: int) -> None:
            with httpx.Client(base_url=base, timeout=60) as http:
                for n in range(6):
                    photo = paths[(worker + n) % len(paths)]
                    response = search(http, photo, k=5)
                    if response.status_code != 200:
                        errors.append(f"search {response.status_code}: {response.text}")

        with ThreadPoolExecutor(5) as pool:
            writes = pool.submit(writer)
            list(pool.map(searcher, range(4)))
            stop.set()
            assert writes.result() >= 1
        with httpx.Client(base_url=base) as http:
            assert http.get("/stats").json()["items"] == len(photos)
    assert errors == []


# -- docs and the command line --------------------------------------------------------------
def test_openapi_docs_are_served_without_a_cdn(client):
    schema = client.get("/openapi.json").json()
    for path in ["/search", "/items", "/items/{item_id}", "/images/{image_id}", "/health"]:
        assert path in schema["paths"]
    assert client.get("/redoc").status_code == 200
    docs = client.get("/docs")
    assert docs.status_code == 200 and "cdn" not in docs.text.lower()
    asset = docs.text.split('src="')[1].split('"')[0]
    assert client.get(asset).status_code == 200


def test_the_page_loads_nothing_from_elsewhere(client):
    page = client.get("/")
    assert page.status_code == 200
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ["/static/app.js", "/static/style.css"]:
        text = client.get(asset).text
        assert "http://" not in text and "https://" not in text
    assert "https://" not in page.text and "http://" not in page.text


def test_vestis_serve_command(catalog_dir, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    command = [sys.executable, "-m", "vestis.cli", "serve", "--catalog", str(catalog_dir)]
    command += ["--port", str(port), "--token-file", str(token_file)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            deadline = time.monotonic() + 90
            while True:
                assert process.poll() is None, process.stderr.read()
                assert time.monotonic() < deadline, "vestis serve did not become ready"
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            assert http.get("/stats").json()["items"] > 0
            assert http.delete("/items/whatever").status_code == 401
    finally:
        process.terminate()
        process.wait(30)


def test_vestis_serve_refuses_a_missing_catalog_or_a_weak_token(tmp_path):
    from typer.testing import CliRunner

    from vestis.cli import app

    result = CliRunner().invoke(app, ["serve", "--catalog", str(tmp_path / "none")])
    assert result.exit_code == 2 and "not a vestis catalog" in result.output
    weak = tmp_path / "token"
    weak.write_text("short")
    result = CliRunner().invoke(
        app, ["serve", "--catalog", str(tmp_path), "--token-file", str(weak)]
    )
    assert result.exit_code == 2 and "at least" in result.output


def vestis_cli(*args) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "vestis.cli", *map(str, args)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def test_the_server_sees_cli_writes_and_its_own_writes_keep_them(
        tmp_path_factory, luma_rows, data_dir, photos, tmp_path):
    """vestis serve running; vestis remove and vestis index from another process; then a
    write through the server: searches, /stats and the saved index all keep every change."""
    catalog = small_catalog(tmp_path_factory, luma_rows, data_dir)
    gone, kept = sorted(photos)[0], sorted(photos)[1]
    new = tmp_path / "cli-new.png"
    Image.effect_mandelbrot((160, 200), (-2.0, -1.2, 0.8, 1.2), 40).convert("RGB").save(new)
    with serving(create_app(catalog, token=TOKEN)) as client:
        before = client.get("/stats").json()
        vestis_cli("remove", gone, "--catalog", catalog)
        vestis_cli("index", new, "--catalog", catalog)
        stats = client.get("/stats").json()
        assert stats["items"] == before["items"] and stats["images"] == stats["indexed_vectors"]
        assert matches_of(search(client, new.read_bytes(), k=1))[0]["item_id"] == "cli-new"
        assert gone not in [m["item_id"] for m in matches_of(search(client, photos[gone], k=50))]
        files = {"images": ("p.jpg", photos[kept].read_bytes())}
        added = client.post("/items", files=files, data={"item_id": "via-http"}, headers=AUTH)
        assert added.status_code == 201, added.text
    info = json.loads(vestis_cli("info", "--catalog", catalog, "--json").stdout)
    assert info["index_in_sync"] and info["images"] == info["indexed_vectors"]
    with Catalog(catalog) as reopened:
        assert reopened.search(new, k=1)[0].item_id == "cli-new"
        assert reopened.search(photos[kept], k=1)[0].item_id in (kept, "via-http")


def png_with_script(path: Path, colour: tuple[int, int, int]) -> Path:
    """A valid PNG, whatever its name says, with a script in a text chunk."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Comment", "<html><script>alert(document.cookie)</script></html>")
    image = Image.new("RGB", (96, 128), colour)
    image.paste((255 - colour[0], 40, 90), (20, 30, 70, 100))
    image.save(path, format="PNG", pnginfo=info)
    return path


def image_url(client, item_id: str) -> str:
    return client.get(f"/items/{item_id}").json()["images"][0]["url"]


def test_catalog_images_are_served_as_the_image_type_they_decode_to(
        tmp_path_factory, luma_rows, data_dir, tmp_path):
    catalog = small_catalog(tmp_path_factory, luma_rows, data_dir)
    evil = png_with_script(tmp_path / "evil.html", (200, 30, 30))
    vector = png_with_script(tmp_path / "logo.svg", (30, 200, 30))
    with Catalog(catalog) as cat:
        assert cat.add([evil, vector]).added == 2
    with serving(create_app(catalog)) as client:
        for item in ("evil", "logo"):
            response = client.get(image_url(client, item))
            assert response.status_code == 200
            assert response.headers["content-type"] == "image/png"
            assert response.headers["x-content-type-options"] == "nosniff"
            assert "sandbox" in response.headers["content-security-policy"]
            assert response.content == (tmp_path / ("evil.html" if item == "evil"
                                                    else "logo.svg")).read_bytes()
        assert client.get("/images/99999999999999999999999").status_code == 404


def test_a_catalog_file_swapped_after_indexing_is_not_served(
        tmp_path_factory, luma_rows, data_dir, photos, tmp_path):
    catalog = small_catalog(tmp_path_factory, luma_rows, data_dir)
    indexed = tmp_path / "shirt.jpg"
    indexed.write_bytes(sorted(photos.values())[0].read_bytes())
    with Catalog(catalog) as cat:
        assert cat.add([indexed]).added == 1
    with serving(create_app(catalog, token=TOKEN)) as client:
        files = {"images": ("up.jpg", sorted(photos.values())[1].read_bytes())}
        added = client.post("/items", files=files, data={"item_id": "uploaded"}, headers=AUTH)
        assert added.status_code == 201, added.text
        uploaded = next((catalog / "uploads").iterdir())
        urls = {"shirt": image_url(client, "shirt"), "uploaded": image_url(client, "uploaded")}
        assert all(client.get(url).status_code == 200 for url in urls.values())
        for path in (indexed, uploaded):
            path.unlink()
            path.symlink_to("/etc/passwd")
        for url in urls.values():
            response = client.get(url)
            assert response.status_code == 404 and "root:" not in response.text
        indexed.unlink()
        indexed.write_bytes(sorted(photos.values())[2].read_bytes())  # another valid photo
        assert client.get(urls["shirt"]).status_code == 404


def test_uploads_are_stored_relative_to_the_catalog(
        tmp_path_factory, luma_rows, data_dir, photos, tmp_path, monkeypatch):
    catalog = small_catalog(tmp_path_factory, luma_rows, data_dir)
    monkeypatch.chdir(catalog.parent)
    files = {"images": ("up.jpg", sorted(photos.values())[0].read_bytes())}
    with serving(create_app(Path(catalog.name), token=TOKEN)) as client:
        added = client.post("/items", files=files, data={"item_id": "moved"}, headers=AUTH)
        assert added.status_code == 201, added.text
    monkeypatch.chdir(tmp_path)  # the server restarts from another directory
    with serving(create_app(catalog, token=TOKEN)) as client:
        assert client.get(image_url(client, "moved")).status_code == 200
        assert client.delete("/items/moved", headers=AUTH).status_code == 200
    assert not list((catalog / "uploads").iterdir())


def serve_banner(catalog: Path, *args: str) -> str:
    """What vestis serve prints before it starts loading the model."""
    command = [sys.executable, "-m", "vestis.cli", "serve", "--catalog", str(catalog),
               "--port", str(free_port()), *args]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in process.stderr:
            lines.append(line)
            if "loading the model" in line:
                break
    finally:
        process.terminate()
        process.wait(30)
    return "".join(lines)


def test_vestis_serve_warns_when_open_reads_listen_beyond_loopback(catalog_dir):
    assert "warning: 0.0.0.0 is not a loopback address" in serve_banner(
        catalog_dir, "--host", "0.0.0.0")
    assert "warning" not in serve_banner(catalog_dir, "--host", "127.0.0.1")


def test_a_missing_catalog_image_does_not_break_complete_the_look(
        tmp_path_factory, luma_rows, data_dir, photos, tmp_path):
    """One indexed file deleted: /complete still answers (the image is skipped), and the
    client's valid upload is never blamed."""
    catalog = small_catalog(tmp_path_factory, luma_rows, data_dir)
    gone = tmp_path / "gone.jpg"
    gone.write_bytes(sorted(photos.values())[3].read_bytes())
    with Catalog(catalog) as cat:
        assert cat.add([gone]).added == 1
    gone.unlink()
    query = sorted(photos.values())[0].read_bytes()
    with serving(create_app(catalog)) as client:
        for _ in range(2):  # and again, with the features of the others cached
            response = client.post("/complete", files={"image": ("q.jpg", query)},
                                   data={"k": "50", "same_category": "true"})
            assert response.status_code == 200, response.text
            found = {m["item_id"] for m in response.json()["matches"]}
            assert found and "gone" not in found


def test_facets_follow_metadata_changed_by_another_process(tmp_path_factory, luma_rows,
                                                           data_dir, photos):
    catalog = small_catalog(tmp_path_factory, luma_rows, data_dir)
    with serving(create_app(catalog)) as client:
        assert "season" not in client.get("/facets").json()
        vestis_cli("update", sorted(photos)[0], "--catalog", catalog, "--set", "season=winter")
        assert client.get("/facets").json()["season"]["values"] == ["winter"]


def test_text_search_follows_metadata_changed_by_patch_and_by_another_process(
        tmp_path_factory, luma_rows, data_dir, photos):
    """A ``PATCH`` and a ``vestis update`` are each searched by the next text query."""
    catalog = small_catalog(tmp_path_factory, luma_rows, data_dir)
    first, second = sorted(photos)[:2]

    def bm25(words: str) -> list[str]:
        response = client.post("/search/text", data={"text": words, "mode": "bm25"})
        assert response.status_code == 200, response.text
        return [m["item_id"] for m in response.json()["matches"]]

    with serving(create_app(catalog, token=TOKEN)) as client:
        assert bm25("vermilion") == []
        patched = client.patch(f"/items/{first}", json={"metadata": {"colour": "vermilion"}},
                               headers=AUTH)
        assert patched.status_code == 200, patched.text
        assert bm25("vermilion") == [first]
        vestis_cli("update", second, "--catalog", catalog, "--set", "colour=cerulean")
        assert bm25("cerulean") == [second]


# -- memory: the server's pixel cap, working size and bounded pool (issue item 3) ---------
def test_a_big_photo_is_searched_at_working_size_and_boxes_come_back_in_its_pixels(
        client, data_dir):
    """An 8x upscaled street photo (2704 x 4096) is decoded at the working size; its
    garments and boxes are those of the original photo, in the big photo's pixels."""
    photo = data_dir / "ccp" / "photos" / "0001.jpg"
    small = search(client, photo, k=1, whole="false").json()
    original = Image.open(photo)
    buffer = io.BytesIO()
    original.resize((original.width * 8, original.height * 8), Image.BICUBIC).save(
        buffer, "JPEG", quality=92)
    response = search(client, buffer.getvalue(), k=1, whole="false")
    assert response.status_code == 200, response.text
    big = response.json()
    assert (big["width"], big["height"]) == (original.width * 8, original.height * 8)
    small_boxes = {g["group"]: g["box"] for g in small["garments"]}
    big_boxes = {g["group"]: g["box"] for g in big["garments"]}
    assert set(small_boxes) == set(big_boxes)
    for group, box in big_boxes.items():
        assert 0 <= box[0] < box[2] <= big["width"] and 0 <= box[1] < box[3] <= big["height"]
        expected = [8 * v for v in small_boxes[group]]
        assert max(abs(a - b) for a, b in zip(box, expected, strict=True)) <= 0.04 * big["height"]


def test_a_photo_over_the_server_pixel_cap_is_refused_from_its_header(client, photos):
    """6000 x 6000 (36 Mpx) is under the command line's cap, over the server's 2**25."""
    buffer = io.BytesIO()
    Image.new("L", (6000, 6000), 128).save(buffer, "PNG")
    for response in (search(client, buffer.getvalue(), name="huge.png"),
                     client.post("/items", headers=AUTH, data={"item_id": "huge"},
                                 files={"images": ("huge.png", buffer.getvalue())})):
        assert response.status_code == 422, response.text
        assert response.json()["detail"] == (
            "huge.png: refused as a decompression bomb (6000x6000 pixels, limit 33554432)")
    assert client.get("/items/huge").status_code == 404


def test_a_full_inference_pool_answers_503_with_retry_after(catalog_dir, photos):
    """workers=1, queue=1: with the worker taken, one request waits and is served once it
    is free; the next is refused at once with 503 and Retry-After, and so is a write."""
    photo = sorted(photos.values())[0]
    app = create_app(catalog_dir, token=TOKEN, workers=1, queue=1)
    pool = app.state.service.pool
    gate = threading.Event()
    with serving(app) as client, ThreadPoolExecutor(2) as background:
        holder = background.submit(pool.run, gate.wait)  # takes the only worker
        queued = background.submit(search, client, photo, k=1)
        deadline = time.monotonic() + 30
        while pool.places_left > 0:  # the search has taken the one queue place
            assert time.monotonic() < deadline and not queued.done()
            time.sleep(0.02)
        started = time.monotonic()
        for response in (search(client, photo, k=1),
                         client.post("/describe", files={"image": ("q.jpg", b"x")}),
                         client.post("/items", headers=AUTH, data={"item_id": "busy"},
                                     files={"images": ("q.jpg", photo.read_bytes())})):
            assert response.status_code == 503, response.text
            assert response.headers["Retry-After"] == "2"
            assert "busy" in response.json()["detail"]
        assert time.monotonic() - started < 5  # refused at once, not after a wait
        assert not queued.done()
        gate.set()
        assert holder.result(10) is True
        assert matches_of(queued.result(60))
        assert matches_of(search(client, photo, k=1))
        assert client.get("/items/busy").status_code == 404


def test_a_milvus_lite_catalog_is_served_searched_and_written(tmp_path, tmp_path_factory,
                                                              luma_rows, data_dir, photos):
    """The server on a ``milvus-lite:`` catalog: the same searches as on a directory, and
    uploads (kept beside the Lite file, in ``NAME.db.files/uploads``) added, patched and
    deleted."""
    pytest.importorskip("milvus_lite")
    uri = f"milvus-lite:{tmp_path / 'shop.db'}"
    with Catalog(small_catalog(tmp_path_factory, luma_rows, data_dir)) as local, \
            Catalog(uri, model=local.model_name) as milvus:
        for item_id in local.item_ids():
            item = local.get(item_id)
            milvus.add_vectors([item_id] * len(item.images),
                               local._store.vectors_by_id([i.image_id for i in item.images]),
                               model_id=local.model_id, paths=[i.path for i in item.images],
                               metadata=[{**item.metadata, **i.metadata} for i in item.images],
                               boxes=[i.box for i in item.images],
                               hashes=[i.sha256 for i in item.images])
    item_id, photo = sorted(photos.items())[0]
    with serving(create_app(uri, token=TOKEN)) as client:
        assert client.get("/stats").json()["items"] == len(photos)
        found = matches_of(search(client, photo, k=3))
        assert found[0]["item_id"] == item_id
        assert client.get(found[0]["image_url"]).content == photo.read_bytes()
        created = client.post("/items", files=[("images", ("a.jpg", photo.read_bytes()))],
                              data={"item_id": "new-item", "metadata": '{"category": "Up"}'},
                              headers=AUTH)
        assert created.status_code == 201, created.text
        uploads = tmp_path / "shop.db.files" / "uploads"
        assert len(list(uploads.iterdir())) == 1
        assert matches_of(search(client, photo, k=3, where="category=Up"))[0]["item_id"] == \
            "new-item"
        image_url = matches_of(search(client, photo, k=3, where="category=Up"))[0]["image_url"]
        assert client.get(image_url).content == photo.read_bytes()
        assert client.patch("/items/new-item", json={"metadata": {"category": "Sale"}},
                            headers=AUTH).status_code == 200
        assert matches_of(search(client, photo, k=3, where="category=Up")) == []
        assert client.delete("/items/new-item", headers=AUTH).json()["removed_images"] == 1
        assert not list(uploads.iterdir())

