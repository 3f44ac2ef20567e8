"""The web console's pages and files as the API process serves them (in-process, no model): `/` leads to the console,
each page renders with its sign-in form, the operators' page is linked hidden (the browser shows it for an
operator's key), unknown pages and paths outside `static/` answer 404, nothing is loaded from another origin, every
console file ships in the package, and no console route is in the OpenAPI schema. What the pages do in a browser is
tested in tests/e2e/test_console.py."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import build_state, create_app
from api.console.pages import HERE, OPERATOR_PAGES, PAGES
from contract.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[TestClient]:
    state = build_state(Settings(data_dir=tmp_path, base_models=["tiny-kimi-k2"], queue="external"))
    with TestClient(create_app(state=state)) as client:
        yield client


def test_the_servers_url_leads_to_the_console(browser: TestClient) -> None:
    for path in ("/", "/console"):
        answer = browser.get(path, follow_redirects=False)
        assert answer.status_code == 307 and answer.headers["location"] == "/console/runs"


@pytest.mark.parametrize("page", sorted(PAGES))
def test_each_page_renders_with_a_labelled_sign_in_form(browser: TestClient, page: str) -> None:
    answer = browser.get(f"/console/{page}")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
    html = answer.text
    assert f"<title>{PAGES[page]} · Loom</title>" in html
    assert "default-src 'self'" in answer.headers["content-security-policy"]
    assert '<label for="api-key">API key</label>' in html and 'id="api-key"' in html
    assert f'href="/console/{page}" aria-current="page"' in html
    for script in re.findall(r'<script src="([^"]+)"', html):
        assert browser.get(script).status_code == 200, script
    ids = set(re.findall(r'<(?:input|select|textarea)[^>]* id="([^"]+)"', html))
    assert ids and ids <= set(re.findall(r'<label for="([^"]+)"', html))  # every form control has a label


def test_only_the_operators_pages_link_is_hidden_until_the_browser_asks(browser: TestClient) -> None:
    html = browser.get("/console/runs").text
    hidden = re.findall(r'<li data-operators-only hidden>\s*<a href="/console/(\w+)"', html)
    assert hidden == sorted(OPERATOR_PAGES) == ["tenants"]
    assert len(re.findall(r'<li>\s*<a href="/console/', html)) == len(PAGES) - len(OPERATOR_PAGES)


def test_unknown_pages_and_paths_outside_static_answer_404(browser: TestClient) -> None:
    assert browser.get("/console/admin").json()["error"]["code"] == "not_found"
    assert browser.get("/console/static/vendor/uPlot.iife.min.js").status_code == 200
    for path in ("/console/static/%2e%2e/pages.py", "/console/static/nope.js", "/console/static/vendor"):
        assert browser.get(path).status_code == 404, path


def test_nothing_is_loaded_from_another_origin() -> None:
    for path in (HERE / "templates").iterdir():
        assert not re.search(r'(src|href)="(https?:)?//', path.read_text()), path
    for path in (HERE / "static").glob("*.js"):
        assert not re.search(r"https?://", path.read_text()), path


def test_every_console_file_ships_in_the_package() -> None:
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["api.console"]
    files = [p.relative_to(HERE).as_posix() for p in HERE.rglob("*") if p.is_file() and p.suffix != ".py"]
    files = [f for f in files if "__pycache__" not in f]
    assert files and all(any(fnmatch.fnmatch(f, pattern) for pattern in patterns) for f in files), files


def test_console_routes_stay_out_of_the_openapi_schema(browser: TestClient) -> None:
    paths = browser.get("/openapi.json").json()["paths"]
    assert "/api/v1/training_runs/{run_id}/metrics" in paths
    assert not [path for path in paths if path == "/" or path.startswith("/console")]
