"""The HTTP application (FastAPI): the page, the model card, health, and predictions.

    GET  /          the page (page.html, page.css, page.js from this package; no build step, no CDN)
    GET  /model     the model card (jaxcell.serve.card)
    GET  /health    {"status": "ok", ...}; the only route that never needs the token
    POST /predict   multipart/form-data, one or more fields "image"; one answer per image

Every refusal is JSON, {"error": "one line naming the problem"}, with a 4xx status. No route
takes a file path, and uploads stay in memory (jaxcell.serve.uploads).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import secrets
import zlib
from importlib import resources

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxcell.data.images import ImageTooLarge, open_image, resize_square
from jaxcell.errors import UserError
from jaxcell.serve.uploads import BadRequest, read_images

OPEN_PATHS = {"/health"}   # served without the token
PAGE_FILES = {"/": ("page.html", "text/html; charset=utf-8"), "/page.css": ("page.css", "text/css; charset=utf-8"),
              "/page.js": ("page.js", "text/javascript; charset=utf-8")}


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class RequireToken:
    """Plain ASGI middleware: every HTTP request but OPEN_PATHS carries the bearer token. Installed only
    when there is a token, and written against ASGI directly: starlette's BaseHTTPMiddleware (what
    @app.middleware builds) wraps each request in a task group and a streamed response, a large share of
    the event loop's time in a profile under load (docs/benchmarks.md, "Serving under load")."""

    def __init__(self, app, expected: bytes):
        self.app, self.expected = app, expected

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                response = _error(401, "missing or wrong token: send the header 'Authorization: Bearer <token>'",
                                  {"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def png_data_url(image: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    # Speed over bytes: zlib's fastest level with run-length matching costs a quarter of the default level's
    # CPU for a few per cent more bytes (docs/benchmarks.md, "Serving under load").
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1, compress_type=zlib.Z_RLE)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def decode(files: list[tuple[str, bytes]], image_size: int, max_pixels: int) -> list[tuple[str, np.ndarray]]:
    """(name, the model's input (S, S, 3) uint8) per upload; the first bad one is refused."""
    out = []
    for name, data in files:
        try:
            im = open_image(io.BytesIO(data), name, max_pixels)
        except ImageTooLarge as error:
            raise BadRequest(413, str(error)) from None
        except UserError as error:
            raise BadRequest(422, str(error)) from None
        out.append((name, resize_square(im, image_size)))
    return out


def create_app(engine, card: dict, *, token: str | None = None, max_upload_bytes: int = 20 * 2**20,
               max_files: int = 32, max_pixels: int = 50_000_000) -> FastAPI:
    from jaxcell.explain import overlay

    app = FastAPI(title="jaxcell", version=card["version"], docs_url=None, redoc_url=None, openapi_url=None)
    pages = {path: (resources.files("jaxcell.serve").joinpath("static", name).read_bytes(), media)
             for path, (name, media) in PAGE_FILES.items()}
    if token is not None:
        app.add_middleware(RequireToken, expected=f"Bearer {token}".encode())

    @app.exception_handler(BadRequest)
    async def refused(request: Request, error: BadRequest):
        return _error(error.status, error.message)

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception):  # a bug, not the client's: still one JSON line
        return _error(500, f"internal error: {type(error).__name__}: {error}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        message = {404: f"no such endpoint: {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(error.status_code,
                                                                                      str(error.detail))
        return _error(error.status_code, message)

    def page(path: str):
        content, media = pages[path]
        return Response(content, media_type=media, headers={"Cache-Control": "no-cache"})

    app.get("/", include_in_schema=False)(lambda: page("/"))
    app.get("/page.css", include_in_schema=False)(lambda: page("/page.css"))
    app.get("/page.js", include_in_schema=False)(lambda: page("/page.js"))

    @app.get("/health")
    def health():
        return {"status": "ok", "model": card["model"], "batches": engine.batches, "images": engine.images}

    @app.get("/model")
    def model():
        return card

    @app.post("/predict")
    async def predict(request: Request):
        files = await read_images(request, max_upload_bytes, max_files)
        decoded = await run_in_threadpool(decode, files, engine.predictor.image_size, max_pixels)
        futures = engine.submit(np.stack([d[1] for d in decoded]))
        results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))

        def render() -> bytes:  # the overlay on the image the model saw, at its size: the page scales it up
            answers = [{"file": name, **answer, "cam": png_data_url(overlay(image, cam_map))}
                       for (name, image), (answer, cam_map) in zip(decoded, results)]
            # Serialized here, off the event loop: the answers are plain JSON types already, so FastAPI's
            # encoder has nothing to convert, only a walk over every overlay's string to repeat.
            return json.dumps({"results": answers}, separators=(",", ":"), allow_nan=False).encode()

        return Response(await run_in_threadpool(render), media_type="application/json")

    return app

