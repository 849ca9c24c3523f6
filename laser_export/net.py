"""Bounded waits for every network operation, through huggingface_hub's public client settings.

One *deadline* per network operation (``--hub-timeout`` / ``LASER_EXPORT_HUB_TIMEOUT``, default and
validation in :mod:`laser_export.defaults`) (a Hub download of a model source, ``apply``'s snapshot download,
a push, a dataset or CounterFact download): :func:`deadline` gives the operation ``seconds`` from its
start, plus credit for the bytes it moves (one second per :data:`MIN_RATE` bytes, so a multi-GB download
that keeps flowing at a normal rate is never cut, while a server that stalls or trickles is given up on
at the deadline: total time, not per read).

How it is enforced: huggingface_hub (2.x) sends every request through one shared ``httpx2.Client``
made by the factory given to its public :func:`huggingface_hub.set_client_factory`. We install a
client (same event hooks as huggingface_hub's own) whose ``send`` clamps each request's
connect/read/write timeouts to the time left, checks the deadline between the chunks of every body it
reads, and raises ``DeadlineExceeded`` (an ``httpx2.TransportError`` that huggingface_hub does
*not* retry) once it has passed, so its own retries (5, with back-off) cannot stretch the wait.
Transfers through ``hf_xet`` (Xet uploads/downloads) bypass httpx, so no deadline could bound them: inside a
deadline huggingface_hub's public ``HF_HUB_DISABLE_XET`` setting is turned on for the operation, and every
byte moves over HTTP (the Hub serves Xet-backed files over HTTP and takes LFS uploads), bounded. A user who
wants Xet's transfers anyway sets ``HF_HUB_DISABLE_XET=0`` explicitly (:func:`xet_in_use`): those transfers are
then not bounded (said where it matters), and a file the Hub announces as Xet-backed (``X-Xet-Hash``) credits
the operation with its size, so the requests after its Xet download are not refused for the time it took.
"""

from __future__ import annotations

import os
import re
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from .defaults import HUB_TIMEOUT_VAR

__all__ = ["MIN_RATE", "Operation", "deadline", "is_deadline_error", "session",
           "http_client", "redact", "xet_in_use"]

#: bytes per second a transfer must sustain to earn more time than its deadline
MIN_RATE = 64 * 1024
ENV = HUB_TIMEOUT_VAR


class _State:
    lock = threading.Lock()
    deadline: float | None = None
    seconds: float | None = None
    expired = False


def expired() -> bool:
    """True when the current operation's deadline has passed."""
    return _State.expired or (_State.deadline is not None and time.monotonic() >= _State.deadline)


class Operation:
    """What :func:`deadline` yields: ``seconds`` and, once the block has ended, ``expired`` (the deadline
    passed: whatever error the libraries made of it, it is a timeout)."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.expired = False

    def explain(self, err: BaseException | None = None) -> str:
        """`` (no complete answer within N s ...)`` when the operation timed out, else ``""``."""
        if self.seconds is None or not (self.expired or is_deadline_error(err)):
            return ""
        return (f" (no complete answer within the {self.seconds:g} s deadline of this network operation; "
                f"raise it with --hub-timeout or {ENV})")


def _remaining() -> float | None:
    with _State.lock:
        if _State.deadline is None:
            return None
        left = _State.deadline - time.monotonic()
        if left <= 0:
            _State.expired = True
        return left


def _credit(nbytes: int) -> None:
    with _State.lock:
        if _State.deadline is not None and nbytes > 0:
            _State.deadline += nbytes / MIN_RATE


def _message() -> str:
    return (f"no complete answer within the {_State.seconds:g} s deadline of this network operation "
            f"(--hub-timeout / {ENV})")


_CLASSES: dict = {}


def _classes():
    """The httpx2-based classes, built once (httpx2 is imported only when the network is used)."""
    if _CLASSES:
        return _CLASSES
    import httpx2

    class _DeadlineExceeded(httpx2.TransportError):
        """The operation's deadline passed (not retried by huggingface_hub: not a TimeoutException)."""

    class _Stream(httpx2.SyncByteStream):
        def __init__(self, inner, request):
            self.inner, self.request = inner, request

        def __iter__(self):
            for chunk in _guard(iter(self.inner), self.request):
                _credit(len(chunk))
                yield chunk

        def close(self):
            self.inner.close()

    class _Client(httpx2.Client):
        def send(self, request, *, stream=False, **kwargs):
            _clamp(request, self.timeout)
            _credit(int(request.headers.get("content-length") or 0))
            try:
                response = super().send(request, stream=True, **kwargs)
            except httpx2.TimeoutException as err:
                if expired():
                    raise _DeadlineExceeded(_message(), request=request) from err
                raise
            if "x-xet-hash" in response.headers:  # the file's bytes will move over Xet, outside httpx:
                _credit(int(response.headers.get("x-linked-size") or 0))  # don't expire while they do
            response.stream = _Stream(response.stream, request)
            if not stream:
                try:
                    response.read()
                finally:
                    response.close()
            return response

    def _guard(chunks, request):
        while True:
            left = _remaining()
            if left is not None and left <= 0:
                raise _DeadlineExceeded(_message(), request=request)
            try:
                chunk = next(chunks)
            except StopIteration:
                return
            except httpx2.TimeoutException as err:
                if expired():
                    raise _DeadlineExceeded(_message(), request=request) from err
                raise
            yield chunk

    def _clamp(request, default):
        left = _remaining()
        if left is None:
            return
        if left <= 0:
            raise _DeadlineExceeded(_message(), request=request)
        given = request.extensions.get("timeout") or httpx2.Timeout(default).as_dict()
        request.extensions["timeout"] = {k: left if v is None else min(v, left) for k, v in given.items()}

    _CLASSES.update(exc=_DeadlineExceeded, client=_Client)
    return _CLASSES


