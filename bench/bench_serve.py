"""Load on `vestis serve`: concurrent searches while another client adds and deletes items.

    python bench/bench_serve.py [--source ../shared/data/luma] [--catalog DIR]
                                [--clients 8] [--searches 400]

Starts `vestis serve` (a real process, over HTTP) on a catalog of the source's photos (built
in a temporary folder unless --catalog names one), then runs --clients search clients that
send --searches searches in all, each a photo of the source, while one writer client adds
an item (POST /items) and deletes it, over and over. Prints search latency p50/p99, the
writer's figures, and the error count; exits 1 when any request failed.
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--catalog", type=Path, help="existing catalog (default: build one)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--searches", type=int, default=400)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()

    source = args.source / "catalog.csv" if args.source.is_dir() else args.source
    photos = [record.path for record in read_source(source)]
    with tempfile.TemporaryDirectory() as folder:
        catalog = args.catalog or build_catalog(source, Path(folder) / "catalog")
        token_file = Path(folder) / "token"
        token_file.write_text(secrets.token_urlsafe(32))
        with serve(catalog, token_file) as base:
            token = token_file.read_text()
            return run_load(base, token, photos, args)


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

    def __init__(self, catalog: Path, token_file: Path):
        self.port = free_port()
        self.command = [sys.executable, "-m", "vestis.cli", "serve", "--catalog", str(catalog)]
        self.command += ["--port", str(self.port), "--token-file", str(token_file)]

    def __enter__(self) -> str:
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
        return base

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
