"""Serving: the batching scheduler (``scheduler``, numpy only) and the HTTP server over it
(``server``, the ``serve`` extra: Starlette, uvicorn, prometheus-client)."""
