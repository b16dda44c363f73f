"""The dashboard's static files at `/ui`, served from the installed package.

The files are plain HTML, CSS and JavaScript modules: nothing is built at install
time and nothing is fetched from elsewhere. The page talks to the gateway over
the WebSocket protocol like any other client, so this module only serves files.
It serves the names it finds in the package's `ui` directory and nothing else,
and tells the browser to load scripts and open connections only from the
gateway itself.
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}
SECURITY_HEADERS = {
    # Scripts, styles and WebSocket connections from this gateway only; no framing by other pages.
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def load_files() -> dict[str, tuple[bytes, str]]:
    """name -> (content, content type) of every servable file in the package's `ui` directory."""
    files: dict[str, tuple[bytes, str]] = {}
    for entry in resources.files("clawgate.ui").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        if entry.is_file() and suffix in CONTENT_TYPES:
            files[entry.name] = (entry.read_bytes(), CONTENT_TYPES[suffix])
    return files


def ui_routes() -> list[BaseRoute]:
    files = load_files()  # read once: the files are part of the installed package

    async def redirect(request: Request) -> Response:
        return RedirectResponse("/ui/", status_code=307)

    async def serve(request: Request) -> Response:
        name = request.path_params.get("name") or "index.html"
        found = files.get(name)
        if found is None:
            return Response("not found", status_code=404, media_type="text/plain")
        body, media_type = found
        return Response(body, media_type=media_type, headers=SECURITY_HEADERS)

    return [
        Route("/ui", redirect),
        Route("/ui/", serve),
        Route("/ui/{name:str}", serve),
    ]
