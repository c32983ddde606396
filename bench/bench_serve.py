"""Load on `vestis serve`: concurrent searches while another client adds and deletes items.

    python bench/bench_serve.py [--source ../shared/data/luma] [--catalog DIR]
                                [--clients 8] [--searches 400]
                                [--memory-rounds 4] [--memory-clients 50] [--bound-mb 1500]
                                [--workers N] [--queue N]

Starts `vestis serve` (a real process, over HTTP) on a catalog of the source's photos (built
in a temporary folder unless --catalog names one), then runs --clients search clients that
send --searches searches in all, each a photo of the source, while one writer client adds
an item (POST /items) and deletes it, over and over. Prints search latency p50/p99, the
writer's figures, and the error count; exits 1 when any request failed.

Then the memory phase (--memory-rounds, 0 skips it): each round sends --memory-clients
garment searches at once, of big photos generated from a street photo (a 20-megapixel
JPEG, a 33-megapixel palette PNG just under the server's pixel cap, and an 11000x11000 PNG
over it). Prints the server's RSS when ready, after each round and 2 s after the last, and
its peak RSS (the kernel's high-water mark, VmHWM); exits 1 when the peak exceeds --bound-mb or any
answer is other than 200, 503 (busy, with Retry-After) or 422 (over the pixel cap).
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from vestis.catalog import Catalog, read_source

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "luma"
STREET_PHOTO = DEFAULT_SOURCE.parent / "ccp" / "photos" / "0001.jpg"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--catalog", type=Path, help="existing catalog (default: build one)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--searches", type=int, default=400)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--memory-rounds", type=int, default=4)
    parser.add_argument("--memory-clients", type=int, default=50)
    parser.add_argument("--bound-mb", type=float, default=1500.0,
                        help="the server's peak RSS must stay under this")
    parser.add_argument("--workers", type=int, help="vestis serve --workers (default: its own)")
    parser.add_argument("--queue", type=int, help="vestis serve --queue (default: its own)")
    args = parser.parse_args()

    source = args.source / "catalog.csv" if args.source.is_dir() else args.source
    photos = [record.path for record in read_source(source)]
    with tempfile.TemporaryDirectory() as folder:
        catalog = args.catalog or build_catalog(source, Path(folder) / "catalog")
        token_file = Path(folder) / "token"
        token_file.write_text(secrets.token_urlsafe(32))
        extra = [f"--{name}={value}" for name in ("workers", "queue")
                 if (value := getattr(args, name)) is not None]
        with serve(catalog, token_file, extra) as server:
            token = token_file.read_text()
            failed = run_load(server.base, token, photos, args) if args.searches else 0
            if args.memory_rounds:
                failed |= run_memory(server, args)
            return failed


def build_catalog(source: Path, folder: Path) -> Path:
    started = time.perf_counter()
    with Catalog(folder) as catalog:
        report = catalog.add(source)
        print(
            f"catalog: {report.added} images of {len(catalog)} items from {source}, "
            f"indexed in {time.perf_counter() - started:.1f} s"
        )
    return folder


class serve:
    """`vestis serve` in a subprocess, on a free port, until ready."""

    def __init__(self, catalog: Path, token_file: Path, extra: list[str] | None = None):
        self.port = free_port()
        self.command = [sys.executable, "-m", "vestis.cli", "serve", "--catalog", str(catalog)]
        self.command += ["--port", str(self.port), "--token-file", str(token_file)]
        self.command += extra or []
        self.base = f"http://127.0.0.1:{self.port}"

    def rss_mb(self, field: str = "VmRSS") -> float:
        """The server's resident memory now (``VmHWM``: its peak so far), in MB (Linux)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def __enter__(self) -> serve:
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=self.log)
        base = f"http://127.0.0.1:{self.port}"
        started = time.perf_counter()
        with httpx.Client(base_url=base, timeout=5) as http:
            while True:
                if self.process.poll() is not None:
                    self.log.seek(0)
                    raise SystemExit(f"vestis serve exited:\n{self.log.read()}")
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            stats = http.get("/stats").json()
        print(
            f"server: ready in {time.perf_counter() - started:.1f} s; {stats['items']} items, "
            f"{stats['images']} images, model {stats['model']}, index {stats['index']}"
        )
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_load(base: str, token: str, photos: list[Path], args) -> int:
    queries = random.Random(0).choices(photos, k=args.searches)
    data = {path: path.read_bytes() for path in set(queries) | set(photos[:20])}
    turn = itertools.count()
    latencies: list[float] = []
    errors: list[str] = []
    writes: list[float] = []
    done = threading.Event()

    def searcher() -> None:
        with httpx.Client(base_url=base, timeout=120) as http:
            while (n := next(turn)) < len(queries):
                files = {"image": (queries[n].name, data[queries[n]])}
                started = time.perf_counter()
                try:
                    response = http.post("/search", files=files, data={"k": args.k})
                    ok = response.status_code == 200 and response.json()["garments"][0]["matches"]
                    if not ok:
                        errors.append(f"search: {response.status_code} {response.text[:200]}")
                except httpx.HTTPError as exc:
                    errors.append(f"search: {exc!r}")
                latencies.append(time.perf_counter() - started)

    def writer() -> None:
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=base, headers=headers, timeout=120) as http:
            for n in itertools.count():
                if done.is_set():
                    return
                photo = photos[n % 20]
                item = f"bench-{os.getpid()}-{n}"
                started = time.perf_counter()
                try:
                    added = http.post(
                        "/items",
                        files={"images": (photo.name, data[photo])},
                        data={"item_id": item, "metadata": '{"category": "bench"}'},
                    )
                    removed = http.delete(f"/items/{item}")
                    for response in (added, removed):
                        if response.status_code >= 400:
                            errors.append(f"write: {response.status_code} {response.text[:200]}")
                except httpx.HTTPError as exc:
                    errors.append(f"write: {exc!r}")
                writes.append(time.perf_counter() - started)

    with httpx.Client(base_url=base) as http:
        items_before = http.get("/stats").json()["items"]
    started = time.perf_counter()
    with ThreadPoolExecutor(args.clients + 1) as pool:
        write_job = pool.submit(writer)
        for job in [pool.submit(searcher) for _ in range(args.clients)]:
            job.result()
        elapsed = time.perf_counter() - started
        done.set()
        write_job.result()
    with httpx.Client(base_url=base) as http:
        items_after = http.get("/stats").json()["items"]
    if items_after != items_before:
        errors.append(f"catalog has {items_after} items after the run, {items_before} before")

    report(latencies, writes, errors, elapsed, args)
    return 1 if errors else 0


