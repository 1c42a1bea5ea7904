"""Opening and closing the broker's WebSocket."""

from __future__ import annotations

import websockets
from websockets.asyncio.client import ClientConnection

from ._version import __version__

# The broker's frames are bounded by its own limits (content, metadata); this only
# guards against a peer that is not an agentbus broker.
MAX_INCOMING_BYTES = 64 * 1024 * 1024


class Connection(ClientConnection):
    """A client connection that ends TCP as soon as the closing handshake is done.

    Once both close frames have been exchanged, neither side sends anything
    more, so closing the TCP connection then (after flushing what is still
    buffered: a FIN, not a reset) cuts nothing off. RFC 6455 has a client wait
    for the server to close it instead; the broker takes most of a second to,
    which would delay every close, and every reconnect after a close frame.
    """

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        protocol = self.protocol
        if protocol.close_rcvd is not None and protocol.close_sent is not None:
            if not self.transport.is_closing():
                self.transport.close()


async def open_connection(
    url: str, headers: dict[str, str], open_timeout: float
) -> Connection:
    ws = await websockets.connect(
        url,
        additional_headers=headers,
        user_agent_header=f"agentbus-client-python/{__version__}",
        open_timeout=open_timeout,
        max_size=MAX_INCOMING_BYTES,
        max_queue=None,
        create_connection=Connection,
    )
    assert isinstance(ws, Connection)
    return ws
