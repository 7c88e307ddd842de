"""The page and API with a bearer token and a CORS origin, in a real browser (Debian's Chromium)
against a real Serve app; one app and one browser for the module."""

from __future__ import annotations

import pytest
import requests

from pipeline.search.web import token_sha256
from tests.web.conftest import PageLog, serve_web

TOKEN = "s3cret-token-for-the-web-tests-0123"
ORIGIN = "http://allowed.example"
UNAUTHORIZED = {"error": "unauthorized", "status": 401}


@pytest.fixture(scope="module")
def app(web_store):
    store, report = web_store
    web = {"auth_token_sha256": token_sha256(TOKEN), "cors_origins": [ORIGIN]}
    with serve_web(store, web, "web_auth", headers={"Authorization": f"Bearer {TOKEN}"}) as url:
        yield url


@pytest.mark.parametrize(
    "path",
    [
        "/healthz",
        "/info",
        "/similar/hw_city",
        "/api/tracks?q=city",
        "/api/runs",
        "/audio/hw_rock",
        "/api/map",
    ],
)
def test_requests_without_the_token_get_401_without_detail(app, path) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": TOKEN},
        {"Cookie": "musicfm_session=x"},
    ):
        r = requests.get(app + path, headers=headers, timeout=10)
        assert r.status_code == 401 and r.json() == UNAUTHORIZED, (path, headers)
        assert r.headers["www-authenticate"] == "Bearer"
    ok = requests.get(app + path, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert ok.status_code == 200, (path, ok.text[:200])


def test_uploads_and_posts_need_the_token_too(app) -> None:
    r = requests.post(app + "/api/upload", data=b"x" * 100, headers={"content-type": "audio/ogg"}, timeout=10)
    assert r.status_code == 401 and r.json() == UNAUTHORIZED
    r = requests.post(app + "/search", json={"track_id": "hw_city"}, timeout=10)
    assert r.status_code == 401


def test_the_page_shell_is_public_but_holds_no_data(app) -> None:
    r = requests.get(app + "/", timeout=10)
    assert r.status_code == 200 and "MusicFM catalog" in r.text and "hw_city" not in r.text
    assert requests.get(app + "/static/app.js", timeout=10).status_code == 200


def test_cors_only_for_the_configured_origin(app) -> None:
    pre = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"}
    r = requests.options(app + "/api/tracks", headers={"Origin": ORIGIN, **pre}, timeout=10)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = requests.options(app + "/api/tracks", headers={"Origin": "http://evil.example", **pre}, timeout=10)
    assert "access-control-allow-origin" not in r.headers
    r = requests.get(
        app + "/api/tracks?q=rock", headers={"Origin": ORIGIN, "Authorization": f"Bearer {TOKEN}"}, timeout=10
    )
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN


def test_the_page_asks_for_the_token_then_works(browser, app, artifacts) -> None:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    pg.set_default_timeout(30_000)
    log = PageLog(pg)
    pg.goto(app + "/")
    pg.wait_for_selector("#token-dialog[open]")
    pg.screenshot(path=str(artifacts / "10_token_dialog.png"))
    pg.fill("#token-input", "not-the-token")
    pg.click("#token-form button[type=submit]")
    pg.wait_for_selector("#token-error:not([hidden])")
    assert pg.is_visible("#token-dialog[open]")
    pg.fill("#token-input", TOKEN)
    pg.click("#token-form button[type=submit]")
    pg.wait_for_selector("body[data-ready='1']")
    assert not pg.is_visible("#token-dialog[open]")
    assert pg.text_content("#store-info").startswith("12 tracks")
    pg.fill("#find", "rock")
    pg.wait_for_selector("#find-results li[data-track-id='hw_rock']").click()
    pg.wait_for_selector("#results[data-query='hw_rock'] li.hit")
    # <audio> cannot send headers: the HttpOnly session cookie set by /api/login authorizes it
    pg.wait_for_function("() => document.getElementById('query-audio').readyState >= 1")
    assert abs(pg.evaluate("document.getElementById('query-audio').duration") - 20.0) < 0.1
    assert pg.evaluate("document.cookie") == ""  # HttpOnly: invisible to scripts
    for _ in range(50):  # its "response" event may reach this process a moment later
        if log.audio:
            break
        pg.wait_for_timeout(200)
    assert all(status in (200, 206) for _, status, _ in log.audio) and log.audio
    # the only console errors are the refused requests before the token was given
    assert all("401" in e for e in log.errors), log.errors
    ctx.close()
