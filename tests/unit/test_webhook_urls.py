"""Which webhook URLs and addresses are refused, and why: pure functions, no network."""

from __future__ import annotations

import asyncio
import ipaddress
import shutil
import socket
import ssl
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from fastdeploy.errors import BadRequest, SettingsError
from fastdeploy.payloads import address_refusal, embedded_ipv4, literal_address, parse_request, validate_webhook
from fastdeploy.settings import load_settings, webhook_signing_key as signing_key
from fastdeploy.store.base import WebhookDelivery
from fastdeploy.webhooks import Refused, WebhookSender, loggable_url, resolve_targets, signature_headers
from tests.webhook_receiver import Receiver

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # the specification's example secret (24 bytes)
NONE: frozenset[str] = frozenset()


def _refusal(text: str, deny_private: bool = False) -> str:
    return address_refusal(ipaddress.ip_address(text), deny_private)


@pytest.mark.parametrize("address, kind", [
    ("169.254.169.254", "link-local"), ("169.254.170.2", "link-local"), ("fe80::1", "link-local"),
    ("::ffff:169.254.169.254", "link-local"), ("::169.254.169.254", "link-local"),
    ("64:ff9b::169.254.169.254", "link-local"), ("2002:a9fe:a9fe::1", "link-local"),
    ("100.100.100.200", "cloud metadata"), ("fd00:ec2::254", "cloud metadata"), ("168.63.129.16", "cloud metadata"),
    ("192.0.0.192", "cloud metadata"), ("0.0.0.0", "unspecified"), ("0.1.2.3", "unspecified"), ("::", "unspecified"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"),
])
def test_link_local_metadata_and_reserved_addresses_are_always_refused(address, kind):
    assert _refusal(address).startswith(f"{kind} address {ipaddress.ip_address(address)}")
    assert _refusal(address, deny_private=True).startswith(f"{kind} address")


@pytest.mark.parametrize("address, kind", [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("172.31.255.255", "private"), ("192.168.1.1", "private"),
    ("fc00::1", "private"), ("fd12:3456::1", "private"), ("100.64.0.1", "non-public"),
    # IPv6 ranges that reach private networks: site-local (deprecated; Python 3.11 calls it global),
    # and IPv4 carried in IPv6 (compatible, mapped, NAT64, 6to4), judged by the IPv4 address
    ("fec0::1", "site-local"), ("feff:ffff::1", "site-local"), ("::10.0.0.1", "private"), ("::127.0.0.1", "loopback"),
    ("::ffff:192.168.1.1", "private"), ("64:ff9b::10.0.0.1", "private"), ("64:ff9b::127.0.0.1", "loopback"),
    ("2002:a00:1::1", "private"), ("2002:7f00:1::1", "loopback"),
])
def test_loopback_and_private_addresses_are_refused_only_when_asked(address, kind):
    assert _refusal(address) == ""
    assert _refusal(address, deny_private=True).startswith(f"{kind} address {ipaddress.ip_address(address)}")


@pytest.mark.parametrize("address", ["8.8.8.8", "172.32.0.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "::8.8.8.8",
                                     "64:ff9b::8.8.8.8", "2002:808:808::1"])
def test_public_addresses_are_allowed(address):
    assert _refusal(address) == "" and _refusal(address, deny_private=True) == ""


def test_ipv4_hiding_in_ipv6_is_unwrapped():
    assert embedded_ipv4(ipaddress.ip_address("::ffff:10.0.0.1")) == ipaddress.ip_address("10.0.0.1")
    assert embedded_ipv4(ipaddress.ip_address("::1")) == ipaddress.ip_address("::1")
    assert "(169.254.169.254)" in _refusal("::ffff:169.254.169.254")


@pytest.mark.parametrize("host, address", [
    ("169.254.169.254", "169.254.169.254"), ("2852039166", "169.254.169.254"), ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"),
    ("0251.0376.0251.0376", "169.254.169.254"), ("127.1", "127.0.0.1"), ("::1", "::1"), ("10.0.0.1.", "10.0.0.1"),
])
def test_literal_addresses_include_the_legacy_forms_resolvers_accept(host, address):
    assert literal_address(host) == ipaddress.ip_address(address)


@pytest.mark.parametrize("host", ["example.com", "deadbeef.cafe", "localhost", "1.example", "x-1.internal"])
def test_names_are_not_literals(host):
    assert literal_address(host) is None


@pytest.mark.parametrize("url, reason", [
    ("http://169.254.169.254/latest/meta-data/", "link-local address 169.254.169.254"),
    ("http://[::ffff:169.254.169.254]/", "link-local address"),
    ("http://2852039166/", "link-local address 169.254.169.254"),
    ("http://100.100.100.200/", "cloud metadata address"),
    ("http://[fd00:ec2::254]/", "cloud metadata address"),
    ("http://[fe80::1%25eth0]/", "link-local address"),
    ("http://0.0.0.0:8080/", "unspecified address"),
    ("http://user:secret@example.com/", "may not carry credentials"),
    ("http://user@example.com/", "--webhook-secret"),
    ("http://:secret@example.com/", "credentials"),
    ("http://exa mple.com/", "contains ' '"),
    ("http://example.com/a b", "contains ' '"),
    ("http://example.com/\r\nX-Injected: 1", "contains '\\r'"),
    ("http://example.com/\ttab", "contains '\\t'"),
    ("http://exa\u200bmple.com/", "format characters"),
    ("http://example.com:0/", "1 to 65535"),
    ("http://example.com:65536/", "1 to 65535"),
    ("http://example.com:http/", "1 to 65535"),
    ("ftp://example.com/", "http:// or https://"),
    ("file:///etc/passwd", "http:// or https://"),
    ("example.com/hook", "http:// or https://"),
    ("http:///path", "http:// or https://"),
    ("http://" + "a" * 64 + ".com/", "64-character label"),
    ("http://" + "abcdefghi." * 26 + "com/", "263 characters long"),
    ("http://" + "h" * 5000 + "/", "characters long"),
    ("http://example.com/" + "p" * 2100, "at most 2048"),
    ("http://a..b/", "not a valid host name"),
    ("http://exa%20mple.com/", "not a valid host name"),
    ("http://[not-ipv6]/", "not a valid URL"),
    ("", "URL string"),
    (42, "URL string"),
])
def test_unusable_urls_are_refused_with_a_reason(url, reason):
    with pytest.raises(BadRequest) as caught:
        validate_webhook(url, NONE)
    assert reason in caught.value.reason, caught.value.reason
    assert "secret" not in caught.value.reason.replace("--webhook-secret", "")  # credentials are never echoed


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/hook", "https://example.com/hook?token=x#frag", "http://localhost/", "http://[::1]:9/",
    "https://hooks.example.com./x", "http://bücher.example/x", "http://x_y.internal:8080/", "http://10.0.0.5/",
    "HTTPS://EXAMPLE.COM/", "http://example.com:65535/", "http://" + "a" * 63 + ".com/",
])
def test_good_urls_pass_unchanged(url):
    assert validate_webhook(url, NONE, allow_private=True) == url


