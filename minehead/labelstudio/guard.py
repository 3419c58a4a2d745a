"""What the backend refuses before any work is done: unknown callers, oversize or deeply nested
bodies, malformed tasks, webhook floods. No HTTP here: the Flask edge hands over headers and
bytes; each refusal is an error carrying the HTTP status it should answer with and a message
naming the problem and the limit.

    creds = Credentials.from_env(user, password)   # --auth-*, MINEHEAD_ML_BACKEND_*, BASIC_AUTH_*
    creds.check(authorization_header)              # True / False, constant time
    payload = parse_body(raw, limits)              # a dict, or Refused(413/400)
    check_tasks(payload["tasks"], limits)          # Refused naming the task
    bucket.take()                                  # Refused(429) when webhooks come too fast
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import os
import threading
import time

from minehead.core.errors import InvalidArgument


class Refused(InvalidArgument):
    """Bad input with the HTTP status the edge answers (400 unless a subclass says otherwise)."""

    http_status = 400


class TooLarge(Refused):
    http_status = 413


class TooFast(Refused):
    http_status = 429

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclasses.dataclass(frozen=True)
class Limits:
    # Label Studio's biggest call is /predict with a selection of tasks (ids and image refs, a
    # few hundred bytes each) and the labelling config: 10 000 tasks are a few MB.
    max_body_bytes: int = 16 << 20
    max_tasks: int = 10000
    # A task is {"id", "data": {...}, "annotations": [{"result": [{"value": {...}}]}]}: about 6
    # levels; 32 leaves room for custom data and stops the parser's recursion long before Python's.
    max_depth: int = 32
    webhook_rate: float = 20.0  # per second, sustained (Label Studio sends one per annotation saved)
    webhook_burst: int = 100


def json_depth(obj, limit: int) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), walking no deeper than limit + 1."""
    deepest, stack = 0, [(obj, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            d += 1
            if d > deepest:
                deepest = d
                if d > limit:
                    return d
            stack.extend((x, d) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def parse_body(raw: bytes, limits: Limits, what: str = "the request body") -> dict:
    if len(raw) > limits.max_body_bytes:
        raise TooLarge(f"{what} is {len(raw)} bytes; the limit is {limits.max_body_bytes} (--max-body-mb)")
    try:
        data = json.loads(raw)
    except RecursionError:  # the C parser gives up near Python's recursion limit (~1000 levels)
        raise Refused(f"{what} is JSON nested deeper than {limits.max_depth} levels (the limit)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise Refused(f"{what} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise Refused(f"{what} is not a JSON object (got {type(data).__name__})")
    if json_depth(data, limits.max_depth) > limits.max_depth:
        raise Refused(f"{what} is JSON nested deeper than {limits.max_depth} levels (the limit)")
    return data


def check_tasks(tasks, limits: Limits, what: str = "tasks") -> list[dict]:
    """Label Studio tasks as /predict and /train receive them: a list of objects, each with a
    `data` object and an integer id when it has one. The first malformed one is named."""
    if not isinstance(tasks, list):
        raise Refused(f"`{what}` must be a list of Label Studio tasks (got {type(tasks).__name__})")
    if len(tasks) > limits.max_tasks:
        raise TooLarge(f"{len(tasks)} {what} in one request; the limit is {limits.max_tasks} (--max-tasks)")
    for k, t in enumerate(tasks):
        if not isinstance(t, dict):
            raise Refused(f"{what}[{k}] is not a JSON object (got {type(t).__name__})")
        if not isinstance(t.get("data"), dict):
            raise Refused(f"{what}[{k}] has no `data` object (the task's fields, e.g. data.image)")
        tid = t.get("id")
        if tid is not None and (isinstance(tid, bool) or not isinstance(tid, int)):
            raise Refused(f"{what}[{k}].id is {tid!r}: a task id is an integer")
    return tasks


def webhook_action(payload) -> str:
    """A /webhook body's event name (START_TRAINING, ANNOTATION_CREATED, …); Refused otherwise."""
    if not isinstance(payload, dict):
        raise Refused("/webhook expects a JSON object")
    action = payload.get("action")
    if not isinstance(action, str):
        raise Refused("/webhook expects `action`: the Label Studio event's name (e.g. START_TRAINING)")
    return action


def project_id(value, what: str = "project") -> int:
    """Label Studio's project as it sends it: 3, "3", "3.1700000000" (project.timestamp) or {"id": 3}."""
    v = value.get("id") if isinstance(value, dict) else value
    try:
        pid = int(str(v).split(".", 1)[0]) if not isinstance(v, bool) and v is not None else None
    except ValueError:
        pid = None
    if pid is None or pid < 0:
        raise Refused(f"`{what}` is {value!r}: a Label Studio project id (an integer) was expected")
    return pid


class Credentials:
    """HTTP basic auth credentials; an instance with user None lets everyone in."""

    def __init__(self, user: str | None, password: str | None) -> None:
        if bool(user) != bool(password):
            raise InvalidArgument("basic auth needs both a user and a password (--auth-user and --auth-password)")
        self.user = user or None
        self._want = hashlib.sha256(f"{user}:{password}".encode()).digest() if user else b""

    @classmethod
    def from_env(cls, user: str | None = None, password: str | None = None, env=os.environ) -> "Credentials":
        """Flags first, then minehead's names, then label-studio-ml-backend's (BASIC_AUTH_USER/PASS)."""
        user = user or env.get("MINEHEAD_ML_BACKEND_USER") or env.get("BASIC_AUTH_USER")
        password = password or env.get("MINEHEAD_ML_BACKEND_PASSWORD") or env.get("BASIC_AUTH_PASS")
        return cls(user, password)

    @property
    def enabled(self) -> bool:
        return self.user is not None

    def check(self, authorization: str | None) -> bool:
        if not self.enabled:
            return True
        scheme, _, value = (authorization or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            given = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        # digests of equal length: compare_digest then leaks neither the password nor its length
        return hmac.compare_digest(hashlib.sha256(given).digest(), self._want)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


class TokenBucket:
    """`rate` a second sustained, `burst` at once; take() raises TooFast when empty."""

    def __init__(self, rate: float, burst: int, what: str = "webhooks") -> None:
        self.rate, self.burst, self.what = rate, burst, what
        self._tokens, self._t = float(burst), time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> None:
        if self.rate <= 0:
            return
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._t) * self.rate)
            self._t = now
            if self._tokens < 1:
                wait = (1 - self._tokens) / self.rate
                raise TooFast(f"too many {self.what}: more than {self.rate:g}/s (burst {self.burst}); "
                              f"retry in {wait:.1f} s", wait)
            self._tokens -= 1
