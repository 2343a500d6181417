"""The request router (claims 2, 12, 50-55): an HTTP/1.1 reverse proxy.

It terminates client connections (and TLS), routes every request on its own
to an application's host (rules, session affinity through the session
tracker, health and load tokens), and sends it over pre-established pooled
backend connections, modified on the way. See ``proxy.py`` for the data path,
``http.py`` for framing, ``pool.py`` for the pools, ``affinity.py`` for the
sessions and ``service.py`` for the process.

``RouterService`` lives in ``hanlb.router.service``; this package imports only the
settings, so that ``hanlb.config`` can import them without an import cycle.
"""

from .config import HeaderRule, RouterSettings, RouteRule

__all__ = ["HeaderRule", "RouteRule", "RouterSettings"]
