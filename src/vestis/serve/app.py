"""The HTTP API and the web page: ``create_app(catalog_dir)`` builds the FastAPI app."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field

from vestis import __version__
from vestis.catalog import Item, Match, ReadOnlyCatalogError
from vestis.detect.groups import GARMENT_GROUPS
from vestis.images import ImageError
from vestis.serve.auth import open_access, token_checker
from vestis.serve.limits import BodySizeLimit
from vestis.serve.pool import (
    DEFAULT_QUEUE,
    DEFAULT_WORKERS,
    RETRY_AFTER_S,
    BusyError,
    InferencePool,
)
from vestis.serve.service import (
    CatalogService,
    ItemExistsError,
    NotReadyError,
    ServerFileError,
    Upload,
)
from vestis.text.search import MODES as TEXT_MODES

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD_MB = 20.0
MAX_K = 100


# The page loads nothing from elsewhere; the browser enforces it.
PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)

# A catalog image is never a document: no sniffing, no scripts, no same-origin access.
IMAGE_HEADERS = {
    "Cache-Control": "private, max-age=3600",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; sandbox",
}

ScalarValue = str | int | float | bool


# -- response and request models (they document the API at /docs) --------------------------
class MatchOut(BaseModel):
    item_id: str
    score: float = Field(description="Cosine similarity, higher is closer (with rerank: the "
                         "matcher's logit).")
    image_id: int = Field(description="The item's best-matching catalog image.")
    image_url: str
    box: list[int] | None = Field(description="Garment box in that catalog image, if any.")
    metadata: dict[str, Any]


class GarmentOut(BaseModel):
    group: str = Field(description="The garment group (upper, outer, lower, dress, footwear, "
                       "bag, headwear), or 'whole image' when the photo was searched whole.")
    box: list[int] = Field(description="x1, y1, x2, y2 in the uploaded photo's pixels.")
    score: float = Field(description="The parser's confidence in the garment (1 for a whole "
                         "image).")
    matches: list[MatchOut]


class SearchOut(BaseModel):
    width: int = Field(description="Width of the uploaded photo, upright (EXIF applied).")
    height: int
    k: int
    filters: dict[str, str]
    garments: list[GarmentOut]
    took_ms: float


class TrackOut(BaseModel):
    track_id: int
    group: str = Field(description="The garment group tracked (or 'whole image').")
    frames: list[int] = Field(description="Decode indices of the sampled frames it is in.")
    times: list[float] = Field(description="Their times in seconds.")
    best_frame_index: int
    box: list[int] = Field(description="Its box in the best frame.")
    thumbnail: str | None = Field(None, description="The best frame's crop, a data: URL.")
    matches: list[MatchOut] = Field(description="Items by fused score over the frames.")


class VideoSearchOut(BaseModel):
    k: int
    fusion: str
    tracks: list[TrackOut]
    took_ms: float


class TextSearchOut(BaseModel):
    text: str
    k: int
    matches: list[MatchOut]
    took_ms: float


class CompleteOut(BaseModel):
    category: str | None = Field(description="The photo's kind of garment (its nearest "
                                 "catalog item's category), left out of the results.")
    k: int
    matches: list[MatchOut]
    took_ms: float


class DescriptionOut(BaseModel):
    category: dict[str, Any] = Field(description="name and probability of the predicted "
                                     "category.")
    attributes: dict[str, list[list[Any]]] = Field(
        description="Per family (material, pattern, climate, style...), [value, probability] "
        "pairs at least 0.5 likely, most likely first.")


class ImageOut(BaseModel):
    image_id: int
    url: str
    box: list[int] | None
    metadata: dict[str, Any]


class ItemOut(BaseModel):
    item_id: str
    metadata: dict[str, Any]
    images: list[ImageOut]


class ItemPatch(BaseModel):
    metadata: dict[str, ScalarValue | None] = Field(
        description="Keys to set; a null value deletes the key.",
        examples=[{"on_sale": "yes", "old_field": None}],
    )


class DeletedOut(BaseModel):
    item_id: str
    removed_images: int


class StatsOut(BaseModel):
    items: int
    images: int
    model: str
    model_id: str
    dim: int
    index: str
    indexed_vectors: int
    metadata_fields: list[str]


class FacetOut(BaseModel):
    values: list[str]
    truncated: bool


class HealthOut(BaseModel):
    status: str = Field(description="loading, ready or failed.")
    ready: bool
    detail: str | None = None


# -- the app ---------------------------------------------------------------------------
def create_app(
    catalog_dir: str | Path,
    *,
    token: str | None = None,
    private: bool = False,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    workers: int = DEFAULT_WORKERS,
    queue: int = DEFAULT_QUEUE,
) -> FastAPI:
    """An app serving the catalog in ``catalog_dir``.

    The model loads in a background thread at start-up; ``/health`` answers 503 until it
    is ready. Writes need ``token`` (without one they are disabled); ``private`` makes
    every read need it too. At most ``workers`` requests decode photos or run the model at
    once, ``queue`` more wait, and the rest get 503 with Retry-After at once.
    """
    service = CatalogService(catalog_dir, pool=InferencePool(workers, queue))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=service.load, name="vestis-model-load", daemon=True).start()
        yield
        service.wait_until_loaded()
        service.close()

    app = FastAPIOffline(
        title="vestis",
        version=__version__,
        description="Search a clothing catalog with a photo; manage its items.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(BodySizeLimit, max_bytes=int(max_upload_mb * 2**20))
    _add_error_handlers(app)
    write = token_checker(token, what="writes")
    read = token_checker(token, what="reads on this private server") if private else open_access
    _add_search_routes(app, service, read)
    _add_text_routes(app, service, read)
    _add_video_routes(app, service, read)
    _add_outfit_routes(app, service, read)
    _add_item_routes(app, service, read, write)
    _add_info_routes(app, service, read)
    _add_page_routes(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def one_line_validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": _describe_validation(exc)}, status_code=422)

    @app.exception_handler(ServerFileError)
    async def server_side(request: Request, exc: ServerFileError):
        return JSONResponse({"detail": " ".join(str(exc).split())}, status_code=500)

    @app.exception_handler(ReadOnlyCatalogError)
    async def read_only(request: Request, exc: ReadOnlyCatalogError):
        return JSONResponse({"detail": str(exc)}, status_code=403)

    @app.exception_handler(BusyError)
    async def busy(request: Request, exc: BusyError):
        return JSONResponse({"detail": str(exc)}, status_code=503,
                            headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(NotReadyError)
    async def not_ready(request: Request, exc: NotReadyError):
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "2"})


def _describe_validation(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    message = f"{where}: {first.get('msg', 'invalid')}" if where else first.get("msg", "invalid")
    return message + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")


def _add_search_routes(app: FastAPI, service: CatalogService, read: Callable) -> None:
    @app.post("/search", response_model=SearchOut, dependencies=[Depends(read)], tags=["search"])
    def search(
        image: UploadFile = File(..., description="The query photo (JPEG, PNG, WebP, ...)."),
        k: int = Form(10, ge=1, le=MAX_K, description="Items to return per garment."),
        where: list[str] | None = Form(
            None, description="Metadata filters as key=value; repeat for several (AND)."
        ),
        garment: str | None = Form(
            None, description="Search only garments of this group (upper, outer, lower, dress, "
            "footwear, bag, headwear)."),
        whole: bool = Form(False, description="Search the whole photo as one query."),
        any_group: bool = Form(
            False, description="Match garments with catalog items of any group (by default "
            "only compatible groups)."),
        text: str | None = Form(
            None, max_length=500, description="Words that change the photo's query ('but in "
            "red'): the photo is then searched whole, mixed with the text."),
        text_weight: float = Form(0.5, ge=0.0, le=1.0, description="The text's share."),
        rerank: bool = Form(
            False, description="Re-rank each garment's top 50 items with the learned matcher "
            "rerank-lite0 (scores become its logits); not with text."),
    ) -> SearchOut:
        """Find the catalog items that best match each garment of a photo: the garment
        parser finds the garments, and each is searched on its own."""
        started = time.perf_counter()
        filters = _parse_filters(where)
        if garment and garment not in GARMENT_GROUPS:
            raise HTTPException(422, f"garment: one of {', '.join(GARMENT_GROUPS)}, got "
                                     f"{garment!r}")
        if rerank and text and text.strip():
            raise HTTPException(422, "rerank: re-ranks photo searches, not photo + text")

        def work():
            data = image.file.read()
            if text and text.strip():
                return service.search_photo_text(data, text, k, filters,
                                                 text_weight=text_weight)
            return service.search(data, k, filters, whole=whole, garment=garment or None,
                                  compatible=not any_group, rerank=rerank)

        try:
            result = service.run(work)
        except ImageError as exc:
            raise _image_error(image.filename, exc) from None
        garments = [
            GarmentOut(
                group=found.group,
                box=list(found.box),
                score=round(found.score, 4),
                matches=[_match_out(m) for m in found.matches],
            )
            for found in result.garments
        ]
        took = (time.perf_counter() - started) * 1000
        return SearchOut(
            width=result.width,
            height=result.height,
            k=k,
            filters=filters,
            garments=garments,
            took_ms=round(took, 1),
        )


def _add_text_routes(app: FastAPI, service: CatalogService, read: Callable) -> None:
    @app.post("/search/text", response_model=TextSearchOut, dependencies=[Depends(read)],
              tags=["search"])
    def search_text(
        text: str = Form(..., min_length=1, max_length=500,
                         description="The words, e.g. 'navy full-zip hoodie'."),
        k: int = Form(10, ge=1, le=MAX_K, description="Items to return."),
        where: list[str] | None = Form(None, description="Metadata filters key=value (AND)."),
        mode: str = Form("hybrid", description="hybrid (BM25 fused with the aligned text "
                         "embedding), bm25 or embedding."),
    ) -> TextSearchOut:
        """Search the catalog by words."""
        started = time.perf_counter()
        if mode not in TEXT_MODES:
            raise HTTPException(422, f"mode: one of {', '.join(TEXT_MODES)}, got {mode!r}")
        if not text.strip():
            raise HTTPException(422, "text: the query is empty")
        filters = _parse_filters(where)
        matches = service.run(lambda: service.search_text(text, k, filters, mode=mode))
        return TextSearchOut(text=text, k=k, matches=[_match_out(m) for m in matches],
                             took_ms=round((time.perf_counter() - started) * 1000, 1))


def _add_video_routes(app: FastAPI, service: CatalogService, read: Callable) -> None:
    @app.post("/search/video", response_model=VideoSearchOut, dependencies=[Depends(read)],
              tags=["search"])
    def search_video(
        video: UploadFile = File(..., description="The clip (MP4, MOV, WebM, MKV...)."),
        k: int = Form(10, ge=1, le=MAX_K, description="Items to return per track."),
        fusion: str = Form("learned", description="How a track's frames are fused: learned, "
                           "max or mean."),
        every: int = Form(25, ge=1, le=1000, description="Sample every Nth frame."),
        where: list[str] | None = Form(None, description="Metadata filters key=value (AND)."),
    ) -> VideoSearchOut:
        """Track the garments of a video and match each track with the catalog."""
        from vestis.video.fusion import FUSIONS
        from vestis.video.reader import VideoError

        started = time.perf_counter()
        if fusion not in FUSIONS:
            raise HTTPException(422, f"fusion: one of {', '.join(FUSIONS)}, got {fusion!r}")
        suffix = Path(video.filename or "").suffix.lower()[:8] or ".mp4"
        filters = _parse_filters(where)
        try:
            tracks = service.run(lambda: service.search_video(
                video.file.read(), suffix, k, fusion=fusion, every=every, where=filters,
                name=_client_name(video.filename)))
        except VideoError as exc:
            raise HTTPException(422, str(exc)) from None
        out = []
        for track in tracks:
            data = track.to_dict(thumbnail=True)
            out.append(TrackOut(**{key: data.get(key) for key in TrackOut.model_fields
                                   if key != "matches"},
                                matches=[_match_out(m) for m in track.matches]))
        return VideoSearchOut(k=k, fusion=fusion, tracks=out,
                              took_ms=round((time.perf_counter() - started) * 1000, 1))


def _add_outfit_routes(app: FastAPI, service: CatalogService, read: Callable) -> None:
    @app.post("/complete", response_model=CompleteOut, dependencies=[Depends(read)],
              tags=["search"])
    def complete(
        image: UploadFile = File(..., description="Photo of a garment."),
        k: int = Form(10, ge=1, le=MAX_K, description="Items to return."),
        same_category: bool = Form(False, description="Also suggest the photo's own kind."),
        where: list[str] | None = Form(None, description="Metadata filters key=value (AND)."),
    ) -> CompleteOut:
        """Complete the look: catalog items that go with the garment (Comp-Net)."""
        started = time.perf_counter()
        filters = _parse_filters(where)
        try:
            result = service.run(lambda: service.complete(
                image.file.read(), k, exclude_category=not same_category, where=filters))
        except ImageError as exc:
            raise _image_error(image.filename, exc) from None
        return CompleteOut(category=result.category, k=k,
                           matches=[_match_out(m) for m in result.matches],
                           took_ms=round((time.perf_counter() - started) * 1000, 1))

    @app.post("/describe", response_model=DescriptionOut, dependencies=[Depends(read)],
              tags=["search"])
    def describe(image: UploadFile = File(..., description="Photo of a garment.")) -> dict:
        """The garment's predicted category and attributes."""
        try:
            return service.run(lambda: service.describe(image.file.read()))
        except ImageError as exc:
            raise _image_error(image.filename, exc) from None