@pytest.mark.parametrize("url", ["http://127.0.0.1/", "http://[::1]/", "http://10.0.0.1/", "http://192.168.0.1/",
                                 "http://[::ffff:127.0.0.1]/", "http://127.1/", "http://100.64.0.1/", "http://[fec0::1]/",
                                 "http://[::10.0.0.1]/", "http://[64:ff9b::10.0.0.1]/", "http://[2002:a00:1::1]/"])
def test_private_literals_are_refused_at_submit_unless_the_operator_allows_them(url):
    with pytest.raises(BadRequest, match="--webhook-allow-private") as caught:
        validate_webhook(url, NONE)
    assert "--webhook-hosts" in caught.value.reason  # the other way to allow one host
    assert validate_webhook(url, NONE, allow_private=True) == url
    host = url.split("//", 1)[1].rstrip("/").strip("[]")
    assert validate_webhook(url, frozenset({host})) == url  # a host the operator named may be private


def test_names_are_left_to_the_send_time_check():
    assert validate_webhook("http://localhost:8080/", NONE)


def test_parse_request_refuses_private_webhooks_unless_allowed():
    body = b'{"data": [1], "webhook": "http://127.0.0.1:9/"}'
    with pytest.raises(BadRequest, match="loopback"):
        parse_request(body, file_mode=False, sync=False, max_items=0)
    allowed = parse_request(body, file_mode=False, sync=False, max_items=0, allow_private_webhooks=True)
    assert allowed.webhook == "http://127.0.0.1:9/"


