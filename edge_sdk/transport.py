"""How the edge reaches the verifier: a small protocol and its HTTP implementation.

The engine only calls ``open_session`` / ``verify`` / ``close_session``; a test or a
benchmark can put an emulated link or an in-process verifier behind the same calls.
"""

from __future__ import annotations

from typing import Protocol

import httpx

from privacy import OpenSession, SessionOpened, VerifyRequest, VerifyResponse, decode, encode

from .errors import VerifierError, VerifierUnavailable, VocabMismatchError

MSGPACK = "application/msgpack"


class Verifier(Protocol):
    bytes_sent: int       # request bodies, cumulative
    bytes_received: int   # response bodies, cumulative

    def open_session(self, req: OpenSession) -> SessionOpened: ...

    def verify(self, session_id: str, req: VerifyRequest) -> VerifyResponse: ...

    def close_session(self, session_id: str) -> None: ...


class HttpVerifier:
    """msgpack over HTTP/1.1 keep-alive (httpx). Counts body bytes in each direction."""

    def __init__(self, url: str, *, connect_timeout: float = 5.0, read_timeout: float = 60.0):
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers={"content-type": MSGPACK, "accept": MSGPACK},
                                  timeout=httpx.Timeout(read_timeout, connect=connect_timeout))
        self.bytes_sent = 0
        self.bytes_received = 0

    def _call(self, method: str, path: str, body: dict | None = None) -> dict | None:
        data = encode(body) if body is not None else None
        try:
            resp = self._http.request(method, path, content=data)
        except httpx.HTTPError as exc:
            raise VerifierUnavailable(f"cannot reach the verifier at {self.url}: {type(exc).__name__}: {exc}") from exc
        self.bytes_sent += len(data or b"")
        self.bytes_received += len(resp.content)
        if resp.status_code >= 400:
            raise _error_from(resp)
        if resp.status_code == 204:
            return None
        try:
            return decode(resp.content)
        except Exception as exc:
            raise VerifierUnavailable(f"unreadable response from the verifier: {exc}") from exc

    def open_session(self, req: OpenSession) -> SessionOpened:
        return SessionOpened.from_dict(self._call("POST", "/v1/sessions", req.to_dict()))

    def verify(self, session_id: str, req: VerifyRequest) -> VerifyResponse:
        return VerifyResponse.from_dict(self._call("POST", f"/v1/sessions/{session_id}/verify", req.to_dict()))

    def close_session(self, session_id: str) -> None:
        self._call("DELETE", f"/v1/sessions/{session_id}")

    def close(self) -> None:
        self._http.close()


def _error_from(resp: httpx.Response) -> VerifierError:
    try:
        err = resp.json()["error"]
        code, message = str(err.pop("code")), str(err.pop("message", ""))
    except Exception:
        code, message, err = "http_error", resp.text[:200], {}
    cls = VocabMismatchError if code == "vocab_mismatch" else VerifierError
    return cls(resp.status_code, code, message, err)
