"""Python client for agentbus, the durable real-time message broker for agents.

    from agentbus import AgentBus

    async with AgentBus.connect("http://127.0.0.1:8080", PROJECT_ID, "gen-1",
                                agent_type="codegen") as bus:
        @bus.on("task_assignment")
        async def work(message):
            return f"done: {message.content}"

        receipt = await bus.send("online", type="status")
        async for message in bus:
            print(message.seq, message.content)

See the package's README for the whole API, and ``agentbus.sync`` for the
blocking wrapper.
"""

from ._client import AckMode, AgentBus, Handler
from ._errors import (
    AgentBusError,
    ClientClosed,
    ConnectionEnded,
    ConnectionRefused,
    NoRecipient,
    Replaced,
    RequestTimeout,
    SendTimeout,
    TokenRevoked,
)
from ._models import (
    AckResult,
    Agent,
    ConnectionState,
    DeadLetter,
    HistoryPage,
    InboxPage,
    Message,
    MessageDetail,
    MessageType,
    Priority,
    Project,
    Reply,
    RequestResult,
    SentReceipt,
    Welcome,
)
from ._observer import Observer, observe
from ._rest import RestClient, create_project
from ._version import __version__

__all__ = [
    "AckMode",
    "AckResult",
    "Agent",
    "AgentBus",
    "AgentBusError",
    "ClientClosed",
    "ConnectionEnded",
    "ConnectionRefused",
    "ConnectionState",
    "DeadLetter",
    "Handler",
    "HistoryPage",
    "InboxPage",
    "Message",
    "MessageDetail",
    "MessageType",
    "NoRecipient",
    "Observer",
    "Priority",
    "Project",
    "Replaced",
    "Reply",
    "RequestResult",
    "RequestTimeout",
    "RestClient",
    "SendTimeout",
    "SentReceipt",
    "TokenRevoked",
    "Welcome",
    "__version__",
    "create_project",
    "observe",
]
