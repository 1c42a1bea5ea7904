"""Checking the settings a client is given, and turning them into URLs."""

from __future__ import annotations

import uuid
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

_HTTP_FOR = {"http": "http", "https": "https", "ws": "http", "wss": "https"}
_WS_FOR = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}


def check_base_url(url: str) -> str:
    """The broker's base URL without a trailing slash.

    ``http://host:port`` (or ``https``, ``ws``, ``wss``), optionally with a path
    prefix when the broker sits behind a proxy. Anything else is a ValueError.
    """
    if not isinstance(url, str) or not url:
        raise ValueError("url must be the broker's address, e.g. 'http://127.0.0.1:8080'")
    parts = urlsplit(url)
    if parts.scheme not in _HTTP_FOR or not parts.netloc:
        raise ValueError(
            f"url must look like 'http://127.0.0.1:8080' (http, https, ws or wss), not {url!r}"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"url must not carry a query string or fragment: {url!r}")
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def http_base(url: str) -> str:
    parts = urlsplit(check_base_url(url))
    return urlunsplit((_HTTP_FOR[parts.scheme], parts.netloc, parts.path, "", ""))


def ws_url(url: str, project_id: str, params: dict[str, str]) -> str:
    parts = urlsplit(check_base_url(url))
    path = f"{parts.path}/ws/agent/messages/{quote(project_id, safe='')}"
    query = urlencode(params, quote_via=quote)
    return urlunsplit((_WS_FOR[parts.scheme], parts.netloc, path, query, ""))


def check_project_id(project_id: str) -> str:
    """A project id is a UUID; written back lowercase and hyphenated."""
    try:
        return str(uuid.UUID(str(project_id)))
    except ValueError:
        raise ValueError(f"project_id must be a project's UUID, not {project_id!r}") from None


def check_agent_id(agent_id: str, what: str = "agent_id") -> str:
    if not isinstance(agent_id, str) or not agent_id:
        raise ValueError(f"{what} must be a non-empty string")
    if len(agent_id) > 255:
        raise ValueError(f"{what} must be at most 255 characters")
    return agent_id


def auth_headers(token: str | None) -> dict[str, str]:
    if token is None:
        return {}
    if not isinstance(token, str) or not token:
        raise ValueError("token must be a non-empty string (or None on an open broker)")
    return {"Authorization": f"Bearer {token}"}
