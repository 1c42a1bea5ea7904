"""What the agent client and the observer share about (re)connecting.

Both open the same WebSocket endpoint, so they read the broker's refusals and
welcomes the same way and back off alike between attempts; only what they do
with a failure (give up, report, retry) is their own.
"""

from __future__ import annotations

import asyncio
import json
import random

from websockets.exceptions import InvalidStatus

from ._errors import AgentBusError, ConnectionRefused, error_body
from ._models import Welcome
from ._ws import Connection

# Upgrade refusals that do not change by retrying.
TERMINAL_STATUSES = frozenset({400, 401, 403, 404})


def backoff(attempt: int, initial: float, maximum: float) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random."""
    ceiling = min(maximum, initial * 2.0 ** min(attempt, 30))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


class Backoff:
    """The delays between connection attempts: each longer, until reset."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum
        self.attempt = 0

    def next(self) -> float:
        delay = backoff(self.attempt, self.initial, self.maximum)
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


def refusal(exc: InvalidStatus) -> ConnectionRefused:
    """The refused upgrade as an error, with the broker's code when it sent one."""
    status = exc.response.status_code
    body = error_body(exc.response.body or b"")
    if body is not None:
        error = AgentBusError.from_body(body, status=status)
        return ConnectionRefused(
            error.code, error.message, field=error.field, status=status, body=body
        )
    return ConnectionRefused("http_error", f"the upgrade was refused with HTTP {status}", status=status)


def is_terminal(error: ConnectionRefused) -> bool:
    """Whether reconnecting cannot help: the broker would refuse it the same way."""
    return error.status in TERMINAL_STATUSES


async def read_welcome(ws: Connection, timeout: float) -> Welcome:
    """The connection's first frame, which must be its welcome.

    Raises TimeoutError, ConnectionClosed, or ValueError / KeyError / TypeError
    for a first frame that is no welcome; each caller decides what that means.
    """
    first = await asyncio.wait_for(ws.recv(), timeout)
    data = json.loads(first)
    if not isinstance(data, dict) or data.get("op") != "welcome":
        raise ValueError(f"expected a welcome frame, got {first!r:.200}")
    return Welcome.from_json(data)
