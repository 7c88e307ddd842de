"""The catalog page in a real browser (Debian's Chromium via Playwright) against a real Serve app
over a real store built from shared/audio. One app and one browser for the module."""

from __future__ import annotations

import time

import lance
import numpy as np
import pyarrow as pa
import pytest
import requests

from pipeline.search.reader import open_store
from tests.conftest import AUDIO
from tests.web.conftest import HOSTILE_TITLE, HOSTILE_TRACK, PageLog, copy_store, serve_web

LAYER = 3


@pytest.fixture(scope="module")
def app(web_store, tmp_path_factory):
    store, report = web_store
    # a copy: the map and duplicates tests add to it
    mine = copy_store(store, tmp_path_factory.mktemp("web-page") / "store")
    with serve_web(mine, {}, "web_page") as url:
        yield url, mine, report


@pytest.fixture
def page(browser, app):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    pg.set_default_timeout(30_000)
    log = PageLog(pg)
    yield pg, log, app[0]
    ctx.close()


def _open(pg, url: str, view: str = "search") -> None:
    pg.goto(f"{url}/#{view}")
    pg.wait_for_selector("body[data-ready='1']")


def _find_and_pick(pg, text: str, track_id: str) -> None:
    pg.fill("#find", text)
    pg.wait_for_selector(f"#find-results li[data-track-id='{track_id}']").click()
    pg.wait_for_selector(f"#results[data-query='{track_id}'] li.hit")


def _hits(pg) -> list[str]:
    return pg.eval_on_selector_all("#results li.hit", "els => els.map(e => e.dataset.trackId)")


