"""Reliability soak: kill -9 at random points of index/remove/reindex, a fuzzed image corpus
through index, search and POST /search, server and CLI writers on one catalog, racing
creators, and HTTP abuse, each followed by an id-level consistency check.

    python bench/bench_reliability.py [--kills 30] [--seed 0] [--fuzz-seed 0]

The consistency check (:func:`check_catalog`): the index holds exactly the store's image
ids, every stored image is found first by a search with its own file, no file is stored
twice, and nothing is stored that the sources did not name. After the kill loop the
commands are run to completion and the catalog must hold every source image exactly once.
Only 127.0.0.1 is used; every phase is bounded in count and time. tests/test_reliability.py
runs the same functions with a few kills and a smaller corpus.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SRC = Path(__file__).resolve().parents[1] / "src"


# -- sources and the CLI ---------------------------------------------------------------------
def luma_source(out: Path, rows: slice, data: Path = DATA) -> Path:
    """A Luma CSV of ``rows`` (absolute image paths)."""
    with open(data / "luma" / "catalog.csv", newline="") as handle:
        chosen = list(csv.DictReader(handle))[rows]
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(chosen[0]))
        writer.writeheader()
        for row in chosen:
            writer.writerow({**row, "image": str(data / "luma" / row["image"])})
    return out


def source_rows(source: Path) -> list[dict[str, str]]:
    with open(source, newline="") as handle:
        return list(csv.DictReader(handle))


def cli_command(*args) -> list[str]:
    return [sys.executable, "-m", "vestis.cli", *map(str, args)]


def cli_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{path}" if path else str(SRC)}


def run_cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(*args), env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)


# -- the consistency check -------------------------------------------------------------------
def stored_rows(catalog: Path) -> list[tuple[int, str, str]]:
    """(image_id, item_id, path) of every stored image, read straight from SQLite."""
    with sqlite3.connect(f"file:{catalog / 'catalog.db'}?mode=ro", uri=True, timeout=30) as db:
        return list(db.execute("SELECT image_id, item_id, path FROM images ORDER BY image_id"))


def stored_view(cat, row) -> np.ndarray:
    """The photo of a stored image embedded as ingest embedded it, as a (1, dim) query."""
    from vestis.catalog.reembed import embed_as_stored

    vectors, errors = embed_as_stored(cat.encoder, cat.encoder, [row], [cat.file_of(row)])
    assert not errors, errors
    return vectors


def check_catalog(catalog: Path, allowed: set[str]) -> int:
    """Assert the id-level invariants (module docstring); returns the images checked."""
    from vestis.catalog import Catalog

    rows = stored_rows(catalog)
    paths = [path for _, _, path in rows]
    assert len(paths) == len(set(paths)), f"a file is stored twice: {sorted(paths)}"
    extra = set(paths) - allowed
    assert not extra, f"stored but never named by a source: {sorted(extra)[:5]}"
    with Catalog(catalog) as cat:
        info = cat.info()
        assert info["index_in_sync"], f"index ids differ from the store's: {info}"
        assert info["images"] == len(rows) == info["indexed_vectors"], info
        for image_id, item_id, path in rows:  # ties (same pixels) may put another first
            found = cat.search_vectors(stored_view(cat, cat.image(image_id)),
                                       k=min(len(rows), 100))[0]
            best = {m.item_id for m in found if m.score > 0.999}
            assert item_id in best, f"image {image_id} ({path}) is not found by its photo"
    return len(rows)


# -- kill -9 at random points -----------------------------------------------------------------
@dataclass
class KillReport:
    runs: int = 0
    killed: int = 0
    finished: int = 0
    checks: int = 0
    images_checked: int = 0
    operations: dict[str, int] = field(default_factory=dict)


def kill_loop(catalog: Path, source: Path, kills: int, seed: int = 0,
              max_wait: float = 6.0, operations: tuple[str, ...] = ("index", "index", "remove",
                                                                 "reindex"),
              mid_batch: float = 0.5) -> KillReport:
    """Run ``operations`` (index / remove / reindex commands, drawn at random) on
    ``catalog`` and SIGKILL each at a random moment (0.5 s to ``max_wait`` after its start;
    an index, with probability ``mid_batch``, just after it stored a batch) until ``kills``
    were killed; check the catalog after every run. Finally index ``source`` to
    completion: every image must then be stored exactly once."""
    rng = random.Random(seed)
    rows = source_rows(source)
    allowed = {row["image"] for row in rows}
    items = sorted({row["item_id"] for row in rows})
    report = KillReport()
    while report.killed < kills:
        operation = rng.choice(operations)
        if operation == "index":
            args = ["index", source, "--catalog", catalog, "--batch-size", "4"]
        elif operation == "remove":
            args = ["remove", rng.choice(items), "--catalog", catalog]
        else:
            args = ["reindex", "--catalog", catalog]
        if not (catalog / "catalog.db").exists() and operation != "index":
            continue
        report.operations[operation] = report.operations.get(operation, 0) + 1
        report.runs += 1
        if _run_and_kill(args, catalog, rng, max_wait,
                         mid_batch=operation == "index" and rng.random() < mid_batch):
            report.killed += 1
        else:
            report.finished += 1
        if (catalog / "catalog.db").exists():
            report.images_checked += check_catalog(catalog, allowed)
            report.checks += 1
    done = run_cli("index", source, "--catalog", catalog)
    assert done.returncode == 0, done.stderr[-2000:]
    final = stored_rows(catalog)
    assert sorted(path for _, _, path in final) == sorted(allowed), "images lost or extra"
    report.images_checked += check_catalog(catalog, allowed)
    report.checks += 1
    return report


def _run_and_kill(args: list, catalog: Path, rng: random.Random, max_wait: float,
                  mid_batch: bool) -> bool:
    """Start the command and SIGKILL it at a random moment; whether it was killed."""
    before = len(stored_rows(catalog)) if (catalog / "catalog.db").exists() else 0
    wait_for_batch = mid_batch
    deadline = time.monotonic() + rng.uniform(0.5, max_wait)
    process = subprocess.Popen(cli_command(*args), env=cli_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        while process.poll() is None:
            if wait_for_batch and _stored(catalog) > before:
                time.sleep(rng.uniform(0.0, 0.3))  # somewhere inside the next batch
                break
            if not wait_for_batch and time.monotonic() >= deadline:
                break
            if time.monotonic() >= deadline + 60:
                break
            time.sleep(0.01)
    finally:
        killed = process.poll() is None
        if killed:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()
    return killed


def _stored(catalog: Path) -> int:
    try:
        return len(stored_rows(catalog))
    except sqlite3.Error:
        return 0


# -- the image fuzz corpus --------------------------------------------------------------------
def fuzz_corpus(folder: Path, photo: Path, seed: int = 0, flips: int = 8) -> list[Path]:
    """Files made from ``photo``: odd modes and formats that must decode, truncations and
    bit flips that must fail cleanly or decode, and headers claiming huge sizes."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    base = Image.open(photo).convert("RGB")
    base.thumbnail((96, 96))
    files: dict[str, bytes] = {}
    for mode, fmt in [("L", "PNG"), ("1", "PNG"), ("LA", "PNG"), ("RGBA", "PNG"),
                      ("P", "GIF"), ("CMYK", "JPEG"), ("RGB", "WEBP"), ("RGBA", "WEBP"),
                      ("RGB", "BMP"), ("RGB", "TIFF"), ("I;16", "PNG"), ("F", "TIFF")]:
        image = base.convert("L").convert(mode) if mode in ("I;16", "F") else base.convert(mode)
        files[f"mode-{mode.replace(';', '')}.{fmt.lower()}"] = _encode(image, fmt)
    files["strip-1x2000.png"] = _encode(Image.new("RGB", (1, 2000), (9, 90, 200)), "PNG")
    files["dot-1x1.jpg"] = _encode(Image.new("RGB", (1, 1), (200, 9, 9)), "JPEG")
    transparent = Image.new("RGBA", base.size, (0, 0, 0, 0))
    files["transparent.png"] = _encode(transparent, "PNG")
    frames = [base, base.rotate(90), base.rotate(180)]
    animated = io.BytesIO()
    frames[0].save(animated, "GIF", save_all=True, append_images=frames[1:])
    files["animated.gif"] = animated.getvalue()
    files["huge-header-100000.png"] = _png_claiming(100_000, 100_000)
    files["huge-header-11000.png"] = _png_claiming(11_000, 11_000)
    files["empty.jpg"] = b""
    files["text.jpg"] = b"this is not a photo\n" * 10
    jpeg = _encode(base, "JPEG")
    for cut in (2, 100, len(jpeg) // 2, len(jpeg) - 2):
        files[f"truncated-{cut}.jpg"] = jpeg[:cut]
    png = _encode(base, "PNG")
    files["truncated.png"] = png[: len(png) * 2 // 3]
    for n in range(flips):
        source = jpeg if n % 2 == 0 else png
        data = bytearray(source)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        files[f"flipped-{n}.{'jpg' if n % 2 == 0 else 'png'}"] = bytes(data)
    paths = []
    for name, data in files.items():
        (folder / name).write_bytes(data)
        paths.append(folder / name)
    return paths


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose header claims ``width`` x ``height`` (CRC fixed up)."""
    import struct
    import zlib

    data = bytearray(_encode(Image.new("L", (8, 8)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@dataclass
class FuzzReport:
    files: int = 0
    indexed: int = 0
    refused: int = 0
    searched: int = 0
    search_refused: int = 0
    http: dict[int, int] = field(default_factory=dict)


def fuzz_catalog(catalog: Path, corpus: list[Path], allowed: set[str],
                 report: FuzzReport | None = None) -> FuzzReport:
    """Index and search every file of ``corpus``: each is indexed or reported as an
    ImageError naming it, each search answers or raises ImageError; then the check."""
    from vestis.catalog import Catalog
    from vestis.images import ImageError

    report = report or FuzzReport()
    report.files = len(corpus)
    failed: list[tuple[str, str]] = []
    with Catalog(catalog, model="lite0") as cat:
        result = cat.add(corpus, on_error=lambda path, reason: failed.append((path, reason)))
        report.indexed = result.added
        report.refused = len(result.failed)
        assert result.added + result.skipped + len(result.failed) == len(corpus), result
        assert all(reason and "\n" not in reason for _, reason in result.failed), result.failed
        for path in corpus:
            try:
                cat.search(path, k=1)
                report.searched += 1
            except ImageError as exc:
                assert exc.source == str(path) and "\n" not in exc.reason, exc
                report.search_refused += 1
    check_catalog(catalog, allowed | {str(path) for path in corpus})
    return report


def fuzz_http(base: str, corpus: list[Path], report: FuzzReport) -> FuzzReport:
    """POST /search every file: 200, or 413/415/422 with a one-line detail naming it."""
    import httpx

    with httpx.Client(base_url=base, timeout=120) as http:
        for path in corpus:
            response = http.post("/search", files={"image": (path.name, path.read_bytes())},
                                 data={"k": "1"})
            report.http[response.status_code] = report.http.get(response.status_code, 0) + 1
            if response.status_code != 200:
                detail = response.json()["detail"]
                assert response.status_code in (413, 415, 422), (path.name, response.text)
                assert detail.startswith(path.name) and "\n" not in detail, detail
        assert http.get("/health").status_code == 200
    return report


# -- HTTP abuse -------------------------------------------------------------------------------
def http_abuse(base: str, token: str, photo: Path, *, burst: int = 40,
               many_files: int = 30) -> dict[str, int]:
    """Bad fields, an oversized body, one item with many files, a burst of searches at
    once: every answer is a JSON error or success, and the server stays healthy."""
    import httpx

    data = photo.read_bytes()
    auth = {"Authorization": f"Bearer {token}"}
    counts: dict[str, int] = {}

    def expect(name: str, response, statuses: tuple[int, ...]) -> None:
        assert response.status_code in statuses, (name, response.status_code, response.text)
        if response.status_code >= 400:
            detail = response.json()["detail"]
            assert isinstance(detail, str) and "\n" not in detail, (name, detail)
        counts[str(response.status_code)] = counts.get(str(response.status_code), 0) + 1

    image = {"image": ("q.jpg", data)}
    with httpx.Client(base_url=base, timeout=120) as http:
        bad_forms = [{"k": "0"}, {"k": "abc"}, {"k": "100000"}, {"where": "novalue"},
                     {"garment": "socks"}, {"text": "x" * 600}, {"text_weight": "2"},
                     {"whole": "maybe"}]
        for form in bad_forms:
            expect(f"search {form}", http.post("/search", files=image, data=form), (422,))
        expect("no image", http.post("/search", data={"k": "1"}), (422,))
        expect("text mode", http.post("/search/text", data={"text": "hoodie", "mode": "x"}),
               (422,))
        expect("big body", http.post("/search", files={"image": ("big.jpg",
                                                                 b"\xff" * (21 * 2**20))}),
               (413,))
        for fields in ({"metadata": "{not json"}, {"metadata": "[1]"},
                       {"item_id": "../etc"}, {"metadata": '{"item_id": "x"}'}):
            expect(f"items {fields}", http.post("/items", headers=auth, data=fields,
                                                files={"images": ("a.jpg", data)}), (422,))
        expect("no token", http.post("/items", files={"images": ("a.jpg", data)}), (401,))
        expect("bad json patch", http.patch("/items/x", headers=auth, content=b"{",
                                            ), (404, 422))
        many = [("images", (f"{n}.jpg", data)) for n in range(many_files)]
        added = http.post("/items", headers=auth, data={"item_id": "abuse-many"}, files=many)
        expect("many files", added, (201,))
        assert len(added.json()["images"]) == 1  # the same photo 30 times is one image
        expect("delete", http.delete("/items/abuse-many", headers=auth), (200,))

        def one(_: int):
            with httpx.Client(base_url=base, timeout=120) as client:
                return client.post("/search", files=image, data={"k": "1"})

        with ThreadPoolExecutor(burst) as pool:
            for response in pool.map(one, range(burst)):
                expect("burst", response, (200, 503))
                if response.status_code == 503:
                    assert response.headers.get("Retry-After")
        assert http.get("/health").status_code == 200
    return counts


# -- server and CLI writers; racing creators ------------------------------------------------
def writers_together(catalog: Path, base: str, token: str, source: Path, photos: list[Path],
                     rounds: int = 3) -> int:
    """The server adds and deletes items over HTTP while the CLI indexes and removes on the
    same catalog; then the check. Returns the HTTP writes made."""
    import httpx

    auth = {"Authorization": f"Bearer {token}"}
    writes = [0]
    stop = threading.Event()
    errors: list[str] = []

    def server_writer() -> None:
        with httpx.Client(base_url=base, headers=auth, timeout=120) as http:
            n = 0
            while not stop.is_set():
                photo = photos[n % len(photos)]
                item = f"http-{n}"
                added = http.post("/items", data={"item_id": item},
                                  files={"images": (photo.name, photo.read_bytes())})
                removed = http.delete(f"/items/{item}")
                if added.status_code != 201 or removed.status_code != 200:
                    errors.append(f"{added.status_code} {removed.status_code} {added.text}")
                writes[0] += 2
                n += 1

    thread = threading.Thread(target=server_writer)
    thread.start()
    try:
        items = sorted({row["item_id"] for row in source_rows(source)})
        for n in range(rounds):
            for args in (["index", source], ["remove", items[n % len(items)]]):
                done = run_cli(*args, "--catalog", catalog)
                assert done.returncode == 0, done.stderr[-2000:]
    finally:
        stop.set()
        thread.join(120)
    assert not errors, errors[:3]
    done = run_cli("index", source, "--catalog", catalog)
    assert done.returncode == 0, done.stderr[-2000:]
    allowed = {row["image"] for row in source_rows(source)}
    assert sorted(p for _, _, p in stored_rows(catalog)) == sorted(allowed)
    check_catalog(catalog, allowed)
    return writes[0]


def racing_creators(folder: Path, source: Path, racers: int = 4) -> int:
    """``racers`` vestis index processes create one catalog at once: every one succeeds and
    each image is stored once. Returns the images stored."""
    catalog = folder / "raced"
    processes = [subprocess.Popen(cli_command("index", source, "--catalog", catalog),
                                  env=cli_env(), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for _ in range(racers)]
    failures = [p.communicate(timeout=300)[1] for p in processes if p.wait(300) != 0]
    assert not failures, failures[0][-2000:]
    allowed = {row["image"] for row in source_rows(source)}
    assert sorted(p for _, _, p in stored_rows(catalog)) == sorted(allowed)
    return check_catalog(catalog, allowed)


# -- the soak ---------------------------------------------------------------------------------
class Server:
    """`vestis serve` in a subprocess on 127.0.0.1, until ready; ``peak_mb`` its VmHWM."""

    def __init__(self, catalog: Path, token_file: Path):
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.command = cli_command("serve", "--catalog", catalog, "--port", self.port,
                                   "--token-file", token_file)

    def __enter__(self) -> Server:
        import httpx

        self.process = subprocess.Popen(self.command, env=cli_env(),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "vestis serve exited"
            try:
                if httpx.get(f"{self.base}/health").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError("vestis serve did not become ready")

    def peak_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(30)


def timed(label: str, step: Callable[[], object]) -> object:
    started = time.perf_counter()
    result = step()
    print(f"{label}: {time.perf_counter() - started:.1f} s", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flips", type=int, default=40, help="bit-flipped files to fuzz")
    args = parser.parse_args()
    photo = DATA / "luma" / "images" / "mh06-blue_main.jpg"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        source = luma_source(folder / "source.csv", slice(0, 24))
        kills = timed("kill loop", lambda: kill_loop(folder / "killed", source, args.kills,
                                                     args.seed))
        print(f"  {kills.runs} runs ({kills.operations}); {kills.killed} killed by SIGKILL, "
              f"{kills.finished} finished; {kills.checks} consistency checks over "
              f"{kills.images_checked} images, all passed; final: every one of "
              f"{len(source_rows(source))} images stored once")
        corpus = fuzz_corpus(folder / "fuzz", photo, args.seed, flips=args.flips)
        fuzzed = timed("fuzz (index, search)", lambda: fuzz_catalog(
            folder / "fuzzed", corpus, set()))
        racers = timed("racing creators", lambda: racing_creators(folder, source))
        print(f"  4 racing vestis index on one new catalog: all succeeded, {racers} images "
              "stored once")
        token_file = folder / "token"
        token_file.write_text("soak-token-0123456789abcdef")
        shared = folder / "shared"
        assert run_cli("index", source, "--catalog", shared).returncode == 0
        with Server(shared, token_file) as server:
            timed("fuzz (POST /search)", lambda: fuzz_http(server.base, corpus, fuzzed))
            abuse = timed("HTTP abuse", lambda: http_abuse(server.base, token_file.read_text(),
                                                           photo))
            photos = [Path(row["image"]) for row in source_rows(source)][:4]
            writes = timed("server + CLI writers", lambda: writers_together(
                shared, server.base, token_file.read_text(), source, photos))
            peak = server.peak_mb()
        print(f"  fuzz: {fuzzed.files} files; index: {fuzzed.indexed} indexed, "
              f"{fuzzed.refused} refused with a reason; search: {fuzzed.searched} answered, "
              f"{fuzzed.search_refused} refused; POST /search: "
              + ", ".join(f"{n} x {s}" for s, n in sorted(fuzzed.http.items())))
        print(f"  HTTP abuse answers: {abuse}; server + CLI writers: {writes} HTTP writes "
              "during 3 CLI index/remove rounds, then every image stored once")
        print(f"  server peak RSS over fuzz, abuse and writers: {peak:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
