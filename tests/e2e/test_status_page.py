"""The status page (GET /) and the API page (GET /docs), in a real browser: Debian's chromium,
headless, driven by Playwright. These tests fail, never skip, where no browser is installed
(.ci/run installs it). The status page's screenshot is kept as a test artifact."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from tests.helpers import RECIPES, ROOT, TEST_RECIPES, Server, serve, wait_until
from tests.webhook_receiver import ALLOW_LOCAL, Receiver

pytestmark = pytest.mark.timeout(240)

ARTIFACTS = Path(os.environ.get("FASTDEPLOY_TEST_ARTIFACTS", ROOT / "test-artifacts"))
KEY = "status-page-key-0123456789"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    executable = os.environ.get("FASTDEPLOY_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.fail("no chromium on PATH: install Debian's chromium package (.ci/run does) to run the page tests")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


def open_page(browser: Any, url: str) -> Any:
    # bypass_csp: Playwright's own waiting runs scripts that our Content-Security-Policy forbids
    # (the header itself is checked over plain HTTP below); errors on the page fail the test
    page = browser.new_context(viewport={"width": 1280, "height": 1000}, bypass_csp=True).new_page()
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.on("console", lambda message: page.errors.append(message.text) if message.type == "error" else None)
    page.goto(url)
    return page


def wait_for_page(page: Any, condition: str, timeout: int) -> None:
    """Wait for ``condition`` on the page; on a timeout, say what the page showed."""
    from playwright.sync_api import TimeoutError as PageTimeout

    try:
        page.wait_for_function(condition, timeout=timeout)
    except PageTimeout:
        raise AssertionError(f"the page never showed {condition}; it showed:\n{page.inner_text('body')}") from None


def shown(page: Any, selector: str) -> str:
    return page.locator(selector).inner_text().strip()


def test_the_status_page_shows_the_requests_sent_live(browser: Any) -> None:
    """A known number of requests, one failure and one delivered webhook: the page shows those counts,
    a throughput chart with points, the batch sizes used, the loop with its pid and device."""
    sent, items_each = 12, 3
    with Receiver() as receiver, serve(TEST_RECIPES / "faulty", args=ALLOW_LOCAL) as server:
        page = open_page(browser, server.url + "/")
        page.wait_for_function("Number(document.body.dataset.polls || 0) >= 2")
        assert shown(page, "#state") == "ready"
        for i in range(sent):
            assert server.post("/sync", {"data": [f"x{i}"] * items_each}).status_code == 200
        failed = server.post("/sync", {"data": ["boom"]}).json()
        hooked = server.post("/async", {"data": ["hook"], "webhook": receiver.url + "/ok"}).json()["unique_id"]
        wait_until(lambda: receiver.received("/ok"), 30, "the webhook")
        total_items = sent * items_each + 1  # and the webhook job; a call that raised predicted nothing
        wait_for_page(page, 
            f"document.querySelector('#stage-0 dd.items')?.textContent === '{total_items}'"
            " && document.getElementById('requests-total').textContent === '14'"
            " && document.getElementById('webhooks').textContent === '0 · 1 · 0'"
            " && Number(document.getElementById('throughput-chart').dataset.max) > 0"
            " && document.querySelectorAll('#failures tbody tr').length === 1",
            timeout=30_000,
        )
        assert shown(page, "#failures tbody tr td:nth-child(2)") == failed["unique_id"]
        assert "cannot predict 'boom'" in shown(page, "#failures tbody tr td.reason")
        assert int(page.get_attribute("#batch-hist-0", "data-calls")) >= 1
        assert int(page.get_attribute("#throughput-chart", "data-points")) >= 1
        meta = server.get("/meta").json()
        (worker,) = meta["stages"][0]["workers"]
        cells = page.locator("#workers-0 tbody tr td").all_inner_texts()
        assert cells[0] == worker["worker_id"] and cells[2] == str(worker["pid"]) and cells[3] == "cpu"
        assert page.locator("#requests-table tr[data-endpoint='sync'][data-status='200'] td").nth(2).inner_text() == "12"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "status-page.png"), full_page=True)
        assert (ARTIFACTS / "status-page.png").stat().st_size > 10_000
        assert hooked and page.errors == []


def test_with_api_keys_the_page_asks_for_a_key_and_opens_with_one(browser: Any) -> None:
    with serve(RECIPES / "echo", env={"FASTDEPLOY_API_KEYS": KEY}) as server:
        assert requests.get(server.url + "/status.json", timeout=10).status_code == 401
        page = open_page(browser, server.url + "/")
        page.wait_for_selector("#key-form:not([hidden])")
        assert page.locator("#board").is_hidden()
        page.fill("#key", "not-the-key")
        page.click("#key-form button")
        # the server's own reason (it tells a wrong key from a service that accepts none at the moment)
        page.wait_for_function("document.getElementById('key-error').textContent === "
                               "'the API key is not valid for this service'")
        page.fill("#key", KEY)
        page.click("#key-form button")
        page.wait_for_selector("#board:not([hidden])")
        page.wait_for_function("document.getElementById('state').textContent === 'ready'")
        # opened with the key in the address's fragment (never sent to the server), which is then removed
        other = open_page(browser, server.url + "/#key=" + KEY)
        other.wait_for_function("document.getElementById('state').textContent === 'ready'")
        assert "key=" not in other.url
        assert KEY not in server.log()
        assert [e for e in page.errors + other.errors if "401" not in e] == []


def test_the_page_says_when_the_api_keys_file_gave_no_key_at_a_reload(browser: Any, tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("file-key-0123456789\n")
    with serve(RECIPES / "echo", args=["--api-keys-file", str(keys)], env={"FASTDEPLOY_API_KEYS": KEY}) as server:
        page = open_page(browser, server.url + "/#key=" + KEY)
        page.wait_for_function("document.getElementById('state').textContent === 'ready'")
        assert page.locator("#warnings").is_hidden()
        keys.unlink()
        server.proc.send_signal(signal.SIGHUP)
        wait_for_page(page, "!document.getElementById('warnings').hidden", 10_000)
        assert "the API keys file is missing" in shown(page, "#warnings")
        assert str(tmp_path) not in page.inner_text("body")
        assert page.errors == []


def test_docs_try_it_out_runs_the_recipe_example(browser: Any) -> None:
    """/docs renders Swagger UI from the installed package, and "Execute" on /sync sends the
    recipe's own example and gets its prediction."""
    with serve(RECIPES / "echo", env={"FASTDEPLOY_API_KEYS": KEY}) as server:
        page = open_page(browser, server.url + "/docs#key=" + KEY)
        page.wait_for_selector("#operations-default-post_sync", timeout=30_000)
        page.click("#operations-default-post_sync .opblock-summary")
        page.click("#operations-default-post_sync button.execute")
        page.wait_for_selector("#operations-default-post_sync .live-responses-table tbody .response-col_status",
                               timeout=30_000)
        status = page.locator("#operations-default-post_sync .live-responses-table tbody .response-col_status").first
        assert status.inner_text().strip() == "200"
        body = page.locator("#operations-default-post_sync .live-responses-table .microlight").first.inner_text()
        assert '"hello"' in body and '"success": true' in body
        assert page.errors == []


