"""The pages a person opens in a browser: the live status page (``/``) and the interactive API
page (``/docs``), with their assets. All of them come from installed packages (our own
``fastdeploy/static`` and the ``swagger-ui-py`` package's copy of Swagger UI): no CDN, so they
work on a machine without internet. The pages hold no data and need no key; what they show
comes from ``/status.json`` and ``/openapi.json``, which do.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import NamedTuple, Optional

from fastdeploy.errors import NotFound

_OWN = Path(__file__).resolve().parent.parent / "static"
_OWN_FILES = ("status.html", "status.css", "status.js", "docs.html", "docs.css", "docs.js")
_SWAGGER_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")
_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".js": "text/javascript; charset=utf-8", ".png": "image/png"}

# Pages run our scripts only, from this server; they may not be framed (clickjacking). Swagger UI
# sets inline styles and shows data: images, hence those two allowances.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
ASSET_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "public, max-age=3600"}


class Asset(NamedTuple):
    body: bytes
    media_type: str


def own(name: str) -> Asset:
    """One of our own static files (a fixed list: a name from the URL never reaches the disk)."""
    if name not in _OWN_FILES:
        raise NotFound(f"no file /static/{name}")
    return _read(_OWN / name)


def swagger(name: str) -> Asset:
    """One of Swagger UI's files, as the ``swagger-ui-py`` package installed them."""
    folder = _swagger_folder()
    if name not in _SWAGGER_FILES or folder is None:
        raise NotFound(f"no file /docs/{name}" + ("" if folder else "; the swagger-ui-py package is not installed"))
    return _read(folder / name)


@functools.lru_cache(maxsize=None)
def _read(path: Path) -> Asset:
    """Read once per process, when first asked for (never at import)."""
    return Asset(path.read_bytes(), _TYPES.get(path.suffix, "application/octet-stream"))


@functools.lru_cache(maxsize=1)
def _swagger_folder() -> Optional[Path]:
    spec = importlib.util.find_spec("swagger_ui")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "static"
