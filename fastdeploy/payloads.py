"""Validate request bodies and turn them into job inputs; every rejection says how to fix it."""

from __future__ import annotations

import binascii
import difflib
import ipaddress
import math
import re
import socket
import unicodedata
from dataclasses import dataclass
from itertools import chain, compress
from typing import Any, Iterator, Mapping, NamedTuple, Optional, Sequence, Union
from urllib.parse import urlsplit

import orjson
import pybase64

from fastdeploy.errors import BadRequest, PayloadTooLarge

DEFAULT_SYNC_PRIORITY = 8
DEFAULT_ASYNC_PRIORITY = 9
# arrays and objects nested deeper than this are refused (400): deep values fail later in the
# encoders (orjson writes at most 254 levels, msgpack 511), as a 500 or a failed job
MAX_JSON_DEPTH = 64
MAX_FILE_NAME_BYTES = 255  # the longest file name ext4, XFS, Btrfs and APFS store
_CONTAINERS = frozenset((dict, list))


@dataclass(frozen=True)
class ParsedRequest:
    """A valid /sync or /async body: inputs (file name and bytes pairs for FILE recipes) and options."""

    inputs: list[Any]
    keys: Optional[list[str]]
    priority: int
    webhook: Optional[str]
    unique_id: Optional[str] = None  # the client's own job id; None: the server makes one
    timeout: Optional[float] = None  # the client's own deadline in seconds; None: none (TIMEOUT bounds /sync)


# the top-level keys a /sync or /async body may have (SPEC.md), and those of /result and /cancel: any
# other is refused, since a misspelt option ("webhok") would otherwise be dropped without a word
REQUEST_FIELDS = ("data", "priority", "webhook", "unique_id", "timeout")
ID_FIELDS = ("unique_id",)
FORM_OPTIONS = ("priority", "webhook", "unique_id", "timeout")  # multipart text parts read as options
FORM_NEAR_CUTOFF = 0.8  # how alike a text part's name must be to an option's to be taken for a misspelling


Body = Union[bytes, bytearray]  # a request body: as it came in one piece, or gathered from many


def parse_json_body(body: Body) -> dict[str, Any]:
    if not body:
        raise BadRequest('the request body is empty; send JSON like {"data": [...]}')
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest(f'the request body must be a JSON object like {{"data": [...]}}, not a {type(value).__name__}')
    if body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH and nested_deeper_than(value, MAX_JSON_DEPTH):
        raise BadRequest(f"the request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep; "
                         f"at most {MAX_JSON_DEPTH} are allowed: flatten the inputs")
    return value


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays and objects (lists and dicts) in a decoded value nest more than ``limit`` levels.

    Walked a level at a time, without recursion (a deep value must not exhaust the stack here),
    with the work per member done in C (``map``, ``chain``, ``compress``): a flat list of a
    million numbers costs about a third of parsing it, many small arrays at most about twice."""
    level = [value] if type(value) in _CONTAINERS else []
    for _ in range(limit):
        if not level or _CONTAINERS.isdisjoint(map(type, _members(level))):
            return False
        members = list(_members(level))
        level = list(compress(members, map(_CONTAINERS.__contains__, map(type, members))))
    return bool(level)


def _members(level: list[Any]) -> Iterator[Any]:
    """Every member of a level's lists and every value of its dicts."""
    kinds = set(map(type, level))
    if dict not in kinds:
        return chain.from_iterable(level)
    if len(kinds) == 1:
        return chain.from_iterable(map(dict.values, level))
    return chain.from_iterable(c.values() if type(c) is dict else c for c in level)


def _shown(name: str, most: int = 60) -> str:
    """A client's name, shortened for a reason: what it starts with is enough to find it."""
    return repr(name) if len(name) <= most else repr(name[:most]) + f"... ({len(name)} characters)"


def check_fields(document: Mapping[str, Any], known: Sequence[str], where: str) -> None:
    """Refuse (400) a key the server would not read, naming it and the nearest known one."""
    unknown = next((key for key in document if key not in known), None)
    if unknown is not None:
        raise BadRequest(unknown_field_reason(unknown, known, where))