def test_page_loads_without_console_errors(page, artifacts) -> None:
    pg, log, url = page
    r = requests.get(url + "/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    _open(pg, url)
    assert pg.text_content("#store-info").startswith("12 tracks")
    assert pg.eval_on_selector_all("#layer option", "o => o.map(x => x.value)") == ["1", "3"]
    pg.screenshot(path=str(artifacts / "01_empty.png"))
    assert log.errors == [] and log.dialogs == []
    print(f"\nscreenshots in {artifacts}")


def test_title_search_finds_the_track_and_similar_list_matches_the_library(page, app, artifacts) -> None:
    pg, log, url = page
    _, store, _ = app
    _open(pg, url)
    pg.fill("#find", "cit")  # prefix of "City" and "City Blues"
    pg.wait_for_selector("#find-results li[data-track-id='hw_city']")
    found = pg.eval_on_selector_all("#find-results li", "els => els.map(e => e.dataset.trackId)")
    assert found[:2] == ["hw_city", "lc_city_blues"], found
    pg.click("#find-results li[data-track-id='hw_city']")
    pg.wait_for_selector("#results[data-query='hw_city'] li.hit")
    expected = [h.track_id for h in open_store(str(store)).search("hw_city", layer=LAYER, k=10)]
    assert _hits(pg) == expected
    assert (
        expected[0] == "fb_mainzik_1p"
    )  # measured: the nearest clip to City (tests/search/test_variants.py)
    scores = [float(s) for s in pg.eval_on_selector_all("#results .score", "e => e.map(x => x.textContent)")]
    assert scores == sorted(scores, reverse=True) and 0.9 < scores[0] < 1.0
    assert pg.get_attribute("#query-audio", "src").endswith("/audio/hw_city")
    pg.screenshot(path=str(artifacts / "02_similar.png"), full_page=True)
    assert log.errors == []


def test_result_player_plays_and_seeks_with_a_range_request(page) -> None:
    pg, log, url = page
    _open(pg, url)
    _find_and_pick(pg, "city", "hw_city")
    audio = pg.locator("#results li[data-track-id='hw_rock'] audio")  # a 20.0 s WAV
    audio.evaluate("a => a.muted = true")
    pg.wait_for_function(
        "a => a.readyState >= 1 && isFinite(a.duration)", arg=audio.element_handle(), timeout=30_000
    )
    duration = audio.evaluate("a => a.duration")
    assert abs(duration - 20.0) < 0.1, duration
    before = len(log.audio)
    # past what the first (ranged, 206) request buffered: Chromium buffers ~14 s of this file and
    # then idles, so a seek to the middle may need no request at all (it once failed that way)
    target = audio.evaluate(
        "a => new Promise(done => { const t = a.duration - 1; a.addEventListener('seeked', () => done(t),"
        " {once: true}); a.currentTime = t; })"
    )
    pg.wait_for_function("a => a.readyState >= 2", arg=audio.element_handle(), timeout=30_000)
    assert abs(audio.evaluate("a => a.currentTime") - target) < 0.5

    def state() -> tuple[list, list]:
        answers = [(s, r) for u, s, r in log.audio if u.endswith("/audio/hw_rock")]
        buffered = audio.evaluate(
            "a => Array.from({length: a.buffered.length}, (_, i) => [a.buffered.start(i), a.buffered.end(i)])"
        )
        return answers, buffered

    def seek_served_by_ranges() -> bool:
        """Every answer for the file was a 206 to a Range request, and the seek target was either
        asked for by a Range request past byte 0 or is buffered (the first request streamed on)."""
        answers, buffered = state()
        later = [(s, r) for u, s, r in log.audio[before:] if u.endswith("/audio/hw_rock")]
        asked = any(r and not r.startswith("bytes=0-") for _, r in later)
        covered = any(a <= target <= b for a, b in buffered)
        return bool(answers) and all(s == 206 and r for s, r in answers) and (asked or covered)

    # the page's "response" events reach this process asynchronously: give them a moment to arrive
    deadline = time.monotonic() + 10
    while not seek_served_by_ranges() and time.monotonic() < deadline:
        pg.wait_for_timeout(200)
    assert seek_served_by_ranges(), (state(), before, target)
    # and the server's answer itself
    size = int(requests.head(f"{url}/audio/hw_rock", timeout=10).headers["content-length"])
    r = requests.get(f"{url}/audio/hw_rock", headers={"Range": f"bytes={size // 2}-"}, timeout=10)
    assert r.status_code == 206 and r.headers["content-range"] == f"bytes {size // 2}-{size - 1}/{size}"
    assert r.headers["content-type"] == "audio/wav" and len(r.content) == size - size // 2
    assert (
        requests.get(f"{url}/audio/hw_rock", headers={"Range": f"bytes={size}-"}, timeout=10).status_code
        == 416
    )
    assert log.errors == []


def test_window_level_finds_this_passage_with_offsets(page, app, artifacts) -> None:
    pg, log, url = page
    _open(pg, url)
    _find_and_pick(pg, "frozen bubble intro", "fb_introzik")
    pg.select_option("#level", "window")
    pg.wait_for_selector("#window-buttons button[data-window-ix='1']").click()
    pg.wait_for_selector("#results[data-query='fb_introzik@1'] li.hit .offset")
    doc = requests.get(
        f"{url}/api/passage/fb_introzik", params={"window_ix": 1, "layer": LAYER, "k": 10}, timeout=30
    ).json()
    assert doc["query_window"] == {"window_ix": 1, "start_s": 10.0, "end_s": 20.0}
    want = [h["track_id"] for h in doc["hits"]]  # near-equal scores may swap places between calls
    assert _hits(pg)[0] == want[0] and set(_hits(pg)) == set(want) and "fb_introzik" not in _hits(pg)
    first = doc["hits"][0]
    src = pg.get_attribute(f"#results li[data-track-id='{first['track_id']}'] audio", "src")
    if first["start_s"]:
        assert src.endswith(f"#t={first['start_s']:.2f}")
    # the player starts at the offset of the matching window
    offsets = {h["track_id"]: h["start_s"] for h in doc["hits"]}
    tid, start = next((t, s) for t, s in offsets.items() if s and s > 0)
    pl = pg.locator(f"#results li[data-track-id='{tid}'] audio")
    pg.wait_for_function("a => a.readyState >= 1", arg=pl.element_handle())
    assert abs(pl.evaluate("a => a.currentTime") - start) < 0.05
    pg.screenshot(path=str(artifacts / "03_passage.png"), full_page=True)
    assert log.errors == []


@pytest.mark.parametrize("how", ["picker", "drop"])
def test_uploading_a_transformed_copy_puts_its_source_first(page, artifacts, how) -> None:
    pg, log, url = page
    _open(pg, url)
    variant, source = {
        "picker": ("hw_city_crop3s.ogg", "hw_city"),
        "drop": ("hw_oriental_reencode.ogg", "hw_oriental"),
    }[how]
    path = AUDIO / "variants" / variant
    if how == "picker":
        pg.set_input_files("#file", str(path))
    else:
        data = list(path.read_bytes())
        pg.evaluate(
            """([name, bytes]) => {
                const dt = new DataTransfer();
                dt.items.add(new File([new Uint8Array(bytes)], name, {type: 'audio/ogg'}));
                document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
            }""",
            [variant, data],
        )
    pg.wait_for_selector(f"#results[data-query='upload:{variant}'] li.hit", timeout=120_000)
    assert _hits(pg)[0] == source
    assert pg.text_content("#query-meta .title") == variant
    assert pg.get_attribute("#query-audio", "src").startswith("blob:")
    pg.screenshot(path=str(artifacts / f"04_upload_{how}.png"), full_page=True)
    assert log.errors == []


def test_upload_over_the_limit_is_refused_with_a_readable_message(page) -> None:
    pg, _, url = page
    r = requests.post(
        f"{url}/api/upload", data=b"\0" * (4 * 2**20 + 1), headers={"content-type": "audio/wav"}, timeout=30
    )
    assert r.status_code == 413 and r.json()["status"] == 413 and "over the limit" in r.json()["error"]
    _open(pg, url)
    pg.evaluate(
        """() => {
            const dt = new DataTransfer();
            dt.items.add(new File([new Uint8Array(4 * 1024 * 1024 + 1)], 'big.wav', {type: 'audio/wav'}));
            document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
        }"""
    )
    pg.wait_for_selector("#error:not([hidden])")
    assert "over the limit" in pg.text_content("#error")


def test_hostile_title_renders_as_text(page, artifacts) -> None:
    pg, log, url = page
    _open(pg, url)
    pg.fill("#find", "img onerror")
    li = pg.wait_for_selector(f"#find-results li[data-track-id='{HOSTILE_TRACK}']")
    assert li.query_selector(".title").text_content() == HOSTILE_TITLE
    li.click()
    pg.wait_for_selector(f"#results[data-query='{HOSTILE_TRACK}'] li.hit")
    assert pg.text_content("#query-meta .title") == HOSTILE_TITLE
    _find_and_pick(pg, "city", "hw_city")
    titles = pg.eval_on_selector_all("#results .title", "e => e.map(x => x.textContent)")
    assert HOSTILE_TITLE in titles
    assert pg.evaluate("document.querySelectorAll('img').length") == 0
    pg.wait_for_timeout(300)
    assert log.dialogs == [] and log.errors == []
    pg.screenshot(path=str(artifacts / "05_hostile_title.png"), full_page=True)


def test_runs_view_shows_the_run_that_built_the_store(page, app, artifacts) -> None:
    pg, log, url = page
    _, _, report = app
    _open(pg, url, "runs")
    row = pg.wait_for_selector(f"#runs-table tr[data-run-id='{report.run_id}']")
    cells = [c.text_content() for c in row.query_selector_all("td")]
    assert cells[1:3] == ["embed", "ok"] and cells[4:7] == ["12", "1", str(report.windows)]
    assert "DecodeError 1" in cells[10]
    assert pg.locator(f"#runs-chart rect[data-run-id='{report.run_id}']").count() == 1
    row.click()
    pg.wait_for_selector("#errors-table tbody tr")
    assert pg.eval_on_selector_all(
        "#errors-table tbody td:first-child", "e => e.map(x => x.textContent)"
    ) == ["broken"]
    pg.fill("#errors-filter", "no such text")
    pg.wait_for_function("() => document.querySelectorAll('#errors-table tbody tr').length === 0")
    pg.fill("#errors-filter", "format not")
    pg.wait_for_selector("#errors-table tbody tr")
    assert pg.text_content("#errors-count") == "1 errors"
    pg.select_option("#errors-stage", "decode")
    pg.wait_for_selector("#errors-table tbody tr")
    pg.screenshot(path=str(artifacts / "06_runs.png"), full_page=True)
    assert log.errors == []


def test_map_and_duplicates_views_hint_then_show(page, app, artifacts) -> None:
    pg, log, url = page
    _, store, _ = app
    _open(pg, url, "map")
    hint = pg.wait_for_selector("#map-hint:not([hidden])").text_content()
    assert "python jobs/catalog_map.py --store" in hint and "--layer N" in hint
    pg.screenshot(path=str(artifacts / "07_map_hint.png"))
    pg.click("#tabs button[data-view=duplicates]")
    assert "jobs/find_duplicates.py" in pg.wait_for_selector("#dup-hint:not([hidden])").text_content()

    # what jobs/catalog_map.py and jobs/find_duplicates.py would add
    ds = lance.dataset(str(store / "tracks.lance"))
    t = ds.to_table(columns=["track_id", f"layer_{LAYER}"])
    vec = np.stack(t.column(f"layer_{LAYER}").to_numpy(zero_copy_only=False))  # (N, D)
    xy = (vec - vec.mean(0)) @ np.linalg.svd(vec - vec.mean(0), full_matrices=False)[2][:2].T  # (N, 2)
    ds.merge(
        pa.table(
            {
                "track_id": t.column("track_id"),
                "map_x": xy[:, 0].astype("float32"),
                "map_y": xy[:, 1].astype("float32"),
            }
        ),
        left_on="track_id",
    )
    lance.write_dataset(
        pa.table(
            {
                "group_id": [1, 2],
                "track_id": ["hw_city", "fb_mainzik_1p"],
                "match_track_id": ["fb_mainzik_1p", "fb_mainzik_2p"],
                "score": [0.994, 0.991],
            }
        ),
        str(store / "duplicates.lance"),
    )
    time.sleep(0.5)  # the app reopens tables every 0.3 s
    pg.reload()
    pg.wait_for_selector("body[data-ready='1']")
    rows = pg.wait_for_selector("#dup-table:not([hidden]) tbody tr")
    assert [c.text_content() for c in rows.query_selector_all("td")][:5] == [
        "1",
        "hw_city",
        "City",
        "fb_mainzik_1p",
        "Frozen Bubble main theme (1 player)",
    ]
    pg.screenshot(path=str(artifacts / "08_duplicates.png"))
    pg.click("#tabs button[data-view=map]")
    pg.wait_for_selector("#map circle")
    assert pg.locator("#map circle").count() == 12
    assert pg.eval_on_selector_all("#map-color option", "o => o.map(x => x.value)") == [
        "title",
        "artist",
        "license",
    ]
    pg.select_option("#map-color", "license")
    pg.wait_for_function(
        "() => document.querySelectorAll('#map-legend span.swatch').length === 2"
    )  # GPL-2, GPL-2+
    pg.screenshot(path=str(artifacts / "09_map.png"))
    pg.click("#map circle[data-track-id='hw_snow']")
    pg.wait_for_selector("#results[data-query='hw_snow'] li.hit")
    assert pg.text_content("#query-meta .title") == "Snow"
    assert log.errors == []


def test_errors_are_json_and_no_cors_without_the_flag(app) -> None:
    url = app[0]
    for path, status in (
        ("/nope", 404),
        ("/api/track/no-such", 404),
        ("/audio/no-such", 404),
        ("/api/tracks?limit=x", 400),
    ):
        r = requests.get(url + path, timeout=10)
        assert r.status_code == status and r.json()["status"] == status and "\n" not in r.json()["error"], (
            path
        )
    r = requests.get(url + "/api/tracks?q=rock", headers={"Origin": "http://elsewhere.example"}, timeout=10)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    assert r.json()["tracks"][0]["track_id"] == "hw_rock"


def test_audio_serves_only_stored_uris_within_the_runs_policy(app, web_store) -> None:
    """Last in the module: it rewrites a stored URI. A URI outside the allowed prefixes, or a
    symlink inside them that escapes, is 403; a path in the request is never a file path."""
    url, store, _ = app
    root = web_store[0].parent  # an allowed prefix of the run that built the store
    (root / "escape.wav").symlink_to("/etc/hostname")
    ds = lance.dataset(str(store / "tracks.lance"))
    for uri, needle in (
        ("/etc/hostname", "outside the allowed prefixes"),
        (str(root / "escape.wav"), "symlink escape"),
    ):
        ds.update({"uri": "'" + uri + "'"}, where="track_id = 'hw_fruit'")
        ds = lance.dataset(str(store / "tracks.lance"))
        time.sleep(0.5)  # the app reopens tables every 0.3 s
        r = requests.get(f"{url}/audio/hw_fruit", timeout=10)
        assert r.status_code == 403 and needle in r.json()["error"], r.text
    for path in ("/audio/..%2F..%2Fetc%2Fhostname", "/audio//etc/hostname", "/audio/%2Fetc%2Fhostname"):
        r = requests.get(url + path, timeout=10)
        assert r.status_code == 404 and r.json()["status"] == 404, (path, r.text)


def test_create_api_serves_the_page_without_ray(web_store) -> None:
    """The same routes on plain FastAPI (``create_api(..., web=...)``) under uvicorn."""
    import threading

    import uvicorn

    from pipeline.search.service import SearchService, create_api
    from tools.testkit.net import free_port

    store, _ = web_store
    api = create_api(SearchService(str(store)), web={"cors_origins": ["http://ok.example"]})
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    try:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        assert requests.get(url + "/", timeout=10).headers["content-type"].startswith("text/html")
        r = requests.get(url + "/api/tracks?q=snow", headers={"Origin": "http://ok.example"}, timeout=10)
        assert [t["track_id"] for t in r.json()["tracks"]] == ["hw_snow"]
        assert r.headers["access-control-allow-origin"] == "http://ok.example"
        r = requests.get(url + "/audio/hw_snow", headers={"Range": "bytes=0-9"}, timeout=10)
        assert r.status_code == 206 and len(r.content) == 10 and r.headers["content-type"] == "audio/mpeg"
        assert r.content == (AUDIO / "clips" / "hw_snow.mp3").read_bytes()[:10]
    finally:
        server.should_exit = True
        th.join(10)
