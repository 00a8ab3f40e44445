"""The field checks of a request body, and the webhook pattern /openapi.json declares: it takes a
URL exactly when the server's own check does (tests/e2e/test_request_fields.py and
test_openapi_agrees.py try both through the real server)."""

from __future__ import annotations

import re

import pytest

from fastdeploy.errors import BadRequest
from fastdeploy.http.openapi import webhook_pattern
from fastdeploy.payloads import check_fields, check_form_field, check_timeout, validate_webhook

LONG_LABEL = "a" * 64
LONG_NAME = ".".join(["a" * 63] * 4)  # 255 characters


def _taken(url: str, hosts: frozenset[str]) -> bool:
    try:
        validate_webhook(url, hosts, allow_private=True)  # the pattern says nothing of private addresses
    except BadRequest:
        return False
    return True


@pytest.mark.parametrize("url", [
    "http://example.com", "HTTPS://Example.COM:443/a/b?c=d#e", "http://a_b-c.example./x", "http://10.0.0.1:8080",
    "http://2130706433/", "http://127.1:1/", "http://example.com:/x", "http://example.com:00080/x",
    "http://example.com/%20ok", "http://example.com/ü", f"http://{LONG_NAME[:253]}/x",
    "ftp://example.com/x", "http://", "http:example.com", "http://example.com:0/", "http://example.com:65536/",
    "http://user:pw@example.com/", "http://exa mple.com/", "http://example.com/a b", "http://example.com/\u200b",
    "http://example.com/\x7f", f"http://{LONG_LABEL}.example.com/", f"http://{LONG_NAME}/x", "http://ex!ample.com/",
    "http://example..com/", "http://.example.com/", "http://example.com\\x", "javascript:alert(1)",
    "http://example.com/" + "x" * 2100,
])
def test_the_declared_pattern_takes_a_webhook_exactly_when_the_server_does(url: str) -> None:
    pattern = webhook_pattern()
    assert (len(url) <= 2048 and re.search(pattern, url) is not None) == _taken(url, frozenset()), url


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/hook", "http://127.0.0.1./hook", "HTTP://HOOKS.example.com/x", "http://[::1]:80/x",
    "http://127.0.0.2/hook", "http://hooks.example.com./x", "http://other.example.com/x", "http://[::2]/x",
])
def test_with_webhook_hosts_the_pattern_takes_only_those(url: str) -> None:
    hosts = frozenset({"127.0.0.1", "hooks.example.com", "::1"})
    assert (re.search(webhook_pattern(hosts), url) is not None) == _taken(url, hosts), url


def test_an_unknown_field_is_named_with_the_nearest_known_one() -> None:
    with pytest.raises(BadRequest, match="unknown field 'webhok' in the body; did you mean 'webhook'"):
        check_fields({"data": [], "webhok": "x"}, ("data", "webhook"), "the body")
    with pytest.raises(BadRequest, match=r"unknown field 'zzz' in the body \(the fields are data, webhook\)"):
        check_fields({"zzz": 1}, ("data", "webhook"), "the body")
    check_fields({"data": [], "webhook": None}, ("data", "webhook"), "the body")


@pytest.mark.parametrize("name, refused", [
    ("webhok", True), ("Priority", True), ("uniqueid", True), ("timout", True), ("WEBHOOK", True),
    ("priority", False), ("hook", False), ("prio", False), ("time", False), ("a.png", False), ("notes", False),
])
def test_a_form_field_all_but_named_like_an_option_is_refused(name: str, refused: bool) -> None:
    if refused:
        with pytest.raises(BadRequest, match="did you mean"):
            check_form_field(name)
    else:
        check_form_field(name)


@pytest.mark.parametrize("value, expected", [(None, None), (2, 2.0), (0.5, 0.5), (5e-324, 5e-324)])
def test_a_timeout_is_a_positive_number_of_seconds(value: object, expected: object) -> None:
    assert check_timeout(value) == expected


@pytest.mark.parametrize("value", [0, -1, 0.0, True, "5", [1], {"s": 1}, float("inf"), float("nan")])
def test_any_other_timeout_is_refused(value: object) -> None:
    with pytest.raises(BadRequest, match="timeout must be a positive number"):
        check_timeout(value)
