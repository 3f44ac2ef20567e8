"""The web console: server-rendered pages (Jinja2) plus a small vendored JS layer (plain `fetch`, uPlot charts).

The pages only lay out forms and tables; every action runs in the browser against the same REST routes the SDKs
use, with the API key the user signed in with (kept in the tab's sessionStorage) in the `X-API-Key` header. The
console has no routes, data or permissions of its own (`pages.py` serves pages and static files, nothing else).
"""
