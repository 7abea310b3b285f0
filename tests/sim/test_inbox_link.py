"""Inbox typing and capacity, Link timing, occupancy and backpressure."""

from __future__ import annotations

import pytest

from kbus import Block, Inbox, Link, Sim, ns


class Ping:
    pass


class Pong:
    pass


@pytest.mark.asyncio
async def test_inbox_rejects_wrong_type_naming_inbox_and_type() -> None:
    sim = Sim()
    box: Inbox[Ping] = Inbox(sim, (Ping,), 2, name="sip0.cube0.pe0.dma")
    with pytest.raises(TypeError, match=r"inbox 'sip0.cube0.pe0.dma' accepts Ping; got Pong"):
        await box.put(Pong())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got int"):
        box.put_nowait(3)  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_inbox_bad_capacity() -> None:
    sim = Sim()
    with pytest.raises(ValueError, match=r"capacity must be >= 1, got 0"):
        Inbox(sim, (Ping,), 0, name="x")
    with pytest.raises(TypeError, match="capacity must be an int"):
        Inbox(sim, (Ping,), 1.5, name="x")  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_inbox_fifo_and_qsize() -> None:
    sim = Sim()
    box: Inbox[int] = Inbox(sim, (int,), 3, name="q")
    for i in range(3):
        await box.put(i)
    assert box.qsize() == 3 and box.full()
    assert [await box.get() for _ in range(3)] == [0, 1, 2]
    assert box.max_depth == 3


@pytest.mark.asyncio
async def test_full_inbox_blocks_putter_in_virtual_time() -> None:
    sim = Sim()
    box: Inbox[int] = Inbox(sim, (int,), 1, name="q")
    times: list[tuple[str, int]] = []

    async def producer() -> None:
        for i in range(3):
            await box.put(i)
            times.append((f"put{i}", sim.now))

    async def consumer() -> None:
        for _ in range(3):
            await sim.sleep(ns(10))
            x = await box.get()
            times.append((f"got{x}", sim.now))

    sim.spawn(producer(), name="p")
    sim.spawn(consumer(), name="c")
    await sim.run()
    assert times == [
        ("put0", 0),
        ("got0", ns(10)),
        ("put1", ns(10)),
        ("got1", ns(20)),
        ("put2", ns(20)),
        ("got2", ns(30)),
    ]


@pytest.mark.asyncio
async def test_link_latency_and_bandwidth() -> None:
    sim = Sim()
    box: Inbox[int] = Inbox(sim, (int,), 8, name="dst")
    link = Link(sim, latency=ns(100), bandwidth=1_000_000_000, name="l")  # 1 GB/s: 1 ns per byte
    arrivals: list[tuple[int, int]] = []

    async def sender() -> None:
        for i in range(3):
            await link.send(i, box, nbytes=10)  # 10 ns occupancy each

    async def receiver() -> None:
        for _ in range(3):
            x = await box.get()
            arrivals.append((x, sim.now))

    sim.spawn(sender(), name="s")
    sim.spawn(receiver(), name="r")
    await sim.run()
    # back-to-back: each starts when the previous finished serializing
    assert arrivals == [(0, ns(110)), (1, ns(120)), (2, ns(130))]
    assert link.messages == 3 and link.bytes == 30 and link.busy_ps == ns(30)
    assert link.cost(10) == ns(110)


@pytest.mark.asyncio
async def test_link_backpressure_on_full_inbox_preserves_order() -> None:
    sim = Sim()
    box: Inbox[int] = Inbox(sim, (int,), 1, name="slow.inbox")
    link = Link(sim, latency=ns(5), bandwidth=1_000_000_000, name="fast")  # 10 B -> 10 ns
    got: list[tuple[int, int]] = []
    sent: list[int] = []

    async def sender() -> None:
        for i in range(6):
            await link.send(i, box, nbytes=10)
            sent.append(sim.now)

    async def slow_receiver() -> None:
        for _ in range(6):
            await sim.sleep(ns(100))
            got.append((await box.get(), sim.now))

    sim.spawn(sender(), name="s")
    sim.spawn(slow_receiver(), name="r")
    await sim.run()
    assert [x for x, _ in got] == list(range(6))
    assert [t for _, t in got] == [ns(100 * k) for k in range(1, 7)]
    # msg0 waits in the inbox, msg1 stalls the link at 25 ns, msg2 is in flight behind it;
    # the fourth send is held until the inbox takes msg1 at 100 ns: backpressure.
    assert sent[:3] == [ns(10), ns(20), ns(30)]
    assert sent[3] > ns(100)


@pytest.mark.asyncio
async def test_link_rejects_bad_parameters() -> None:
    sim = Sim()
    with pytest.raises(ValueError, match=r"link 'x': latency must be >= 0"):
        Link(sim, latency=-1, name="x")
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        Link(sim, latency=0, bandwidth=0, name="x")
    with pytest.raises(TypeError, match="integer picoseconds"):
        Link(sim, latency=1.5, name="x")  # type: ignore[arg-type]
    link = Link(sim, name="y")
    box: Inbox[int] = Inbox(sim, (int,), 1, name="b")
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        await link.send(1, box, nbytes=-5)
    with pytest.raises(TypeError, match="inbox 'b' accepts int; got str"):
        await link.send("no", box)


@pytest.mark.asyncio
async def test_link_carry_costs_occupancy_plus_latency() -> None:
    sim = Sim()
    link = Link(sim, latency=ns(40), bandwidth=2_000_000_000, name="hbm")
    t = await link.carry(2000)  # 1000 ns serialization
    assert t == ns(1040) and sim.now == ns(1040)


class Echo(Block):
    kind = "ECHO"

    def __init__(self, sim: Sim, name: str, out: Inbox[int]) -> None:
        super().__init__(sim, name, accepts=(int,), capacity=4)
        self.out = out
        self.link = Link(sim, latency=ns(1), name=f"{name}->out")

    async def handle(self, msg: int) -> None:
        await self.busy(ns(3))
        await self.send(self.link, msg * 2, self.out, nbytes=8)


@pytest.mark.asyncio
async def test_block_counts_and_busy_time() -> None:
    sim = Sim()
    out: Inbox[int] = Inbox(sim, (int,), 8, name="out")
    blk = Echo(sim, "sip0.echo", out)
    blk.start()
    for i in range(3):
        await blk.inbox.put(i)
    got = [await out.get() for _ in range(3)]
    assert got == [0, 2, 4]
    assert blk.msgs_in == 3 and blk.msgs_out == 3 and blk.busy_ps == ns(9) and blk.bytes_out == 24
    assert sim.now == ns(10)
    await sim.shutdown()
