"""Reconnecting and resuming: broker restarts, dropped connections, takeovers."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from agentbus import AckMode, AgentBus, ConnectionState, Message, Replaced, SentReceipt

from conftest import FAST, Broker, Proxy, eventually

IN_FLIGHT = 8
AFTER_RESTART = 40


class Producer:
    """Sends broadcasts, IN_FLIGHT at a time, until told where to stop."""

    def __init__(self, sender: AgentBus) -> None:
        self.sender = sender
        self.receipts: dict[int, SentReceipt] = {}
        self.sent = 0
        self.stop_at = 100_000  # set once the test has seen enough

    async def run(self) -> None:
        window = asyncio.Semaphore(IN_FLIGHT)
        tasks = []
        while self.sent < self.stop_at:
            await window.acquire()
            tasks.append(asyncio.create_task(self._one(self.sent, window)))
            self.sent += 1
        await asyncio.gather(*tasks)

    async def _one(self, i: int, window: asyncio.Semaphore) -> None:
        try:
            self.receipts[i] = await self.sender.send(f"m{i}", type="status")
        finally:
            window.release()


@pytest.mark.parametrize(
    ("ack", "stop"),
    [("auto", "kill"), ("manual", "kill"), ("auto", "sigterm")],
)
async def test_broker_restart_mid_stream_loses_and_repeats_nothing(
    broker: Broker, project_id: str, ack: AckMode, stop: str
) -> None:
    """kill: a crash. sigterm: a shutdown, which refuses new sends with `unavailable`
    and closes with 1001 once the sends it took are settled."""
    received: list[int] = []
    handled = Counter[int]()
    enough = asyncio.Event()

    receiver = await AgentBus.connect(broker.url, project_id, "receiver", ack=ack, **FAST)
    sender = await AgentBus.connect(broker.url, project_id, "sender", **FAST)
    producer = Producer(sender)
    try:
        if ack == "manual":
            # Manual mode: a handler; the client acknowledges what it finished.
            @receiver.on("status")
            async def record(message: Message) -> None:
                received.append(message.seq)
                handled[message.seq] += 1
                if len(received) == 30:
                    enough.set()

            consumer = None
        else:
            async def consume() -> None:
                async for message in receiver:
                    received.append(message.seq)
                    handled[message.seq] += 1
                    if len(received) == 30:
                        enough.set()

            consumer = asyncio.create_task(consume())

        producing = asyncio.create_task(producer.run())
        await asyncio.wait_for(enough.wait(), 30)
        if stop == "kill":
            broker.kill()  # a crash while messages flow
        else:
            broker.stop()
        broker.start()  # the same port and database
        producer.stop_at = producer.sent + AFTER_RESTART  # and some more after it
        await asyncio.wait_for(producing, 60)
        receipts = producer.receipts
        total = producer.sent

        expected = sorted(r.seq for r in receipts.values())
        assert len(expected) == total and len(set(expected)) == total
        await eventually(lambda: len(received) >= total, timeout=30, what="every message")

        assert received == expected, "every receipted message exactly once, in seq order"
        assert set(handled.values()) == {1}
        assert sender.reconnects >= 1 and receiver.reconnects >= 1

        # Stored once each, despite the resends.
        history = [m async for m in sender.rest.iter_history()]
        assert Counter(m.content for m in history) == Counter(f"m{i}" for i in range(total))

        if ack == "manual":
            async def drained() -> bool:
                agents = {a.agent_id: a for a in await sender.rest.agents()}
                return agents["receiver"].queue_depth == 0

            await eventually(drained, what="the receiver's acknowledgements")
        if consumer is not None:
            consumer.cancel()
    finally:
        await asyncio.gather(receiver.close(), sender.close())


async def test_resend_after_dropped_connection_is_stored_once(broker: Broker, project_id: str) -> None:
    proxy = await Proxy(broker.port or 0).start()
    receiver = await AgentBus.connect(broker.url, project_id, "receiver", **FAST)
    sender = await AgentBus.connect(proxy.url, project_id, "sender", **FAST)
    try:
        proxy.hold_replies = True  # the send reaches the broker; its receipt will not come back
        sending = asyncio.create_task(sender.send("exactly once", to="receiver"))
        delivered = await receiver.receive(timeout=10)  # so it was committed
        assert delivered.content == "exactly once"
        assert not sending.done()

        proxy.cut()  # the connection drops with the receipt lost
        proxy.hold_replies = False
        receipt = await asyncio.wait_for(sending, 30)

        assert sender.reconnects == 1
        assert (receipt.id, receipt.seq) == (delivered.id, delivered.seq)
        page = await sender.rest.history()
        assert [(m.seq, m.content) for m in page.messages] == [(delivered.seq, "exactly once")]
        assert page.messages[0].client_msg_id == receipt.client_msg_id
        with pytest.raises(TimeoutError):
            await receiver.receive(timeout=0.3)
    finally:
        await asyncio.gather(receiver.close(), sender.close())
        await proxy.close()


async def test_close_waits_for_the_receipts_of_sends_already_taken(
    broker: Broker, project_id: str
) -> None:
    proxy = await Proxy(broker.port or 0).start()
    receiver = await AgentBus.connect(broker.url, project_id, "receiver", **FAST)
    sender = await AgentBus.connect(proxy.url, project_id, "sender", **FAST)
    try:
        proxy.replies_flowing.clear()  # receipts are held back on their way
        sends = [asyncio.create_task(sender.send(f"x{i}", to="receiver")) for i in range(10)]
        committed = [(await receiver.receive(timeout=10)).id for _ in range(10)]
        closing = asyncio.create_task(sender.close())
        assert not any(task.done() for task in sends)
        proxy.replies_flowing.set()
        await asyncio.wait_for(closing, 10)
        receipts = [task.result() for task in sends]
        assert [r.id for r in receipts] == committed
        assert sender.state is ConnectionState.CLOSED and sender.reconnects == 0
    finally:
        await asyncio.gather(receiver.close(), sender.close())
        await proxy.close()


async def test_manual_mode_acks_a_handler_that_outlived_its_connection(
    broker: Broker, project_id: str
) -> None:
    proxy = await Proxy(broker.port or 0).start()
    sender = await AgentBus.connect(broker.url, project_id, "sender", **FAST)
    worker = await AgentBus.connect(proxy.url, project_id, "worker", ack="manual", **FAST)
    started = asyncio.Event()
    release = asyncio.Event()
    calls: list[int] = []
    states: list[ConnectionState] = []
    worker.on_state_change(states.append)

    @worker.on("task_assignment")
    async def slow(message: Message) -> None:
        calls.append(message.seq)
        started.set()
        await release.wait()

    try:
        receipt = await sender.send("long job", to="worker", type="task_assignment")
        await asyncio.wait_for(started.wait(), 10)

        proxy.cut()  # the connection drops while the handler still runs
        await worker.wait_for_state(ConnectionState.RECONNECTING, timeout=10)
        await worker.wait_for_state(ConnectionState.CONNECTED, timeout=30)
        # The broker replays the unacknowledged message; the client recognises it.
        assert worker.welcome is not None and worker.welcome.replay == 1
        await eventually(lambda: worker.duplicates_dropped == 1, what="the replayed duplicate")
        release.set()

        async def acknowledged() -> bool:
            agents = {a.agent_id: a for a in await sender.rest.agents()}
            return agents["worker"].queue_depth == 0 and agents["worker"].ack_floor >= receipt.seq

        await eventually(acknowledged, what="the acknowledgement on the new connection")
        assert calls == [receipt.seq]
        assert states == [ConnectionState.RECONNECTING, ConnectionState.CONNECTED]
    finally:
        await asyncio.gather(worker.close(), sender.close())
        await proxy.close()

    # Nothing is owed any more: a new connection of the same agent gets no replay.
    async with AgentBus.connect(broker.url, project_id, "worker", ack="manual") as again:
        assert again.welcome is not None and again.welcome.replay == 0


async def test_takeover_is_final_and_not_fought(broker: Broker, project_id: str) -> None:
    first = await AgentBus.connect(broker.url, project_id, "twin", **FAST)
    sender = await AgentBus.connect(broker.url, project_id, "sender", **FAST)
    try:
        second = await AgentBus.connect(broker.url, project_id, "twin", **FAST)
        try:
            await first.wait_for_state(ConnectionState.CLOSED, timeout=10)
            assert isinstance(first.error, Replaced) and first.error.close_code == 4001
            with pytest.raises(Replaced):
                await first.receive(timeout=5)
            with pytest.raises(Replaced):
                await first.send("still there?")

            # The newer connection keeps the identity: it receives, and no reconnect
            # of the first one came to take it back.
            await sender.send("for the twin", to="twin")
            assert (await second.receive(timeout=10)).content == "for the twin"
            twin = [a for a in await sender.rest.agents() if a.agent_id == "twin"][0]
            assert twin.session_ids == (second.session_id,)
            assert second.state is ConnectionState.CONNECTED and second.reconnects == 0
            assert first.reconnects == 0
        finally:
            await second.close()
    finally:
        await asyncio.gather(first.close(), sender.close())