def test_allow_list_still_applies():
    assert validate_webhook("http://hooks.example/x", frozenset({"hooks.example"}))
    assert validate_webhook("http://[::1]/x", frozenset({"::1"}))
    with pytest.raises(BadRequest, match="not allowed"):
        validate_webhook("http://10.0.0.1/x", frozenset({"hooks.example"}))
    with pytest.raises(BadRequest, match="link-local"):  # the allow-list never opens metadata addresses
        validate_webhook("http://169.254.169.254/x", frozenset({"169.254.169.254"}))


def test_log_lines_show_no_credentials_nor_query():
    assert loggable_url("https://u:p@hooks.example:8443/a/b?token=s3cret#f") == "https://hooks.example:8443/a/b"
    assert loggable_url("http://[::1]:9/x?y") == "http://[::1]:9/x"
    assert loggable_url("http://h:99999/") == "(an invalid URL)"


@pytest.mark.parametrize("secret, problem", [
    ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "must be whsec_"),
    ("whsec_not base64!", "not valid base64"),
    ("whsec_c2hvcnQ=", "is 5 bytes"),
    ("whsec_" + "QUFB" * 30, "is 90 bytes"),
])
def test_malformed_secrets_name_the_option(secret, problem):
    with pytest.raises(SettingsError, match="--webhook-secret") as caught:
        signing_key(secret)
    assert problem in caught.value.reason and secret not in caught.value.reason


def test_signature_verifies_with_the_standardwebhooks_package():
    now = datetime.now(tz=timezone.utc).timestamp()
    body = '{"unique_id":"abc","status":"done","success":true,"prediction":["é"]}'.encode()
    headers = signature_headers(Webhook(signing_key(SECRET)), "abc", body, now)
    assert headers["webhook-id"] == "msg_abc" and headers["webhook-timestamp"] == str(int(now))
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(SECRET).verify(body, headers)["unique_id"] == "abc"
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body.replace(b"done", b"fail"), headers)
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "QUFB" * 8).verify(body, headers)
    later = signature_headers(Webhook(signing_key(SECRET)), "abc", body, now + 5)
    assert later["webhook-id"] == headers["webhook-id"] and later["webhook-signature"] != headers["webhook-signature"]


def test_send_time_resolution_checks_every_address_and_connects_to_it():
    [target] = asyncio.run(resolve_targets("https://127.0.0.1:8443/a?b=1", NONE, allow_private=True))
    assert (target.url, target.host_header, target.tls_host) == ("https://127.0.0.1:8443/a?b=1", "127.0.0.1:8443", "127.0.0.1")
    targets = asyncio.run(resolve_targets("http://localhost:9/x", NONE, allow_private=True))
    assert targets and all(t.host_header == "localhost:9" and t.tls_host is None for t in targets)
    assert {t.url for t in targets} <= {"http://127.0.0.1:9/x", "http://[::1]:9/x"}
    assert asyncio.run(resolve_targets("http://localhost:9/x", frozenset({"localhost"}), allow_private=False))
    with pytest.raises(Refused, match="refused: localhost resolves to loopback address .*--webhook-allow-private"):
        asyncio.run(resolve_targets("http://localhost:9/x", NONE, allow_private=False))
    with pytest.raises(Refused, match="refused: 169.254.169.254 resolves to link-local address 169.254.169.254"):
        asyncio.run(resolve_targets("http://169.254.169.254/latest", frozenset({"169.254.169.254"}), allow_private=True))
    with pytest.raises(Refused, match="link-local address 169.254.169.254"):  # what inet_aton makes of it
        asyncio.run(resolve_targets("http://2852039166/", NONE, allow_private=True))
    with pytest.raises(Refused, match="not usable"):
        asyncio.run(resolve_targets("ftp://example.com/", NONE, allow_private=True))


