"""Bounds on what one connection may hold: uvicorn's own HTTP/1.1 protocol, subclassed.

uvicorn bounds idle keep-alive (``timeout_keep_alive``) but not the time a client may take to
send a request's headers, nor how many connections one client may hold open; both let a few
slow or idle clients hold the server's sockets. The request body's time is bounded by the
app's body reader (:func:`runtime.serving.server.read_json`).
"""

from __future__ import annotations

import collections

# A client this far over its limit is not even answered: its connections close at once, so a
# flood of them holds no sockets while waiting for request lines.
HARD_FACTOR = 2


def bounded_protocol(*, header_timeout: float, max_client_connections: int, refuse_app):
    """uvicorn's HTTP protocol class (httptools if installed, else h11) closing a connection
    whose request headers take longer than ``header_timeout`` seconds (from the connection, or
    from a keep-alive request's first byte), and answering ``refuse_app`` (an ASGI app) on a
    client's connections beyond ``max_client_connections`` (by peer address)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    per_client: collections.Counter[str] = collections.Counter()

    class BoundedProtocol(AutoHTTPProtocol):
        _header_timer = None
        _peer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if self.client:
                self._peer = self.client[0]
                per_client[self._peer] += 1
                held = per_client[self._peer]
                if held > HARD_FACTOR * max_client_connections:
                    transport.close()
                    return
                if held > max_client_connections:
                    self.app = refuse_app  # answers the request, then closes
            self._await_headers()

        def connection_lost(self, exc) -> None:
            if self._peer is not None:
                per_client[self._peer] -= 1
                if not per_client[self._peer]:
                    del per_client[self._peer]
                self._peer = None
            self._stop_header_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            # A keep-alive connection's next request starts with its first byte; uvicorn's
            # keep-alive timer stops there, so the header deadline starts.
            if self._header_timer is None and self._between_requests():
                self._await_headers()
            super().data_received(data)
            if self._header_timer is not None and not self._between_requests():
                self._stop_header_timer()  # the headers are in: a request cycle started

        def _unsupported_upgrade_warning(self) -> None:
            # The server has no WebSocket routes (ws="none"): an Upgrade header is served as
            # plain HTTP, and is no reason for two warnings per request in the log.
            pass

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _await_headers(self) -> None:
            self._header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _stop_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing() and self._between_requests():
                self.transport.close()

    return BoundedProtocol