def test_pages_and_assets_come_from_the_server_itself(server_pages: Server) -> None:
    """No CDN: every script and style the pages load is served here, with a policy that allows no other."""
    for path in ("/", "/docs"):
        page = requests.get(server_pages.url + path, timeout=10)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert "http://" not in page.text and "https://" not in page.text
    for asset in ("/static/status.js", "/static/status.css", "/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css"):
        reply = requests.get(server_pages.url + asset, timeout=10)
        assert reply.status_code == 200 and len(reply.content) > 1000, asset
    for missing in ("/static/../settings.py", "/static/nothing.js", "/docs/index.html", "/docs/..%2f__init__.py"):
        reply = requests.get(server_pages.url + missing, timeout=10)
        assert reply.status_code == 404 and reply.json()["success"] is False, missing


def test_polling_the_status_is_not_counted_as_traffic(server_pages: Server) -> None:
    server_pages.post("/sync", {"data": [1]})
    before = requests.get(server_pages.url + "/status.json", timeout=10).json()
    for _ in range(20):
        requests.get(server_pages.url + "/status.json", timeout=10)
    after = requests.get(server_pages.url + "/status.json", timeout=10).json()
    assert after["requests"]["answered"] == before["requests"]["answered"]
    assert after["requests"]["answered"]["sync"] == {"200": 1} and "status" not in after["requests"]["answered"]
    assert after["service"]["ready"] and after["stages"][0]["workers"]


@pytest.fixture(scope="module")
def server_pages() -> Iterator[Server]:
    with serve(RECIPES / "echo") as server:
        yield server


def test_status_json_sums_every_api_server_process() -> None:
    """With several API server processes on one port, any of them answers for all: requests and the
    latency histogram come from the metric files they share, items from the loops' heartbeats."""
    with serve(RECIPES / "echo", env={"WORKERS": "3"}) as server:
        with requests.Session() as session:  # keep-alive: one connection, one process
            for i in range(30):
                assert session.post(server.url + "/sync", json={"data": [i, i]}, timeout=30).status_code == 200

        def counted() -> dict:
            document = requests.get(server.url + "/status.json", timeout=10).json()
            return document if document["stages"][0]["items"] == 60 else {}

        document = wait_until(counted, 15, "60 items in the heartbeats")
        assert document["requests"]["answered"]["sync"] == {"200": 30}
        latency = document["requests"]["latency"]
        assert latency["cumulative"]["sync"][-1] == 30 and len(latency["cumulative"]["sync"]) == len(latency["bounds"])
        for _ in range(10):  # new connections: other processes answer the same totals
            assert requests.get(server.url + "/status.json", timeout=10).json()["requests"]["answered"]["sync"] == {"200": 30}