def unknown_field_reason(name: str, known: Sequence[str], where: str, cutoff: float = 0.6) -> str:
    """Why a field is refused: its name, the known name it most resembles (if any), and every known name."""
    near = difflib.get_close_matches(name.lower(), known, n=1, cutoff=cutoff)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return f"unknown field {_shown(name)} in {where}{hint} (the fields are {', '.join(known)})"


def check_form_field(name: str) -> None:
    """A multipart text part (no file name) is a file keyed by its name, unless that name is all
    but an option's ("webhok", "Priority"): then the client meant the option, and hears it (400)."""
    if name not in FORM_OPTIONS and difflib.get_close_matches(name.lower(), FORM_OPTIONS, n=1,
                                                              cutoff=FORM_NEAR_CUTOFF):
        reason = unknown_field_reason(name, FORM_OPTIONS, "the form", FORM_NEAR_CUTOFF)
        raise BadRequest(f"{reason}; to send a file under that name, give the part a file name "
                         f"(curl -F '{name[:40]}=@file')")


# multipart uploads (``fastdeploy.uploads``), here so that the client can follow them too
UPLOAD_MARKER = ".fastdeploy-upload"  # in every upload's folder: the sweep deletes no folder without it
MAX_UPLOAD_FILES = 1000  # files in one request where MAX_PER_CLIENT_BATCH sets no bound (each is a file on disk)


def safe_file_name(key: str) -> str:
    """The base name a file is stored under: path parts (/ and \\) stripped; refused (400) when no
    file system could store it, so the client hears it at submit, not as a failed job."""
    base = key.replace("\\", "/").rsplit("/", 1)[-1]
    if base in ("", ".", ".."):
        raise BadRequest(f"file name {_shown(key)} has no usable base name; send names like 'photo.png'")
    if "\x00" in base:
        raise BadRequest(f"file name {_shown(key)} contains a NUL character")
    size = len(base.encode("utf-8", "surrogatepass"))
    if size > MAX_FILE_NAME_BYTES:
        raise BadRequest(f"file name {_shown(base)} is {size} bytes long (UTF-8); file names may have at most "
                         f"{MAX_FILE_NAME_BYTES} bytes: shorten it")
    return base


def _decode_files(data: dict[str, Any]) -> tuple[list[Any], list[str]]:
    inputs: list[Any] = []
    seen: dict[str, str] = {}
    for key, encoded in data.items():
        base = safe_file_name(key)
        if base in seen:
            raise BadRequest(f"file names {seen[base]!r} and {key!r} both reduce to {base!r}; give each file its own name")
        seen[base] = key
        if not isinstance(encoded, str):
            raise BadRequest(f"file {key!r}: the value must be a base64 string, not {type(encoded).__name__}")
        try:
            raw = pybase64.b64decode(encoded, validate=True)  # SIMD: ~50x CPython's strict decoder
        except (binascii.Error, ValueError) as exc:
            raise BadRequest(f"file {key!r} is not valid base64 ({exc}); encode it with base64.b64encode") from None
        inputs.append([base, raw])
    return inputs, list(data)


MAX_UNIQUE_ID = 128
_UNIQUE_ID = re.compile(r"[A-Za-z0-9._:-]+")


def check_unique_id(value: Any) -> Optional[str]:
    """A client-chosen job id, or None when none was sent. Only characters that are safe in
    store keys, log lines and URLs, and a bounded length: the id is stored and echoed back."""
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_UNIQUE_ID or not _UNIQUE_ID.fullmatch(value):
        shown = repr(value)[:60] if isinstance(value, str) else type(value).__name__
        raise BadRequest(
            f"unique_id must be a string of 1 to {MAX_UNIQUE_ID} letters, digits and . _ : - (got {shown}); "
            "leave it out and the server makes one"
        )
    return value