def session():
    """huggingface_hub's shared HTTP client, with the deadline-aware client installed (public API:
    ``set_client_factory`` / ``get_session``; installed again if another factory replaced it)."""
    from huggingface_hub import get_session, set_client_factory

    client_class = _classes()["client"]
    base = get_session()
    if not isinstance(base, client_class):
        hooks = {k: list(v) for k, v in base.event_hooks.items()}  # huggingface_hub's own (offline check, ids)
        set_client_factory(lambda: client_class(event_hooks=hooks, follow_redirects=True, timeout=None))
    return get_session()


def http_client():
    """A deadline-aware ``httpx2.Client`` for plain URLs (not the Hub: no Hub headers, no offline
    check); close it after use."""
    return _classes()["client"](follow_redirects=True, timeout=None)


def xet_in_use() -> bool:
    """Whether our network operations move bytes through ``hf_xet`` (not bounded by a deadline): only when it is
    installed and the user asked for it explicitly with ``HF_HUB_DISABLE_XET`` set to a false value (0/false/no)."""
    import importlib.util

    asked = os.environ.get("HF_HUB_DISABLE_XET", "").strip().lower() in ("0", "false", "no", "off")
    return asked and importlib.util.find_spec("hf_xet") is not None


@contextmanager
def _xet_off() -> Iterator[None]:
    """huggingface_hub's ``HF_HUB_DISABLE_XET`` on for the block (unless :func:`xet_in_use`)."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_DISABLE_XET
    constants.HF_HUB_DISABLE_XET = saved or not xet_in_use()
    try:
        yield
    finally:
        constants.HF_HUB_DISABLE_XET = saved


@contextmanager
def deadline(seconds: float | None) -> Iterator[Operation]:
    """Bound the network operation run inside the block to ``seconds`` (plus transfer credit, see the
    module docstring); ``None``: no bound. Nested blocks keep the earlier deadline."""
    op = Operation(seconds)
    if seconds is None:
        yield op
        return
    session()  # install the deadline-aware client in huggingface_hub
    with _State.lock:
        saved = (_State.deadline, _State.seconds, _State.expired)
        new = time.monotonic() + float(seconds)
        if _State.deadline is None or new < _State.deadline:
            _State.deadline, _State.seconds, _State.expired = new, float(seconds), False
    try:
        with _xet_off():
            yield op
    finally:
        with _State.lock:
            op.expired = _State.expired or (_State.deadline is not None and time.monotonic() >= _State.deadline)
            _State.deadline, _State.seconds, _State.expired = saved


def is_deadline_error(err: BaseException | None) -> bool:
    """True when ``err`` (or anything in its cause/context chain) is a :class:`DeadlineExceeded`."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if _CLASSES and isinstance(err, _CLASSES["exc"]):
            return True
        err = err.__cause__ or err.__context__
    return False


_SECRETS = [
    (re.compile(r"hf_[A-Za-z0-9]{8,}"), "hf_***"),
    (re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?)(bearer\s+|basic\s+)?[^\s,'\"}]+"), r"\1\2***"),
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 ***"),
    (re.compile(r"(?i)((?:access_|api_|hf_)?token[\"']?\s*[:=]\s*[\"']?)[^\s,'\"&}]+"), r"\1***"),
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]*):[^/\s@]*@"), r"\1:***@"),  # scheme://user:password@
]


def _client_tokens() -> list[str]:
    """Every token huggingface_hub could send: ``HF_TOKEN`` (and the legacy name), the token file in
    use, and every token stored by ``hf auth login``."""
    found = [os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")]
    try:
        from huggingface_hub import get_token
        from huggingface_hub.utils import get_stored_tokens

        found.append(get_token())
        found.extend((get_stored_tokens() or {}).values())
    except Exception:  # noqa: BLE001 - an unreadable token file holds nothing we could leak
        pass
    return [t for t in found if isinstance(t, str)]


def redact(text: str, *secrets: object) -> str:
    """``text`` with every token the Hub client could send (whatever its form), Authorization header
    values, ``token=`` values and the password of ``scheme://user:password@host`` replaced by ``***``."""
    for secret in sorted({s for s in (*secrets, *_client_tokens()) if isinstance(s, str)}, key=len, reverse=True):
        secret = secret.strip()
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    for pattern, repl in _SECRETS:
        text = pattern.sub(repl, text)
    return text