def test_send_time_checks_the_allow_list_again():
    """A URL outside --webhook-hosts is refused when it is sent, not only at submit: it may have been
    written into Redis by hand, or queued before the operator changed the list."""
    listed = frozenset({"hooks.example"})
    with pytest.raises(Refused, match="refused: 127.0.0.1 is not one of the --webhook-hosts"):
        asyncio.run(resolve_targets("http://127.0.0.1:9/x", listed, allow_private=True))
    with pytest.raises(Refused, match="refused: localhost is not one of the --webhook-hosts"):
        asyncio.run(resolve_targets("http://LOCALHOST:9/x", listed, allow_private=True))
    with pytest.raises(Refused, match="not usable"):  # an unusable URL says so first
        asyncio.run(resolve_targets("ftp://hooks.example/", listed, allow_private=True))
    assert asyncio.run(resolve_targets("http://Localhost:9/x", frozenset({"localhost"}), allow_private=False))
    assert asyncio.run(resolve_targets("http://[::1]:9/x", frozenset({"::1"}), allow_private=False))
    [target] = asyncio.run(resolve_targets("http://127.1:9/x", frozenset({"127.0.0.1"}), allow_private=False))
    assert target.url == "http://127.0.0.1:9/x"  # a listed address in another spelling


# -- delivery to a checked address: the real sender against a real receiver, with a stand-in DNS ----------
async def _attempt(url: str, dns: dict[str, list[str]], tmp_path: Path, client: httpx.AsyncClient) -> str:
    """One delivery try of ``url``, with names resolved from ``dns``; "" when delivered."""
    loop = asyncio.get_running_loop()

    async def getaddrinfo(host: str, port: int, **kw: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in dns.get(host, [host])]

    loop.getaddrinfo = getaddrinfo  # type: ignore[method-assign]
    settings = load_settings(tmp_path, {"webhook_allow_private": "true"}, environ={})  # the receiver is local
    sender = WebhookSender(settings, store=None, call=None)  # type: ignore[arg-type]
    sender._client = client
    async with client:
        return await sender._attempt(WebhookDelivery("job1", url, b'{"unique_id":"job1"}', 0))


def test_the_checked_address_is_used_with_the_host_name_in_host_and_the_next_address_after_a_refusal(tmp_path):
    with Receiver() as receiver:
        dns = {"hooks.example": ["127.0.0.2", "127.0.0.1"]}  # nothing listens on 127.0.0.2: refused, then the next
        url = f"http://hooks.example:{receiver.port}/ok?q=1"
        assert asyncio.run(_attempt(url, dns, tmp_path, httpx.AsyncClient(timeout=5))) == ""
        [delivery] = receiver.delivered("/ok?q=1")
        assert delivery.headers["Host"] == f"hooks.example:{receiver.port}"
        with pytest.raises(Refused, match="hooks.example resolves to link-local address 169.254.169.254"):
            # one forbidden address among good ones refuses the lot: DNS must not get to pick
            asyncio.run(_attempt(url, {"hooks.example": ["127.0.0.1", "169.254.169.254"]}, tmp_path, httpx.AsyncClient()))
        assert len(receiver.posts) == 1


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_https_to_the_address_is_verified_for_the_host_name(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=hooks.example", "-addext", "subjectAltName=DNS:hooks.example"],
                   check=True, capture_output=True)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    dns = {"hooks.example": ["127.0.0.1"], "other.example": ["127.0.0.1"]}
    with Receiver(tls=server_tls) as receiver:
        def client() -> httpx.AsyncClient:
            return httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(cert)), timeout=5)

        assert asyncio.run(_attempt(f"https://hooks.example:{receiver.port}/ok", dns, tmp_path, client())) == ""
        assert receiver.delivered("/ok")[0].headers["Host"] == f"hooks.example:{receiver.port}"
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            asyncio.run(_attempt(f"https://other.example:{receiver.port}/ok", dns, tmp_path, client()))