def _priority(body: dict[str, Any], default: int) -> int:
    """The job's priority: null means the default; a whole float like 6.0 is the integer 6 (JSON
    Schema counts it an integer too); 6.5, booleans and strings are refused."""
    value = body.get("priority", default)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 9:
        raise BadRequest(f"priority must be a whole number from 0 (first) to 9 (last), got {value!r}")
    return value


MAX_WEBHOOK_URL = 2048
MAX_HOST_NAME = 253
MAX_HOST_LABEL = 63
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

# cloud metadata services outside 169.254.0.0/16 (AWS IPv6, Alibaba, Azure's wire server, Oracle)
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("fd00:ec2::254", "100.100.100.200", "168.63.129.16", "192.0.0.192")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_HOST_LABEL = re.compile(r"[a-z0-9_-]+")
CREDENTIALS_REASON = (
    "webhook URLs may not carry credentials (user:password@); to authenticate deliveries, "
    "sign them (--webhook-secret) and verify the webhook-signature header in the receiver"
)


def embedded_ipv4(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one carries (mapped, compatible, NAT64, 6to4), so 169.254.x cannot hide in IPv6."""
    if not isinstance(address, ipaddress.IPv6Address):
        return address
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64 or (address.packed[:12] == bytes(12) and int(address) > 1):
        return ipaddress.IPv4Address(address.packed[12:])
    return address


def _always_forbidden(address: IPAddress) -> str:
    """The kind of address no webhook may reach: the host itself, metadata services, broadcast."""
    if address.is_unspecified or (isinstance(address, ipaddress.IPv4Address) and address.packed[0] == 0):
        return "unspecified"
    if address.is_link_local:
        return "link-local"
    if address in METADATA_ADDRESSES:
        return "cloud metadata"
    if address.is_multicast:
        return "multicast"
    if address.is_reserved and not address.is_loopback:
        return "reserved"
    return ""


def _private_kind(address: IPAddress) -> str:
    """The kind of a loopback or private address, refused unless the operator allows them, or "".
    Site-local fec0::/10 counts: deprecated, yet Python 3.11 calls it global."""
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "site-local"
    if address.is_global:
        return ""
    return "loopback" if address.is_loopback else "private" if address.is_private else "non-public"


def address_refusal(address: IPAddress, deny_private: bool) -> str:
    """Why a webhook may not connect to ``address`` (like "link-local address 169.254.169.254"), or ""."""
    plain = embedded_ipv4(address)
    kind = _always_forbidden(plain)
    if not kind and deny_private:
        kind = _private_kind(plain)
    shown = f"{address} ({plain})" if plain != address else str(address)
    return f"{kind} address {shown}" if kind else ""


def literal_address(host: str) -> Optional[IPAddress]:
    """The address a URL host names without DNS: an IP literal, or a legacy form like 2852039166 or 0xa9.0xfe.0xa9.0xfe."""
    name = host[:-1] if host.endswith(".") else host
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        pass
    if not name.rsplit(".", 1)[-1][:1].isdigit():
        return None  # a DNS name (its last label is not numeric), which inet_aton would not take either
    try:
        return ipaddress.IPv4Address(socket.inet_aton(name))
    except (OSError, ValueError):
        return None


def check_host_name(host: str) -> str:
    """The ASCII form of a DNS host name, or BadRequest: lengths of RFC 1035, letters, digits, - and _ only."""
    try:
        ascii_host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        raise BadRequest("webhook host is not a valid host name (an empty or over-long label)") from None
    name = ascii_host[:-1] if ascii_host.endswith(".") else ascii_host
    if len(name) > MAX_HOST_NAME:
        raise BadRequest(f"webhook host is {len(name)} characters long; host names have at most {MAX_HOST_NAME}")
    for label in name.split("."):
        if len(label) > MAX_HOST_LABEL:
            raise BadRequest(f"webhook host has a {len(label)}-character label; labels have at most {MAX_HOST_LABEL}")
        if not _HOST_LABEL.fullmatch(label):
            raise BadRequest(f"webhook host {name[:80]!r} is not a valid host name (empty label or a character "
                             "other than letters, digits, '-' and '_')")
    return ascii_host


def _check_url_text(url: Any) -> str:
    if not isinstance(url, str) or not url:
        raise BadRequest("webhook must be an http(s) URL string")
    if len(url) > MAX_WEBHOOK_URL:
        raise BadRequest(f"webhook URL is {len(url)} characters long; at most {MAX_WEBHOOK_URL} are allowed")
    bad = next((c for c in url if c.isspace() or unicodedata.category(c) in ("Cc", "Cf")), None)
    if bad is not None:
        raise BadRequest(f"webhook URL contains {bad!r}; spaces, control and format characters must be percent-encoded")
    return url


def _webhook_host(url: str) -> str:
    """The host of a well-formed http(s) URL without credentials, or BadRequest saying what is wrong."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as exc:
        raise BadRequest(f"webhook is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise BadRequest("webhook must be an absolute http:// or https:// URL")
    if "@" in parts.netloc:
        raise BadRequest(CREDENTIALS_REASON)
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise BadRequest("webhook port must be a number from 1 to 65535")
    return host


PRIVATE_HINT = (
    "loopback and private addresses are refused unless the server allows them: start it with "
    "--webhook-allow-private (FASTDEPLOY_WEBHOOK_ALLOW_PRIVATE=true), or name the host in --webhook-hosts"
)


def listed_host(host: str, allowed_hosts: frozenset[str]) -> bool:
    """Whether the operator named ``host`` in --webhook-hosts (an address in any of its spellings)."""
    address = literal_address(host)
    return host.lower() in allowed_hosts or (address is not None and str(address) in allowed_hosts)


def private_allowed(host: str, allowed_hosts: frozenset[str], allow_private: bool) -> bool:
    """Whether a webhook to ``host`` may reach loopback and private addresses: only where the operator
    said so, for every host (--webhook-allow-private) or for this one (named in --webhook-hosts)."""
    return allow_private or listed_host(host, allowed_hosts)


def validate_webhook(url: Any, allowed_hosts: frozenset[str], allow_private: bool = False) -> str:
    """Refuse at submit what could never be delivered, or should not be: the client learns it now, with a 400."""
    host = _webhook_host(_check_url_text(url))
    address = literal_address(host)
    if address is None:
        check_host_name(host)  # a name's addresses are checked when it is resolved, at send time
    if allowed_hosts and not listed_host(host, allowed_hosts):
        allowed = ", ".join(sorted(allowed_hosts))
        raise BadRequest(f"webhook host {host!r} is not allowed here; allowed (--webhook-hosts): {allowed}")
    if address is not None:
        refusal = address_refusal(address, deny_private=not private_allowed(host, allowed_hosts, allow_private))
        if refusal:
            hint = f"; {PRIVATE_HINT}" if not address_refusal(address, deny_private=False) else ""
            raise BadRequest(f"webhook may not target the {refusal}{hint}")
    return url


def parse_request(
    body: Body,
    *,
    file_mode: bool,
    sync: bool,
    max_items: int,
    allowed_webhook_hosts: frozenset[str] = frozenset(),
    allow_private_webhooks: bool = False,
) -> ParsedRequest:
    """Check a /sync or /async body against the recipe's mode and the limits."""
    document = parse_json_body(body)
    if "data" not in document:
        example = '{"data": {"a.png": "<base64>"}}' if file_mode else '{"data": [input1, input2]}'
        raise BadRequest(f"the request has no 'data' key; send {example}")
    check_fields(document, REQUEST_FIELDS, "the request body")
    data = document["data"]
    if file_mode:
        if not isinstance(data, dict):
            raise BadRequest(
                "this recipe takes files: send data as an object of file name to base64 content, "
                f'like {{"data": {{"a.png": "<base64>"}}}}, not a {type(data).__name__}'
            )
    elif not isinstance(data, list):
        hint = " (objects of files are for FILE recipes)" if isinstance(data, dict) else ""
        raise BadRequest(f"this recipe takes JSON inputs: send data as a list, not a {type(data).__name__}{hint}")
    if max_items and len(data) > max_items:
        raise PayloadTooLarge(
            f"{len(data)} inputs in one request; at most {max_items} are allowed (MAX_PER_CLIENT_BATCH): split the request"
        )
    webhook = _webhook(document.get("webhook"), sync, allowed_webhook_hosts, allow_private_webhooks)
    priority = _priority(document, DEFAULT_SYNC_PRIORITY if sync else DEFAULT_ASYNC_PRIORITY)
    unique_id = check_unique_id(document.get("unique_id"))
    timeout = check_timeout(document.get("timeout"))
    if file_mode:
        inputs, keys = _decode_files(data)
        return ParsedRequest(inputs, keys, priority, webhook, unique_id, timeout)
    return ParsedRequest(data, None, priority, webhook, unique_id, timeout)


def check_timeout(value: Any) -> Optional[float]:
    """A request's own deadline in seconds (null: none): a positive, finite number; /sync waits at
    most TIMEOUT whatever it asks."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        shown = repr(value)[:60] if isinstance(value, (str, int, float)) else type(value).__name__
        raise BadRequest(f"timeout must be a positive number of seconds, got {shown}; leave it out for no deadline "
                         "of your own")
    return float(value)


class FormOptions(NamedTuple):
    """The options of a multipart request."""

    priority: int
    webhook: Optional[str]
    unique_id: Optional[str]
    timeout: Optional[float]


def form_options(
    fields: dict[str, str], *, sync: bool, allowed_webhook_hosts: frozenset[str] = frozenset(),
    allow_private_webhooks: bool = False,
) -> FormOptions:
    """Priority, webhook, unique_id and timeout of a multipart request, sent as form fields (text):
    checked as in JSON, where an empty field counts as not sent."""
    options: dict[str, Any] = {name: value for name, value in fields.items() if value != ""}
    priority_text = options.get("priority")
    if priority_text is not None:
        number = priority_text.strip()
        options["priority"] = int(number) if number.isdigit() and number.isascii() else priority_text
    timeout = options.get("timeout")
    webhook = _webhook(options.get("webhook"), sync, allowed_webhook_hosts, allow_private_webhooks)
    priority = _priority(options, DEFAULT_SYNC_PRIORITY if sync else DEFAULT_ASYNC_PRIORITY)
    return FormOptions(priority, webhook, check_unique_id(options.get("unique_id")),
                       check_timeout(_number(timeout) if timeout is not None else None))


_DECIMAL = re.compile(r"\s*[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?\s*")


def _number(text: str) -> Any:
    """A form field's text as the JSON number it spells (like 2.5 or 1e3), else the text itself."""
    return float(text) if _DECIMAL.fullmatch(text) and text.isascii() else text


def _webhook(value: Any, sync: bool, allowed_hosts: frozenset[str], allow_private: bool) -> Optional[str]:
    """A request's webhook, checked; /sync takes none."""
    if value is None:
        return None
    if sync:
        raise BadRequest("webhook is for /async requests; /sync answers with the prediction itself")
    return validate_webhook(value, allowed_hosts, allow_private)


def parse_unique_id(body: Body) -> str:
    """The id of a /result or /cancel body. Other keys beside it are ignored (SPEC.md: 400 only when
    ``unique_id`` is missing or not a string); when it is missing, a misspelt one is named."""
    document = parse_json_body(body)
    unique_id = document.get("unique_id")
    if not isinstance(unique_id, str):
        unknown = next((key for key in document if key not in ID_FIELDS), None)
        hint = f" ({unknown_field_reason(unknown, ID_FIELDS, 'the request body')})" if unknown is not None else ""
        raise BadRequest('send {"unique_id": "<id from /async or /sync>"}; unique_id must be a string' + hint)
    return unique_id