def _add_item_routes(
    app: FastAPI, service: CatalogService, read: Callable, write: Callable
) -> None:
    @app.get(
        "/items/{item_id}",
        response_model=ItemOut,
        dependencies=[Depends(read)],
        tags=["items"],
    )
    def get_item(item_id: str) -> ItemOut:
        """An item's metadata and all its images."""
        return _item_out(_find(service.get, item_id))

    @app.post(
        "/items",
        response_model=ItemOut,
        status_code=201,
        dependencies=[Depends(write)],
        tags=["items"],
    )
    def add_item(
        images: list[UploadFile] = File(..., description="One or more photos of the item."),
        item_id: str | None = Form(None, description="New item id (generated when absent)."),
        metadata: str = Form("{}", description='A JSON object, e.g. {"category": "Tops"}.'),
    ) -> ItemOut:
        """Add a new item with its photos and metadata. Nothing is written if any part fails."""
        fields = _parse_json_object(metadata)
        try:
            item = service.run(lambda: service.add_item(
                [Upload(upload.filename or "upload", upload.file.read()) for upload in images],
                item_id or None, fields))
        except ImageError as exc:
            raise _image_error(exc.source, exc) from None
        except ItemExistsError as exc:
            raise HTTPException(409, str(exc)) from None
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        return _item_out(item)

    @app.patch(
        "/items/{item_id}",
        response_model=ItemOut,
        dependencies=[Depends(write)],
        tags=["items"],
    )
    def update_item(item_id: str, patch: ItemPatch) -> ItemOut:
        """Set or delete metadata fields of an item."""
        try:
            return _item_out(_find(service.update_item, item_id, patch.metadata))
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None

    @app.delete(
        "/items/{item_id}",
        response_model=DeletedOut,
        dependencies=[Depends(write)],
        tags=["items"],
    )
    def delete_item(item_id: str) -> DeletedOut:
        """Remove an item and its images; searches stop returning it at once."""
        removed = _find(service.remove_item, item_id)
        return DeletedOut(item_id=item_id, removed_images=removed)

    @app.get(
        "/images/{image_id}",
        dependencies=[Depends(read)],
        tags=["items"],
        response_class=Response,
        responses={200: {"content": {"image/*": {}}}},
    )
    def get_image(image_id: int) -> Response:
        """A catalog image, by id (never by path), as the image type it decodes to; a file
        changed since it was indexed, or not an image, is not served (404)."""
        try:
            image = service.image_file(image_id)
        except KeyError:
            raise HTTPException(404, f"no image {image_id}") from None
        return Response(image.data, media_type=image.media_type, headers=IMAGE_HEADERS)


