"""Label Studio's REST API, the little the ML backend needs: who am I, a project's export.

Authentication takes either kind of Label Studio token:
    - a legacy API token ("Authorization: Token …"; Label Studio 1.23 refuses them unless the
      organisation enables them, or the instance runs with LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true);
    - a personal access token (a JWT refresh token): exchanged at /api/token/refresh for a
      short-lived access token, sent as "Authorization: Bearer …", renewed before it expires.
Only the configured instance is ever contacted and redirects are never followed (a redirect
could carry the token to another host).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from minehead.core.errors import FailedPrecondition, InvalidArgument, Unavailable
from minehead.importers import MAX_JSON_BYTES

ACCESS_TTL_S = 240  # Label Studio's access tokens live 5 minutes; renew a minute early


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


class LabelStudioAPI:
    def __init__(self, url: str, token: str | None, timeout: float = 60.0) -> None:
        u = urlsplit(url or "")
        if u.scheme not in ("http", "https") or not u.netloc:
            raise InvalidArgument(f"Label Studio URL {url!r} is not an http(s) URL like http://127.0.0.1:8080")
        self.url = f"{u.scheme}://{u.netloc}"
        self.token = token or ""
        self.timeout = timeout
        self._opener = urllib.request.build_opener(_NoRedirect)
        self._lock = threading.Lock()
        self._access: tuple[str, float] | None = None

    @property
    def is_personal_token(self) -> bool:
        return self.token.count(".") == 2  # a JWT: header.payload.signature

    def authorization(self) -> str:
        """The Authorization header value for the next request."""
        if not self.token:
            raise FailedPrecondition("no Label Studio token: set MINEHEAD_LABELSTUDIO_TOKEN (or LABEL_STUDIO_API_KEY) to a "
                                     "personal access token or a legacy API token")
        if not self.is_personal_token:
            return f"Token {self.token}"
        with self._lock:
            if self._access is None or time.monotonic() > self._access[1]:
                body = self._raw("POST", "/api/token/refresh", {"refresh": self.token}, auth=None)
                self._access = (json.loads(body)["access"], time.monotonic() + ACCESS_TTL_S)
            return f"Bearer {self._access[0]}"

    def _raw(self, method: str, path: str, payload=None, *, auth: str | None, max_bytes: int = MAX_JSON_BYTES) -> bytes:
        data = json.dumps(payload).encode() if payload is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if auth:
            headers["Authorization"] = auth
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with self._opener.open(req, timeout=self.timeout) as r:
                body = r.read(max_bytes + 1)
        except urllib.error.HTTPError as e:
            detail = e.read(2000).decode("utf-8", "replace")
            hint = (" (Label Studio 1.23 disables legacy tokens by default: enable them in the organisation's "
                    "settings, or use a personal access token)") if "legacy token" in detail else ""
            raise FailedPrecondition(f"Label Studio {method} {path}: HTTP {e.code}: {detail[:300]}{hint}") from None
        except OSError as e:
            raise Unavailable(f"Label Studio at {self.url} is unreachable ({getattr(e, 'reason', None) or e})") from None
        if len(body) > max_bytes:
            raise InvalidArgument(f"Label Studio {path} answered more than {max_bytes} bytes; refused")
        return body

    def request(self, method: str, path: str, payload=None, max_bytes: int = MAX_JSON_BYTES) -> bytes:
        return self._raw(method, path, payload, auth=self.authorization(), max_bytes=max_bytes)

    def get_json(self, path: str):
        return json.loads(self.request("GET", path))

    def export_tasks(self, project_id: int, max_bytes: int = MAX_JSON_BYTES) -> bytes:
        """The project's tasks with annotations (only tasks someone finished), as the JSON export
        `minehead datasets import` reads. The bytes are returned unparsed: the importer checks them."""
        return self.request("GET", f"/api/projects/{int(project_id)}/export?exportType=JSON&download_all_tasks=false",
                            max_bytes=max_bytes)
