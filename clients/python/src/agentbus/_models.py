"""The values the client hands out: messages, receipts, welcomes, REST pages."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Mapping

JSON = Any
"""Any value that :func:`json.dumps` accepts."""


class MessageType(enum.StrEnum):
    """The message types the agents of agentbus use.

    The broker accepts any identifier as a type; these are the conventional
    ones (the eight of the seed-004 agent protocol among them). Being a
    :class:`~enum.StrEnum`, a member can be passed wherever a type is expected.
    """

    STATUS = "status"
    REQUEST = "request"
    RESPONSE = "response"
    DISCOVERY = "discovery"
    COORDINATION = "coordination"
    TASK_ASSIGNMENT = "task_assignment"
    STATUS_UPDATE = "status_update"
    ESCALATION = "escalation"
    RESULT_REPORT = "result_report"
    ERROR_REPORT = "error_report"
    HEARTBEAT = "heartbeat"
    CAPABILITY_QUERY = "capability_query"
    CAPABILITY_RESPONSE = "capability_response"


class Priority(enum.IntEnum):
    """Message priority: lower is more urgent. The broker's default is NORMAL."""

    CRITICAL = 0
    HIGH = 1
    NORMAL = 2
    LOW = 3


class ConnectionState(enum.StrEnum):
    """Where a client's connection is.

    ``CONNECTING`` until the first welcome; ``CONNECTED`` while a connection is
    live; ``RECONNECTING`` between a lost connection and the next welcome;
    ``CLOSED`` once closed by :meth:`AgentBus.close` or for good by the broker.
    """

    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


