"""`jaxcell serve`: a trained model behind HTTP (FastAPI on uvicorn), with a page to use it.

    jaxcell serve --workdir runs/a [--host 127.0.0.1] [--port 8000] [--token T] [--max-upload-mb 20]
    jaxcell serve --weights model.safetensors          # an exported file with its sidecar (model.safetensors.json)

It listens on 127.0.0.1 unless told otherwise; on any other address it refuses to start without a
token (--token or JAXCELL_TOKEN), and every request but /health must then carry
`Authorization: Bearer <token>`. The modules: app (routes), engine (the compiled program and the
dynamic batcher), uploads (multipart in memory), card (the model card), static/ (the page).
"""

from __future__ import annotations

import ipaddress
import os
import socket

from jaxcell.errors import UserError

TOKEN_ENV = "JAXCELL_TOKEN"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # another host name: it may resolve anywhere
        return False


def check_exposure(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token."""
    if not is_loopback(host) and not token:
        raise UserError(f"refusing to listen on {host} without a token: anyone who can reach it could use the "
                        f"model; pass --token T (or set {TOKEN_ENV}), or keep the default --host 127.0.0.1")


def check_port(host: str, port: int) -> None:
    """Fail now, not after loading and compiling, when the address cannot be listened on."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {port}")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            s.bind((host, port))
    except OSError as error:
        raise UserError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


def command(args) -> int:
    import uvicorn

    from jaxcell import compilation_cache
    from jaxcell.inference import Predictor
    from jaxcell.serve.app import create_app
    from jaxcell.serve.card import model_card
    from jaxcell.serve.engine import Engine

    token = args.token or os.environ.get(TOKEN_ENV) or None
    check_exposure(args.host, token)  # before any work
    check_port(args.host, args.port)
    if args.max_upload_mb <= 0:
        raise UserError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    if args.no_compile_cache:
        compilation_cache.disable()
    else:  # the command turned it on; small models compile in well under its threshold, so keep every program
        compilation_cache.enable(min_compile_seconds=0.0)
    source = args.workdir or args.weights
    predictor = Predictor.load(source, args.checkpoint, fit_temperature=True, log=lambda m: print(f"serve: {m}"))
    engine = Engine(predictor, args.batch_size, args.max_wait_ms, args.cam_layer, args.concurrent_batches)
    s = engine.startup
    print(f"serve: {predictor.record['model']} from {source} (step {predictor.step}); compiled for batches of "
          f"{', '.join(map(str, s['batch_sizes_compiled']))} in {s['compile_seconds']:.2f}s"
          + (" (from the persistent compilation cache)" if s["from_persistent_cache"] else "")
          + f", warmed up in {s['warmup_seconds']:.2f}s; up to {s['concurrent_batches']} batches at once; "
          + ("no OOD detector" if predictor.detector is None else f"OOD detector: {predictor.detector.method}"),
          flush=True)
    app = create_app(engine, model_card(predictor, s), token=token,
                     max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=int(args.max_megapixels * 1e6))
    print(f"serve: listening on http://{args.host}:{args.port}/" + (" (token required)" if token else ""), flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.close()
    return 0
