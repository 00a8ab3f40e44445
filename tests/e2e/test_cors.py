"""CORS (--cors-origins) through the real CLI: preflights answered on every endpoint without
an API key, real requests (the /sync and /infer fast paths too) carrying the allow header,
other origins left without it, and no CORS at all by default."""

from __future__ import annotations

import pytest
import requests

from tests.helpers import RECIPES, serve

ORIGIN = "https://app.example.com"
KEY = "cors-test-key-0123456789abcdef"
ENDPOINTS = [("POST", "/sync"), ("POST", "/infer"), ("POST", "/async"), ("POST", "/result"), ("POST", "/cancel"),
             ("GET", "/meta"), ("GET", "/metrics"), ("GET", "/prometheus_metrics"), ("GET", "/health"),
             ("GET", "/ready"), ("GET", "/openapi.json"), ("GET", "/status.json")]


def preflight(url: str, path: str, method: str, origin: str = ORIGIN) -> requests.Response:
    return requests.options(url + path, timeout=10, headers={
        "Origin": origin, "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, content-type, x-api-key",
    })


@pytest.fixture(scope="module")
def keyed():
    args = ["--batch-size", "16", "--cors-origins", f"{ORIGIN}, http://localhost:3000"]
    with serve(RECIPES / "echo", args=args, env={"FASTDEPLOY_API_KEYS": KEY}) as server:
        yield server


@pytest.mark.parametrize("method,path", ENDPOINTS)
def test_preflight_is_answered_on_every_endpoint_without_a_key(keyed, method, path):
    response = preflight(keyed.url, path, method)
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert method in response.headers["access-control-allow-methods"]
    allowed = response.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "x-api-key" in allowed and "content-type" in allowed


@pytest.mark.parametrize("path", ["/", "/docs", "/static/status.js", "/docs/swagger-ui.css"])
def test_the_pages_load_without_a_key_and_carry_the_allow_header(keyed, path):
    page = requests.get(keyed.url + path, headers={"Origin": ORIGIN}, timeout=10)
    assert page.status_code == 200 and page.headers["access-control-allow-origin"] == ORIGIN


def test_what_the_pages_show_needs_a_key(keyed):
    for path in ("/status.json", "/openapi.json"):
        refused = requests.get(keyed.url + path, headers={"Origin": ORIGIN}, timeout=10)
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN, path
        shown = requests.get(keyed.url + path, headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"}, timeout=10)
        assert shown.status_code == 200, path


def test_real_requests_carry_the_allow_header(keyed):
    auth = {"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"}
    sync = requests.post(f"{keyed.url}/sync", json={"data": ["from a page"]}, headers=auth, timeout=10)
    assert sync.status_code == 200 and sync.json()["prediction"] == ["from a page"]
    assert sync.headers["access-control-allow-origin"] == ORIGIN
    infer = requests.post(f"{keyed.url}/infer", params={"input_type": "json"}, data=b'["x"]', headers=auth, timeout=10)
    assert infer.status_code == 200 and infer.headers["access-control-allow-origin"] == ORIGIN
    meta = requests.get(f"{keyed.url}/meta", headers=auth, timeout=10)
    assert meta.status_code == 200 and meta.headers["access-control-allow-origin"] == ORIGIN
    # a refusal too, so the page can read its reason (and Retry-After / WWW-Authenticate)
    refused = requests.post(f"{keyed.url}/sync", json={"data": [1]}, headers={"Origin": ORIGIN}, timeout=10)
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN
    assert "www-authenticate" in refused.headers["access-control-expose-headers"].lower()
    other = requests.post(f"{keyed.url}/sync", json={"data": [1]}, timeout=10,
                          headers={"Origin": "http://localhost:3000", "Authorization": f"Bearer {KEY}"})
    assert other.headers["access-control-allow-origin"] == "http://localhost:3000"


def test_other_origins_get_no_allow_header(keyed):
    assert preflight(keyed.url, "/sync", "POST", origin="https://evil.example").status_code == 400
    response = requests.post(f"{keyed.url}/sync", json={"data": [1]}, timeout=10,
                             headers={"Origin": "https://evil.example", "Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers


def test_star_allows_any_origin_and_no_flag_means_no_cors():
    with serve(RECIPES / "echo", args=["--batch-size", "16", "--cors-origins", "*"]) as server:
        response = preflight(server.url, "/sync", "POST", origin="https://anywhere.example")
        assert response.status_code == 200 and response.headers["access-control-allow-origin"] == "*"
        sync = requests.post(f"{server.url}/sync", json={"data": [1]}, headers={"Origin": "https://x.example"},
                             timeout=10)
        assert sync.headers["access-control-allow-origin"] == "*"
    with serve(RECIPES / "echo", args=["--batch-size", "16"]) as server:
        sync = requests.post(f"{server.url}/sync", json={"data": [1]}, headers={"Origin": ORIGIN}, timeout=10)
        assert sync.status_code == 200 and "access-control-allow-origin" not in sync.headers
        assert preflight(server.url, "/sync", "POST").status_code == 405


def test_a_malformed_origin_stops_the_command():
    import subprocess
    import sys

    from tests.helpers import ROOT

    done = subprocess.run([sys.executable, "-m", "fastdeploy", "run", str(RECIPES / "echo"), "--cors-origins",
                           "app.example.com"], capture_output=True, text=True, cwd=str(ROOT), timeout=60)
    assert done.returncode == 2 and "--cors-origins" in done.stderr and "scheme://host" in done.stderr