def _add_info_routes(app: FastAPI, service: CatalogService, read: Callable) -> None:
    @app.get(
        "/health",
        response_model=HealthOut,
        tags=["info"],
        responses={503: {"model": HealthOut}},
    )
    def health() -> JSONResponse:
        """Whether the model is loaded and the server answers searches (200) or not (503)."""
        body = HealthOut(status=service.state, ready=service.ready, detail=service.error)
        return JSONResponse(body.model_dump(), status_code=200 if service.ready else 503)

    @app.get("/stats", response_model=StatsOut, dependencies=[Depends(read)], tags=["info"])
    def stats() -> dict[str, Any]:
        """Item and image counts, the model and the index type."""
        return service.stats()

    @app.get(
        "/facets",
        response_model=dict[str, FacetOut],
        dependencies=[Depends(read)],
        tags=["info"],
    )
    def facets() -> dict[str, dict[str, Any]]:
        """Every metadata field with its values, for building filters."""
        return service.facets()


def _add_page_routes(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(
            STATIC_DIR / "index.html",
            headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"},
        )


# -- helpers -----------------------------------------------------------------------------
def _find(operation: Callable, item_id: str, *args):
    """Run an item operation, turning an unknown item into a 404."""
    try:
        return operation(item_id, *args)
    except KeyError:
        raise HTTPException(404, f"no item {item_id!r}") from None


def _parse_filters(pairs: list[str] | None) -> dict[str, str]:
    filters = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise HTTPException(422, f"where: expected key=value, got {pair!r}")
        filters[key.strip()] = value
    return filters


def _parse_json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise HTTPException(422, f"metadata: not valid JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise HTTPException(422, "metadata: must be a JSON object")
    return value


def _image_error(filename: str | None, exc: ImageError) -> HTTPException:
    # An unrecognised format is the wrong media type; a broken or refused image is not.
    status = 415 if exc.reason.startswith("not an image") else 422
    reason = " ".join(exc.reason.split())  # one line, whatever the decoder said
    return HTTPException(status, f"{filename or 'upload'}: {reason}")


def _client_name(filename: str | None) -> str:
    """The client's file name, as messages show it: its last part, on one line."""
    name = Path((filename or "").replace("\\", "/")).name
    return " ".join(name.split())[:100] or "upload"


def _image_url(image_id: int) -> str:
    return f"/images/{image_id}"


def _match_out(match: Match) -> MatchOut:
    return MatchOut(
        item_id=match.item_id,
        score=round(float(match.score), 6),
        image_id=match.image_id,
        image_url=_image_url(match.image_id),
        box=list(match.box) if match.box else None,
        metadata=match.metadata,
    )


def _item_out(item: Item) -> ItemOut:
    images = [
        ImageOut(
            image_id=row.image_id,
            url=_image_url(row.image_id),
            box=list(row.box) if row.box else None,
            metadata=row.metadata,
        )
        for row in item.images
    ]
    return ItemOut(item_id=item.item_id, metadata=item.metadata, images=images)
