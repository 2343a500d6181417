"""The request router's settings (claims 2, 12, 50-55): ``[router]`` in the cluster TOML.

Each router instance is a ``NodeConfig`` (name, ``listen`` ADDRESS:PORT, optional
``admin``) in ``[[routers]]``; everything the instances share lives here.
``RouterSettings.problems(config)`` cross-checks the settings against the
cluster (rules naming unknown applications, a TLS key without a certificate).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:  # hanlb.config may import this module: no import cycle at run time
    from ..config import ClusterConfig, NodeConfig

__all__ = ["HeaderRule", "RouteRule", "RouterSettings", "router_nodes", "router_settings"]

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$"
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_COOKIE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$")

Name = Annotated[str, Field(pattern=_NAME)]
Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0, le=86400)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _header_name(name: str) -> str:
    if not _TOKEN.match(name):
        raise ValueError(f"{name!r} is not a header name")
    return name


def _header_value(value: str) -> str:
    if any(c in value for c in "\r\n\0"):
        raise ValueError("a header value cannot hold CR, LF or NUL")
    return value


class RouteRule(_Model):
    """Requests whose host and path match go to ``app``; the first matching rule wins."""

    app: Name
    host: str | None = None
    """``www.example.com`` (exact, any port) or ``*.example.com`` (any subdomain); None: any."""
    path_prefix: str = "/"

    @field_validator("host")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        if v is not None:
            if not v or any(c in v for c in " \t\r\n/"):
                raise ValueError(f"{v!r} is not a host name")
            return v.lower()
        return v

    @field_validator("path_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("a path prefix starts with '/'")
        return v

    def matches(self, host: str, path: str) -> bool:
        if self.host is not None:
            if self.host.startswith("*."):
                if not host.endswith(self.host[1:]):
                    return False
            elif host != self.host:
                return False
        return path.startswith(self.path_prefix)


class HeaderRule(_Model):
    """Header changes for one application's requests and responses (``app = "*"``: all)."""

    app: str = "*"
    request_set: dict[str, str] = Field(default_factory=dict)
    """Headers added to the request, replacing any of the same name."""
    request_remove: list[str] = Field(default_factory=list)
    response_set: dict[str, str] = Field(default_factory=dict)
    response_remove: list[str] = Field(default_factory=list)

    @field_validator("request_set", "response_set")
    @classmethod
    def _set(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            _header_name(name)
            _header_value(value)
        return v

    @field_validator("request_remove", "response_remove")
    @classmethod
    def _remove(cls, v: list[str]) -> list[str]:
        for name in v:
            _header_name(name)
        return v


class RouterSettings(_Model):
    """What every request router instance shares."""

    default_app: Name | None = None
    """The application of a request no rule matches; None: the first application."""
    rules: list[RouteRule] = Field(default_factory=list)
    header_rules: list[HeaderRule] = Field(default_factory=list)
    backend_ports: dict[str, Port] = Field(default_factory=dict)
    """Backend port per application, when it is not the application's own ``port``."""

    pool_min_idle: Annotated[int, Field(ge=0, le=1000)] = 2
    """Pre-established idle connections kept open to each healthy host (claims 51-53)."""
    pool_max_idle: Annotated[int, Field(ge=1, le=10000)] = 64
    """Idle connections beyond this are closed when released."""
    pool_idle_timeout: Seconds = 30.0
    """A pooled connection idle this long is closed (and replaced up to ``pool_min_idle``)."""
    pool_check_interval: Seconds = 0.5
    """How often the pool keeper tops up the pools and retries hosts marked down."""
    host_down_for: Seconds = 1.0
    """A host whose connect failed is skipped this long (or until a keeper connect works)."""

    max_header_bytes: Annotated[int, Field(ge=256, le=1 << 20)] = 16384
    """Request line plus headers; beyond it: 431."""
    max_headers: Annotated[int, Field(ge=1, le=10000)] = 100
    max_body_bytes: Annotated[int, Field(ge=0, le=1 << 40)] = 64 << 20
    """Request body; beyond it: 413."""
    client_header_timeout: Seconds = 10.0
    """From a request's first byte to its last header; beyond it: 408 and close."""
    client_idle_timeout: Seconds = 60.0
    """A keep-alive client connection idle this long is closed; also the body read timeout."""
    backend_connect_timeout: Seconds = 2.0
    backend_response_timeout: Seconds = 30.0
    """Wait for the response head, and between body reads; beyond it: 504 (or close)."""

    tls_cert: str | None = None
    """PEM certificate chain; with ``tls_key`` the router terminates TLS."""
    tls_key: str | None = None

    affinity: bool = True
    """Keep a client on one host with the affinity cookie (and its TLS session)."""
    affinity_cookie: str = "HANLB_AFFINITY"
    forward_affinity_cookie: bool = False
    """False (as HAProxy's ``cookie ... indirect``): the affinity cookie is the
    router's business and is taken out of the Cookie header backends see."""
    affinity_max_age: Annotated[int, Field(ge=0)] | None = None
    """Max-Age of the affinity cookie in seconds; None: a browser-session cookie."""
    app_cookie: str | None = None
    """An application's own session cookie (``JSESSIONID``): it also pins its host."""
    tls_session_affinity: bool = True
    affinity_cache_size: Annotated[int, Field(ge=1, le=10_000_000)] = 100_000
    tracker_timeout: Seconds = 0.5
    """Longest a request waits for the session tracker to look up an affinity."""

    @field_validator("affinity_cookie", "app_cookie")
    @classmethod
    def _cookie(cls, v: str | None) -> str | None:
        if v is not None and not _COOKIE.match(v):
            raise ValueError(f"{v!r} is not a cookie name")
        return v

    @model_validator(mode="after")
    def _tls_pair(self) -> RouterSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.pool_min_idle > self.pool_max_idle:
            raise ValueError("pool_min_idle is above pool_max_idle")
        return self

    def problems(self, config: ClusterConfig) -> list[tuple[str, str]]:
        """Cross-checks against the cluster: ``(field, reason)`` pairs, empty if fine."""
        apps = {a.name for a in config.applications}
        out: list[tuple[str, str]] = []
        if self.default_app is not None and self.default_app not in apps:
            out.append(("router.default_app", f"no application named {self.default_app!r}"))
        for i, rule in enumerate(self.rules):
            if rule.app not in apps:
                out.append((f"router.rules[{i}].app", f"no application named {rule.app!r}"))
        for i, hr in enumerate(self.header_rules):
            if hr.app != "*" and hr.app not in apps:
                out.append((f"router.header_rules[{i}].app", f"no application named {hr.app!r}"))
        for app in self.backend_ports:
            if app not in apps:
                out.append((f"router.backend_ports.{app}", f"no application named {app!r}"))
        return out


def router_settings(config: ClusterConfig) -> RouterSettings:
    """``config.router`` once the cluster config carries it, else the defaults."""
    value = getattr(config, "router", None)
    return value if isinstance(value, RouterSettings) else RouterSettings()


def router_nodes(config: ClusterConfig) -> list[NodeConfig]:
    """``config.routers`` once the cluster config carries it, else none."""
    value = getattr(config, "routers", None)
    return list(value) if isinstance(value, list) else []