def big_photos() -> dict[str, bytes]:
    """Upload-sized files of many pixels: a 20-megapixel JPEG and a 33-megapixel palette PNG
    of a street photo (under the server's 2**25 cap), and an 11000x11000 PNG (over it)."""
    from PIL import Image

    street = Image.open(STREET_PHOTO).convert("RGB")
    out = {}
    jpeg = street.resize((street.width * 11, street.height * 11), Image.BICUBIC)
    out["street-20mp.jpg"] = encode(jpeg, "JPEG", quality=85)
    del jpeg
    side = 5792  # 5792 * 5792 = 33.5 Mpx, just under 2**25
    palette = street.quantize(16).resize((side * street.width // street.height, side),
                                         Image.NEAREST)
    out["street-33mp.png"] = encode(palette, "PNG")
    del palette
    out["flat-121mp.png"] = encode(Image.new("1", (11000, 11000)), "PNG")
    return out


def encode(image, fmt: str, **options) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def run_memory(server: serve, args) -> int:
    photos = big_photos()
    sizes = ", ".join(f"{name} {len(data) / 2**20:.1f} MB" for name, data in photos.items())
    print(f"memory: {args.memory_rounds} rounds of {args.memory_clients} concurrent garment "
          f"searches of big photos ({sizes})")
    ready = server.rss_mb()
    statuses: dict[int, int] = {}
    errors: list[str] = []
    names = list(photos)

    def one(n: int) -> None:
        name = names[n % len(names)]
        with httpx.Client(base_url=server.base, timeout=300) as http:
            try:
                response = http.post("/search", files={"image": (name, photos[name])},
                                     data={"k": 5})
            except httpx.HTTPError as exc:
                errors.append(f"{name}: {exc!r}")
                return
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        busy = response.status_code == 503 and response.headers.get("Retry-After")
        over_cap = response.status_code == 422 and name.startswith("flat")
        if response.status_code != 200 and not busy and not over_cap:
            errors.append(f"{name}: {response.status_code} {response.text[:200]}")

    started = time.perf_counter()
    after_rounds = []
    for _ in range(args.memory_rounds):
        with ThreadPoolExecutor(args.memory_clients) as pool:
            list(pool.map(one, range(args.memory_clients)))
        after_rounds.append(server.rss_mb())
    elapsed = time.perf_counter() - started
    time.sleep(2.0)
    settled, peak = server.rss_mb(), server.rss_mb("VmHWM")
    answers = ", ".join(f"{count} x {status}" for status, count in sorted(statuses.items()))
    print(f"memory: answers {answers} in {elapsed:.1f} s; errors {len(errors)}")
    print(f"memory: server RSS ready {ready:.0f} MB, after each round "
          f"{' / '.join(f'{mb:.0f}' for mb in after_rounds)} MB, peak {peak:.0f} MB, "
          f"2 s after {settled:.0f} MB (bound {args.bound_mb:.0f} MB)")
    for error in errors[:10]:
        print(f"  {error}")
    return 1 if errors or peak > args.bound_mb else 0


def report(latencies, writes, errors, elapsed, args) -> None:
    ms = sorted(1000 * t for t in latencies)
    print(
        f"searches: {len(ms)} from {args.clients} clients in {elapsed:.1f} s "
        f"({len(ms) / elapsed:.1f}/s); latency p50 {percentile(ms, 50):.0f} ms, "
        f"p99 {percentile(ms, 99):.0f} ms, mean {statistics.fmean(ms):.0f} ms"
    )
    if writes:
        write_ms = sorted(1000 * t for t in writes)
        print(
            f"writes: {len(writes)} add+delete rounds meanwhile; "
            f"p50 {percentile(write_ms, 50):.0f} ms per round"
        )
    print(f"errors: {len(errors)}")
    for error in errors[:10]:
        print(f"  {error}")


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    rank = max(1, round(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


if __name__ == "__main__":
    sys.exit(main())
