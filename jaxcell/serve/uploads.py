"""Multipart uploads read into memory, never onto disk, with their sizes bounded while they stream.

Starlette's own form parser spools files over 1 MB to a temporary file on disk; here python-multipart's
streaming parser hands each part's bytes to a callback that keeps them in memory and stops the request
as soon as a file passes the size limit, so a large upload is refused after reading at most the limit.
"""

from __future__ import annotations

from python_multipart.multipart import MultipartParser, parse_options_header

IMAGE_FIELD = "image"
MAX_NAME = 200  # characters of a client's file name kept for the answer (it is shown, never opened)


class BadRequest(Exception):
    """A request the server refuses: HTTP status and a one-line message naming the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _megabytes(n: int) -> str:
    return f"{n / 2**20:g} MB"


async def read_images(request, max_file_bytes: int, max_files: int) -> list[tuple[str, bytes]]:
    """(file name, bytes) of each multipart field named "image", in order."""
    kind, params = parse_options_header(request.headers.get("content-type", ""))
    if kind != b"multipart/form-data" or b"boundary" not in params:
        shown = request.headers.get("content-type") or "none"
        raise BadRequest(415, f"wrong content type ({shown}): send the images as multipart/form-data, "
                              f"one or more fields named {IMAGE_FIELD!r}")
    limit = max_files * (max_file_bytes + 64 * 1024)  # every file at its limit, and room for the part headers
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"request of {_megabytes(int(declared))} is over the limit of {max_files} images "
                              f"of at most {_megabytes(max_file_bytes)} each")

    files: list[tuple[str, bytes]] = []
    part = {"headers": [], "field": None}

    def on_part_begin():
        part.update(headers=[], name=None, filename=None, data=bytearray(), field=b"")

    def on_header_field(data, start, end):
        part["field"] += data[start:end]

    def on_header_value(data, start, end):
        part["headers"].append((part["field"], bytes(data[start:end])))
        part["field"] = b""

    def on_headers_finished():
        for key, value in part["headers"]:
            if key.lower() == b"content-disposition":
                _, options = parse_options_header(value)
                part["name"] = options.get(b"name", b"").decode("utf-8", "replace")
                filename = options.get(b"filename")
                part["filename"] = None if filename is None else filename.decode("utf-8", "replace")[:MAX_NAME]
        if part["name"] == IMAGE_FIELD and len(files) >= max_files:
            raise BadRequest(413, f"more than {max_files} images in one request")

    def on_part_data(data, start, end):
        if part["name"] != IMAGE_FIELD:
            return  # other fields are ignored, and not kept
        part["data"] += data[start:end]
        if len(part["data"]) > max_file_bytes:
            raise BadRequest(413, f"{part['filename'] or 'an image'}: over the upload limit of "
                                  f"{_megabytes(max_file_bytes)} (--max-upload-mb)")

    def on_part_end():
        if part["name"] == IMAGE_FIELD:
            files.append((part["filename"] or f"image {len(files) + 1}", bytes(part["data"])))

    parser = MultipartParser(params[b"boundary"], {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_headers_finished": on_headers_finished, "on_part_data": on_part_data, "on_part_end": on_part_end})
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except BadRequest:
        raise
    except Exception as error:  # python-multipart's MultipartParseError and friends
        raise BadRequest(400, f"malformed multipart body: {error}") from None
    if not files:
        raise BadRequest(400, f"no image: send one or more multipart fields named {IMAGE_FIELD!r}")
    empty = [name for name, data in files if not data]
    if empty:
        raise BadRequest(422, f"{empty[0]}: empty file")
    return files