def _ts(value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"expected an RFC 3339 timestamp, got {value!r}")
    return datetime.fromisoformat(value)


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _opt_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _opt_bool(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


@dataclass(frozen=True)
class Message:
    """A committed message, as delivered on the WebSocket or listed over REST.

    The fields are those of the broker's ``message`` frame; the REST-only ones
    (``client_msg_id``, ``delivered_at``, ``read_at``, ``replied_at``) are
    ``None`` on delivered messages. ``raw`` is the frame or object as received.
    """

    id: str
    seq: int
    project_id: str
    sender_agent_id: str
    sender_agent_type: str
    sender_session_id: str | None
    to: str | None
    message_type: str
    content: str
    metadata: dict[str, Any]
    priority: int
    correlation_id: str | None
    reply_to: str | None
    created_at: datetime
    expires_at: datetime | None = None
    to_type: str | None = None
    expects_reply: bool = False
    reply_deadline: datetime | None = None
    in_reply_to_seq: int | None = None
    success: bool | None = None
    error: str | None = None
    duration_ms: int | None = None
    late: bool = False
    client_msg_id: str | None = None
    delivered_at: datetime | None = None
    read_at: datetime | None = None
    replied_at: datetime | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def type(self) -> str:
        """The message type (``message_type``)."""
        return self.message_type

    @property
    def is_reply(self) -> bool:
        """Whether the broker linked this message to a request as its reply."""
        return self.in_reply_to_seq is not None

    @property
    def is_broker_timeout(self) -> bool:
        """Whether this is the broker's own timeout response to a request."""
        return self.sender_agent_id == "agentbus" and self.error == "timeout"

    def json(self) -> JSON:
        """``content`` parsed as JSON (raises :class:`ValueError` if it is not)."""
        return json.loads(self.content)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Message":
        """Build a message from a ``message`` frame or a REST message object."""
        try:
            metadata = data.get("metadata")
            return cls(
                id=str(data["id"]),
                seq=int(data["seq"]),
                project_id=str(data["project_id"]),
                sender_agent_id=str(data["sender_agent_id"]),
                sender_agent_type=str(data["sender_agent_type"]),
                sender_session_id=_opt_str(data.get("sender_session_id")),
                to=_opt_str(data.get("to")),
                message_type=str(data["message_type"]),
                content=str(data["content"]),
                metadata=dict(metadata) if isinstance(metadata, dict) else {},
                priority=int(data.get("priority", 2)),
                correlation_id=_opt_str(data.get("correlation_id")),
                reply_to=_opt_str(data.get("reply_to")),
                created_at=_ts(data["created_at"]) or datetime.min,
                expires_at=_ts(data.get("expires_at")),
                to_type=_opt_str(data.get("to_type")),
                expects_reply=bool(data.get("expects_reply") or False),
                reply_deadline=_ts(data.get("reply_deadline")),
                in_reply_to_seq=_opt_int(data.get("in_reply_to_seq")),
                success=_opt_bool(data.get("success")),
                error=_opt_str(data.get("error")),
                duration_ms=_opt_int(data.get("duration_ms")),
                late=bool(data.get("late") or False),
                client_msg_id=_opt_str(data.get("client_msg_id")),
                delivered_at=_ts(data.get("delivered_at")),
                read_at=_ts(data.get("read_at")),
                replied_at=_ts(data.get("replied_at")),
                raw=dict(data),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not an agentbus message: {exc}") from exc


@dataclass(frozen=True)
class SentReceipt:
    """The broker's ``sent`` receipt: the message is committed.

    For a retried send these are the original's values.
    """

    id: str
    seq: int
    client_msg_id: str | None
    created_at: datetime

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "SentReceipt":
        return cls(
            id=str(data["id"]),
            seq=int(data["seq"]),
            client_msg_id=_opt_str(data.get("client_msg_id")),
            created_at=_ts(data["created_at"]) or datetime.min,
        )


@dataclass(frozen=True)
class Welcome:
    """The first frame of a connection (see the ``welcome`` frame)."""

    session_id: str
    project_id: str
    agent_id: str | None
    agent_type: str | None
    head_seq: int
    ack: str | None
    ack_floor: int
    replay: int
    replay_by_priority: tuple[int, ...]
    observer: bool
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Welcome":
        by_priority = data.get("replay_by_priority")
        return cls(
            session_id=str(data["session_id"]),
            project_id=str(data["project_id"]),
            agent_id=_opt_str(data.get("agent_id")),
            agent_type=_opt_str(data.get("agent_type")),
            head_seq=int(data.get("head_seq", 0)),
            ack=_opt_str(data.get("ack")),
            ack_floor=int(data.get("ack_floor", 0)),
            replay=int(data.get("replay", 0)),
            replay_by_priority=tuple(int(x) for x in by_priority)
            if isinstance(by_priority, list)
            else (),
            observer=bool(data.get("observer") or False),
            raw=dict(data),
        )


@dataclass(frozen=True)
class Reply:
    """What a handler returns to answer a request with more than a string.

    ``success`` and ``error`` are the reply's outcome; ``type`` its message type.
    """

    content: str
    success: bool | None = True
    error: str | None = None
    metadata: dict[str, Any] | None = None
    type: str = "response"
    priority: int | None = None


@dataclass(frozen=True)
class Project:
    id: str
    name: str
    head_seq: int
    created_at: datetime
    token: str | None = None
    """The project's first token: only in the answer that created it."""

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Project":
        return cls(
            id=str(data["id"]),
            name=str(data["name"]),
            head_seq=int(data.get("head_seq", 0)),
            created_at=_ts(data["created_at"]) or datetime.min,
            token=_opt_str(data.get("token")),
        )


@dataclass(frozen=True)
class Agent:
    """A member of a project, as ``GET …/agents`` lists it."""

    agent_id: str
    agent_type: str
    online: bool
    interface: str | None
    last_seen_at: datetime | None
    ack_floor: int
    queue_depth: int
    capabilities: tuple[str, ...]
    description: str | None
    session_ids: tuple[str, ...]
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Agent":
        return cls(
            agent_id=str(data["agent_id"]),
            agent_type=str(data.get("agent_type", "")),
            online=bool(data.get("online")),
            interface=_opt_str(data.get("interface")),
            last_seen_at=_ts(data.get("last_seen_at")),
            ack_floor=int(data.get("ack_floor", 0)),
            queue_depth=int(data.get("queue_depth", 0)),
            capabilities=tuple(str(c) for c in data.get("capabilities") or ()),
            description=_opt_str(data.get("description")),
            session_ids=tuple(str(s) for s in data.get("session_ids") or ()),
            raw=dict(data),
        )


@dataclass(frozen=True)
class HistoryPage:
    """A page of ``GET …/messages``: ``messages`` in ascending seq order.

    ``next`` is the cursor of the following page (``{"after_seq": N}`` or
    ``{"before_seq": N}``) when ``has_more``.
    """

    messages: list[Message]
    head_seq: int
    has_more: bool
    truncated: bool
    next: dict[str, int] | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "HistoryPage":
        nxt = data.get("next")
        return cls(
            messages=[Message.from_json(m) for m in data.get("messages") or ()],
            head_seq=int(data.get("head_seq", 0)),
            has_more=bool(data.get("has_more")),
            truncated=bool(data.get("truncated")),
            next={str(k): int(v) for k, v in nxt.items()} if isinstance(nxt, dict) else None,
        )


@dataclass(frozen=True)
class InboxPage:
    """A page of ``GET …/agents/{agent_id}/inbox``, in replay order."""

    agent_id: str
    ack_floor: int
    messages: list[Message]
    remaining: int
    has_more: bool
    truncated: bool
    next: dict[str, int] | None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "InboxPage":
        nxt = data.get("next")
        return cls(
            agent_id=str(data.get("agent_id", "")),
            ack_floor=int(data.get("ack_floor", 0)),
            messages=[Message.from_json(m) for m in data.get("messages") or ()],
            remaining=int(data.get("remaining", 0)),
            has_more=bool(data.get("has_more")),
            truncated=bool(data.get("truncated")),
            next={str(k): int(v) for k, v in nxt.items()} if isinstance(nxt, dict) else None,
        )


@dataclass(frozen=True)
class AckResult:
    """The answer of ``POST …/agents/{agent_id}/ack``."""

    agent_id: str
    ack_floor: int
    ignored: list[int]


@dataclass(frozen=True)
class MessageDetail:
    """``GET …/messages/{message_id}``: a message with its delivery state."""

    message: Message
    owed_to: list[str]
    replies: int
    dead_letter: dict[str, Any] | None


@dataclass(frozen=True)
class DeadLetter:
    """An entry of ``GET …/dead-letters``."""

    message: Message
    reason: str
    dead_at: datetime | None
    retried_as: str | None


@dataclass(frozen=True)
class RequestResult:
    """The answer of the REST sendAndWait (``POST …/requests``)."""

    request: Message
    response: Message
