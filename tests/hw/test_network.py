"""The data plane against figures computed by hand from the configuration.

Every expected time below is written out from config values (latency in ps,
bandwidth in bytes/s): a flow alone on its route takes
``ceil(bytes * 1e12 / narrowest bandwidth) + sum of latencies``; concurrent
flows share each resource max-min fairly.
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import pytest

import kbus
from kbus.hw import DeviceConfig, build_device
from kbus.hw.device import Device
from kbus.hw.network import NetLink, Network, cube_edges, cube_route, sip_edges
from kbus.protocol import MapEntry, MmuMapMsg, PeDmaMsg

PS = 10**12
MiB = 1 << 20


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def idle(nbytes: int, hops: list[tuple[int, int]]) -> int:
    """A flow alone on hops of (latency ps, bandwidth B/s)."""
    return ceil_div(nbytes * PS, min(bw for _, bw in hops)) + sum(lat for lat, _ in hops)


def within(measured: float, expected: float, rel: float) -> bool:
    return abs(measured - expected) <= rel * expected


def config(preset: str = "tiny", **over: Any) -> DeviceConfig:
    return DeviceConfig.preset(preset).with_overrides({k.replace("__", "."): v for k, v in over.items()})


async def flow_time(dev: Device, links: list[NetLink], nbytes: int) -> int:
    t0 = dev.sim.now
    await dev.net.transfer(links, nbytes)
    return dev.sim.now - t0


# -- topologies --------------------------------------------------------------


def test_topology_edges_and_dimension_order_routes() -> None:
    assert cube_edges("ring", 4, 1) == [(0, 1), (1, 2), (2, 3), (3, 0)]
    assert cube_edges("ring", 2, 1) == [(0, 1)]
    # 2 x 3 mesh: cube i at row i // 3, column i % 3
    assert sorted(cube_edges("mesh2d", 6, 3)) == [(0, 1), (0, 3), (1, 2), (1, 4), (2, 5), (3, 4), (4, 5)]
    assert cube_route("mesh2d", 6, 3, 0, 5) == [0, 1, 2, 5]  # along the row first, then the column
    assert cube_route("mesh2d", 6, 3, 5, 0) == [5, 4, 3, 0]
    # 4 x 4 torus: wrap links make 0 -> 15 two hops (column 0 -> 3 and row 0 -> 3 the short way)
    assert len(cube_edges("torus2d", 16, 4)) == 32
    assert cube_route("torus2d", 16, 4, 0, 15) == [0, 3, 15]
    assert cube_route("ring", 8, 1, 0, 5) == [0, 7, 6, 5]
    assert cube_route("ring", 4, 1, 0, 2) == [0, 1, 2]  # a tie goes up
    assert sip_edges("full", 3) == [(0, 1), (0, 2), (1, 2)]
    assert sip_edges("ring", 4) == [(0, 1), (1, 2), (2, 3), (3, 0)]


def test_bad_topology_keys_are_named() -> None:
    with pytest.raises(kbus.ConfigError, match=r"topology\.cube_network: 'hypercube' is not one of ring, mesh2d"):
        config(topology__cube_network="hypercube")
    with pytest.raises(kbus.ConfigError, match=r"topology\.cube_cols: 4 columns do not divide 6 cubes"):
        config(topology__cubes_per_sip=6, topology__cube_network="mesh2d", topology__cube_cols=4)
    with pytest.raises(kbus.ConfigError, match=r"fabric\.model: 'fluid' is not one of flow, packet"):
        config(fabric__model="fluid")


# Uncontended transfers: (config overrides, src, dst, the link levels crossed in order).
ROUTES = {
    "ring": ({"topology.cubes_per_sip": 8}, (0, 0, 0), (0, 5, 1), ["noc_pe"] + ["noc_hop"] * 3 + ["noc_pe"]),
    "mesh2d": (
        {"topology.cubes_per_sip": 6, "topology.cube_network": "mesh2d", "topology.cube_cols": 3},
        (0, 0, 0),
        (0, 5, 1),
        ["noc_pe"] + ["noc_hop"] * 3 + ["noc_pe"],
    ),
    "torus2d": (
        {"topology.cubes_per_sip": 16, "topology.cube_network": "torus2d", "topology.cube_cols": 4},
        (0, 0, 0),
        (0, 15, 1),
        ["noc_pe"] + ["noc_hop"] * 2 + ["noc_pe"],
    ),
    "sip ring": (
        {"topology.sips": 4, "topology.sip_network": "ring", "topology.cubes_per_sip": 2},
        (0, 1, 0),
        (2, 1, 1),
        ["noc_pe", "noc_hop", "sip_data", "sip_data", "noc_hop", "noc_pe"],
    ),
    "sip full": (
        {"topology.sips": 4, "topology.cubes_per_sip": 2},
        (0, 0, 0),
        (3, 0, 1),
        ["noc_pe", "sip_data", "noc_pe"],
    ),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("name", list(ROUTES))
async def test_uncontended_transfer_is_latencies_plus_size_over_bottleneck(name: str) -> None:
    over, src, dst, levels = ROUTES[name]
    cfg = DeviceConfig.preset("tiny").with_overrides({**over, "links.sip_data.bandwidth": "50GB/s"})
    dev = build_device(kbus.Sim(), cfg)
    hops = [(getattr(cfg.links, lv).latency, getattr(cfg.links, lv).bandwidth) for lv in levels]
    route = dev.route(src, dst)
    assert [link.level for link in route] == levels
    for nbytes in (64, 4096, MiB, 64 * MiB):
        assert within(await flow_time(dev, route, nbytes), idle(nbytes, hops), 0.01)
    await dev.aclose()


# -- sharing -----------------------------------------------------------------


@pytest.mark.asyncio
async def test_n_flows_through_one_bottleneck_take_n_times_as_long() -> None:
    cfg = config()
    dev = build_device(kbus.Sim(), cfg)
    noc_pe = cfg.links.noc_pe
    single = idle(4 * MiB, [(noc_pe.latency, noc_pe.bandwidth)] * 2)
    dst = (0, 0, 0)
    for n in (2, 3):
        srcs = [(0, 0, p) for p in range(1, n + 1)]  # all into pe0's NOC->PE link
        t0 = dev.sim.now
        ends = await asyncio.gather(*(dev.net.transfer(dev.route(s, dst), 4 * MiB) for s in srcs))
        for end in ends:
            assert within(end - t0, n * single, 0.01)
    await dev.aclose()


@pytest.mark.asyncio
async def test_textbook_max_min_three_flows_two_links() -> None:
    """Link A (100 GB/s) carries f1 and f2, link B (50 GB/s) carries f2 and f3.

    B is the bottleneck: f2 = f3 = 25 GB/s; f1 takes what A has left, 75 GB/s.
    When f1 is done (1 MB / 75 GB/s) nothing changes for f2 and f3 (B still
    limits them); they end at 1 MB / 25 GB/s.
    """
    sim = kbus.Sim()
    net = Network(sim)
    a = NetLink(net, "A", 0, 100 * 10**9, "test")
    b = NetLink(net, "B", 0, 50 * 10**9, "test")
    ends: dict[str, int] = {}

    def done(name: str) -> Any:
        return lambda flow, arrive: ends.__setitem__(name, arrive)

    async def main() -> None:
        f1 = net.start([a], 10**6, done("f1"))
        f2 = net.start([a, b], 10**6, done("f2"))
        f3 = net.start([b], 10**6, done("f3"))
        await sim.sleep(1)  # rates are settled once per instant, after everything that starts then
        assert (f1.rate, f2.rate, f3.rate) == (75 * 10**9, 25 * 10**9, 25 * 10**9)
        await sim.sleep(50 * 10**6)

    await main()
    assert within(ends["f1"], 10**6 * PS / (75 * 10**9), 0.01)
    assert within(ends["f2"], 10**6 * PS / (25 * 10**9), 0.01)
    assert within(ends["f3"], 10**6 * PS / (25 * 10**9), 0.01)
    # utilisation is the integral of the allocated rate: B was full for the whole 40 us
    assert b.busy_ps == ends["f3"]
    assert a.busy_ps <= sim.now


@pytest.mark.asyncio
async def test_control_message_beside_a_bulk_transfer_arrives_within_twice_its_idle_latency() -> None:
    cfg = config()
    dev = build_device(kbus.Sim(), cfg)
    sim = dev.sim
    link = dev.pes[0][0][0].down_link
    noc_pe = cfg.links.noc_pe
    idle_ps = ceil_div(64 * PS, noc_pe.bandwidth) + noc_pe.latency
    bulk = sim.spawn(dev.net.transfer(dev.route((0, 1, 0), (0, 0, 0)), MiB))
    await sim.sleep(1000)  # the 1 MiB transfer is on noc->pe0 now
    t0 = sim.now
    await dev.net.transfer([link], 64)
    assert sim.now - t0 <= 2 * idle_ps
    assert not bulk.done()
    # The same at the protocol level: a unicast MmuMap to a PE receiving a 1 MiB transfer.
    await bulk
    map_msg = MmuMapMsg("c", "m0", (MapEntry(0x1000_0000_0000, 0, 1 << 16),), target_sips=(0,), target_cubes=(0,))
    t0 = sim.now
    await dev.request(map_msg)
    idle_map = sim.now - t0
    bulk = sim.spawn(dev.net.transfer(dev.route((0, 1, 0), (0, 0, 0)), MiB))
    t0 = sim.now
    await dev.request(attr_evolve(map_msg, request_id="m1", entries=(MapEntry(0x1000_0001_0000, 0, 1 << 16),)))
    assert sim.now - t0 <= 2 * idle_map
    await bulk
    await dev.aclose()


def attr_evolve(msg: Any, **changes: Any) -> Any:
    import attrs

    return attrs.evolve(msg, **changes)


@pytest.mark.asyncio
async def test_pes_of_a_cube_share_the_cube_hbm_bandwidth() -> None:
    cfg = config("default")
    dev = build_device(kbus.Sim(), cfg)
    mem = cfg.memory
    hbm_bw = mem.hbm_channels * mem.hbm_channel_bandwidth  # 8 x 100 GB/s
    P = cfg.topology.pes_per_cube
    n = 4 * MiB
    t0 = dev.sim.now
    errs = await asyncio.gather(*(dev.dma((0, 0, p), (0, 0, p), "read", mem.hbm_base, n) for p in range(P)))
    assert errs == [None] * P
    elapsed = dev.sim.now - t0
    achieved = P * n * PS / elapsed
    assert achieved <= hbm_bw
    assert achieved >= 0.97 * hbm_bw  # 8 ports of 256 GB/s could take more: HBM is what limits them
    stats = dev.link_stats()["sip0.cube0.hbm"]
    assert stats.busy <= 1.0
    await dev.aclose()


@pytest.mark.asyncio
async def test_busy_never_exceeds_elapsed_time_mid_transfer() -> None:
    dev = build_device(kbus.Sim(), config())
    sim = dev.sim
    route = dev.route((0, 1, 0), (0, 0, 0))
    bulk = sim.spawn(dev.net.transfer(route, MiB))
    second = sim.spawn(dev.net.transfer(route, MiB))
    await sim.sleep(1_000_000)  # 1 us into two 4 us transfers
    for link in route:
        assert link.busy_ps <= sim.now
        assert link.busy_ps >= sim.now - 10_000  # full since the start (minus rounding)
    await bulk
    await second
    for row in dev.link_stats().values():
        assert 0.0 <= row.busy <= 1.0
    await dev.aclose()


# -- flow model vs packet model --------------------------------------------


async def run_case(model: str, case: str) -> list[int]:
    cfg = config(fabric__model=model, fabric__packet_bytes=256)
    dev = build_device(kbus.Sim(), cfg)
    base = cfg.memory.hbm_base
    t0 = dev.sim.now
    if case == "one long":
        ends = [await dev.net.transfer(dev.route((0, 0, 0), (0, 1, 2)), 4 * MiB)]
    elif case == "four share a link":
        routes = [dev.route((0, 0, p), (0, 1, 0)) for p in range(4)]
        ends = list(await asyncio.gather(*(dev.net.transfer(r, MiB) for r in routes)))
    else:  # all-to-all among the 8 PEs, through the DMA engines, 64 KiB each
        pes = list(cfg.pe_coords())
        jobs = [
            dev.dma(a, b, "fill", base + i * 65536, 65536, pattern="zeros")
            for a in pes
            for i, b in enumerate(pes)
            if a != b
        ]
        assert await asyncio.gather(*jobs) == [None] * len(jobs)
        ends = [dev.sim.now]
    await dev.aclose()
    return [e - t0 for e in ends]


@pytest.mark.asyncio
@pytest.mark.parametrize("case", ["one long", "four share a link", "all-to-all"])
async def test_flow_and_packet_models_agree(case: str) -> None:
    flow = await run_case("flow", case)
    packet = await run_case("packet", case)
    assert max(flow) > 0
    assert within(max(packet), max(flow), 0.05), (flow, packet)
    for f, p in zip(sorted(flow), sorted(packet), strict=True):
        assert within(p, f, 0.05), (flow, packet)


# -- determinism -------------------------------------------------------------


def all_to_all_fingerprint(model: str, runner: str) -> tuple[Any, ...]:
    async def main() -> tuple[Any, ...]:
        cfg = config(fabric__model=model)
        dev = build_device(kbus.Sim(), cfg)
        base = cfg.memory.hbm_base
        pes = list(cfg.pe_coords())
        await asyncio.gather(
            *(
                dev.dma(a, b, "fill", base + i * 4096, 4096 * (1 + i), pattern="inc8")
                for a in pes
                for i, b in enumerate(pes)
                if a != b
            )
        )
        stats = tuple((s.name, s.bytes, s.busy_ps, s.queue_mean_ps, s.queue_p99_ps) for s in dev.link_stats().values())
        now = dev.sim.now
        await dev.aclose()
        return now, stats

    if runner == "anyio":
        return anyio.run(main, backend="asyncio")
    return kbus.run(main, use_uvloop=runner == "uvloop")


@pytest.mark.parametrize("model", ["flow", "packet"])
def test_same_traffic_same_times_on_every_loop(model: str) -> None:
    a = all_to_all_fingerprint(model, "asyncio")
    assert a == all_to_all_fingerprint(model, "asyncio")
    assert a == all_to_all_fingerprint(model, "uvloop")
    assert a == all_to_all_fingerprint(model, "anyio")


def test_kbus_info_draws_the_topology(capsys: pytest.CaptureFixture[str]) -> None:
    from kbus.cli import main

    assert main(["info", "--preset", "large"]) == 0
    out = capsys.readouterr().out
    assert "cubes of each SIP: torus2d 4 x 4" in out
    assert "~ cube12 -- cube13 -- cube14 -- cube15 ~" in out
    assert "sip0 -- sip1 -- sip2 -- sip3 -- sip4 -- sip5 -- sip6 -- sip7 -- back to sip0" in out
    assert main(["info", "--preset", "default"]) == 0
    out = capsys.readouterr().out
    assert "cube0 -- cube1 -- cube2 -- cube3 -- back to cube0" in out
    assert "sip0 = sip1" in out
    assert "HBM per cube, 8 x 100GB/s = 800GB/s shared" in out


def test_kbus_demo_shows_link_and_memory_statistics(capsys: pytest.CaptureFixture[str]) -> None:
    from kbus.demo import run_demo

    assert run_demo("tiny", use_uvloop=False) == 0
    out = capsys.readouterr().out
    assert "busiest links and memory channels" in out
    assert "p99" in out and "busy" in out
    hbm = [line for line in out.splitlines() if line.startswith("│ hbm ")]  # the memory channels' level row
    assert hbm and not hbm[0].rstrip(" │").endswith(" 0.000%"), out
    assert "kbus demo on 'tiny': 1 SIP x 2 cubes x 4 PEs = 8 PEs" in out
    assert "│ HBM " not in out  # not as an idle block: memories are measured by their channels


@pytest.mark.asyncio
async def test_link_stats_count_bytes_busy_and_queueing_by_hand() -> None:
    cfg = config()
    dev = build_device(kbus.Sim(), cfg)
    noc_pe = cfg.links.noc_pe
    link = dev.pes[0][0][0].down_link
    # two equal flows at once on one link: each takes twice its idle time, so each queued one idle time
    n = MiB
    alone = ceil_div(n * PS, noc_pe.bandwidth)
    await asyncio.gather(dev.net.transfer([link], n), dev.net.transfer([link], n))
    row = dev.link_stats()[link.name]
    assert (row.flows, row.bytes) == (2, 2 * n)
    assert row.busy_ps == 2 * alone
    assert row.queue_mean_ps == alone and row.queue_p99_ps == alone
    assert row.busy == row.busy_ps / dev.sim.now <= 1.0
    await dev.aclose()


@pytest.mark.asyncio
async def test_worked_example_of_the_docs() -> None:
    """docs/device.md: a 1 MiB read_va two ring hops away on 'default', alone and beside a twin."""
    cfg = DeviceConfig.preset("default")
    dev = build_device(kbus.Sim(), cfg)
    hbm = cfg.memory.hbm_base
    va = 0x1000_0000_0000
    for p in (0, 1):
        await dev.request(
            MmuMapMsg(
                "c", f"m{p}", (MapEntry(va, hbm, MiB, 0, 2, p),), target_sips=(0,), target_cubes=(0,), target_pe=p
            )
        )
    ns = 1000
    alone = 2 * ns + 10 * ns + (250 + 80 * ns) + (4_096_250 + 110 * ns)
    assert alone == 4_298_500
    t0 = dev.sim.now
    await dev.read_va((0, 0, 0), va, MiB)
    assert dev.sim.now - t0 == alone
    t0 = dev.sim.now
    await asyncio.gather(dev.read_va((0, 0, 0), va, MiB), dev.read_va((0, 0, 1), va, MiB))
    assert dev.sim.now - t0 == 2 * ns + 10 * ns + (500 + 80 * ns) + (8_192_500 + 110 * ns) == 8_395_000
    await dev.aclose()


@pytest.mark.asyncio
async def test_a_message_retired_by_the_next_flow_is_still_delivered_on_time() -> None:
    """A message alone on its link keeps no timer; a flow starting at its deadline retires it first."""
    sim = kbus.Sim()
    net = Network(sim)
    link = NetLink(net, "a->b", 1000, 64 * 10**9, "test")  # 64 B take 1 ns
    inbox: kbus.Inbox[str] = kbus.Inbox(sim, (str,), 4, name="b")
    second: list[Any] = []
    sim.call_at(1000, lambda: second.append(net.start([link], 64, lambda f, arrive: None)))
    await link.send("first", inbox, 64)
    assert sim.now == 1000
    assert await inbox.get() == "first"
    assert sim.now == 2000  # deadline 1 ns + latency 1 ns
    (flow,) = second
    assert flow.lazy and flow.deadline == 2000  # the link was free again at 1 ns: no sharing
    await sim.sleep(5000)
    assert link.busy_ps == 2000  # 1 ns each, never more than the elapsed time
    net.retire(flow)
    assert link.queueing() == (2, 0.0, 0)


@pytest.mark.asyncio
async def test_recomputation_touches_only_the_connected_flows() -> None:
    sim = kbus.Sim()
    net = Network(sim)
    x = NetLink(net, "X", 0, 10**9, "test")
    y = NetLink(net, "Y", 0, 10**9, "test")

    def ignore(flow: Any, arrive: int) -> None:
        return None

    a1, a2 = net.start([x], 10**6, ignore), net.start([x], 10**6, ignore)
    b1, b2 = net.start([y], 10**6, ignore), net.start([y], 10**6, ignore)
    await sim.sleep(1)
    before = (b1.timer, b2.timer, net.reshares)
    a3 = net.start([x], 10**6, ignore)
    await sim.sleep(1)
    assert (b1.timer, b2.timer) == before[:2]  # the other component was left alone
    assert net.reshares == before[2] + 1
    assert a1.rate == a2.rate == a3.rate == 10**9 // 3
    assert b1.rate == b2.rate == 10**9 // 2
    await sim.sleep(10**10)
    assert all(f.done for f in (a1, a2, a3, b1, b2))


@pytest.mark.asyncio
async def test_a_full_inbox_stalls_the_link_in_order() -> None:
    """Backpressure: a message that finds its inbox full waits there, later ones wait behind it."""
    sim = kbus.Sim()
    net = Network(sim)
    link = NetLink(net, "a->b", 1000, 64 * 10**9, "test")
    inbox: kbus.Inbox[int] = kbus.Inbox(sim, (int,), 1, name="b")
    for i in range(2):
        await link.send(i, inbox, 64)  # 0 is taken; 1 finds the inbox full on arrival and stalls the link
    await sim.sleep(5000)
    assert link.stalled_on == "b"
    sender = sim.spawn(link.send(2, inbox, 64))
    await sim.sleep(5000)
    assert not sender.done()  # blocked while the link is stalled
    assert [await inbox.get() for _ in range(3)] == [0, 1, 2]
    await sender
    assert link.stalled_on is None


@pytest.mark.asyncio
async def test_hbm_per_sip_is_shared_by_every_cube() -> None:
    cfg = config(memory__hbm_scope="sip")
    dev = build_device(kbus.Sim(), cfg)
    mem = cfg.memory
    assert dev.pes[0][0][0].hbm_channel is dev.pes[0][1][3].hbm_channel
    hbm_bw = mem.hbm_channels * mem.hbm_channel_bandwidth
    n = 4 * MiB
    t0 = dev.sim.now
    coords = list(cfg.pe_coords())  # 8 PEs in 2 cubes, one HBM
    await asyncio.gather(*(dev.dma(c, c, "read", mem.hbm_base, n) for c in coords))
    achieved = len(coords) * n * PS / (dev.sim.now - t0)
    assert 0.97 * hbm_bw <= achieved <= hbm_bw
    await dev.aclose()


@pytest.mark.asyncio
async def test_flows_reach_the_tracing_hook_as_spans_on_every_link() -> None:
    cfg = config()
    dev = build_device(kbus.Sim(), cfg)
    route = dev.route((0, 0, 0), (0, 1, 0))
    seen: list[tuple[str, Any, int, int, int]] = []
    for link in route:
        link.on_send = lambda link, msg, n, start, deliver: seen.append((link.name, msg, n, start, deliver))
    t0 = dev.sim.now
    end = await dev.net.transfer(route, MiB)
    assert [s[0] for s in seen] == [link.name for link in route]
    assert all(s[1] is None and s[2] == MiB and s[3] == t0 and s[4] == end for s in seen)
    await dev.aclose()


@pytest.mark.asyncio
async def test_packet_model_serves_protocol_requests_like_the_flow_model() -> None:
    times = {}
    for model in ("flow", "packet"):
        cfg = config(fabric__model=model)
        dev = build_device(kbus.Sim(), cfg)
        hbm = cfg.memory.hbm_base
        t0 = dev.sim.now
        (resp,) = await dev.request(PeDmaMsg("c", "d", 0, 1, 2, hbm, MiB))
        await dev.request(MmuMapMsg("c", "m", (MapEntry(0x1000_0000_0000, hbm, 1 << 16),)))
        assert resp.success
        times[model] = dev.sim.now - t0
        await dev.aclose()
    assert within(times["packet"], times["flow"], 0.05)


@pytest.mark.asyncio
async def test_route_names_a_coordinate_out_of_range() -> None:
    dev = build_device(kbus.Sim(), config())
    with pytest.raises(ValueError, match="4") as info:
        dev.route((0, 0, 0), (0, 0, 4))
    assert "pe" in str(info.value)
    await dev.aclose()
