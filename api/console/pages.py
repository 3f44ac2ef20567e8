"""The console's HTML pages and static files: `/` redirects to `/console/runs`; `/console/{page}` renders a page;
`/console/static/{file}` serves the packaged JS, CSS and vendored libraries (nothing is fetched from a CDN).

Pages carry no tenant data and need no API key: the browser fills them in through the REST routes (see
`api/console/__init__.py`). Their Content-Security-Policy lets them load and call this server only, and forbids
framing them. None of these routes is in the OpenAPI schema.

Limits: static files are served from the package folder with a one-hour cache lifetime; only files that exist
under `static/` are served, anything else is a 404 like an unknown page.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from api.errors import not_found

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
PAGES = {
    "runs": "Training runs",
    "playground": "Playground",
    "aliases": "Aliases",
    "keys": "API keys",
    "usage": "Usage",
    "queue": "Queue",
    "tenants": "Tenants",
}
"""Page name -> title, in the order the navigation lists them."""
OPERATOR_PAGES = frozenset({"tenants"})
"""Pages whose navigation link shows only for an operator's key (the browser asks the admin route; see
`static/console.js`). Anyone may open them: the page then says it is for operators only."""
POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'"
)
"""Content-Security-Policy of every page: scripts, styles and requests from this server only (uPlot sets inline
styles), and no framing."""

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=HERE / "templates")


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/console/runs", status_code=307)


@router.get("/console")
def console_root() -> RedirectResponse:
    return RedirectResponse("/console/runs", status_code=307)


@router.get("/console/static/{name:path}")
def static_file(name: str) -> FileResponse:
    path = (STATIC / name).resolve()
    if not path.is_relative_to(STATIC) or not path.is_file():
        raise not_found(f"no console file {name!r}")
    return FileResponse(path, headers={"Cache-Control": "public, max-age=3600"})


@router.get("/console/{page}", response_class=HTMLResponse)
def console_page(page: str, request: Request) -> HTMLResponse:
    if page not in PAGES:
        raise not_found(f"no console page {page!r}; pages: {', '.join(PAGES)}")
    context = {"page": page, "pages": PAGES, "operator_pages": OPERATOR_PAGES, "title": PAGES[page]}
    return templates.TemplateResponse(request, f"{page}.html", context, headers={"Content-Security-Policy": POLICY})
