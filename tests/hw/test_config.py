"""Tests for kbus.hw.config: presets, TOML round-trips, overrides and error messages."""

from __future__ import annotations

import re
from pathlib import Path

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

import kbus.hw.config as config_module
from kbus.errors import ConfigError
from kbus.hw.config import (
    ComputeConfig,
    DeviceConfig,
    FabricConfig,
    LinkSpec,
    Topology,
    available_presets,
    describe,
    tree,
)
from kbus.sim.units import NS, US, parse_bandwidth, parse_size, parse_time


def write(tmp_path: Path, text: str, name: str = "my.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(tmp_path: Path, text: str, name: str = "my.toml") -> ConfigError:
    path = write(tmp_path, text, name)
    with pytest.raises(ConfigError) as info:
        DeviceConfig.from_toml(path)
    assert name in str(info.value)
    assert info.value.source == str(path)
    return info.value


# -- presets ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "sips", "cubes", "pes"),
    [("tiny", 1, 2, 4), ("default", 2, 4, 8), ("large", 8, 16, 32)],
)
def test_presets_have_the_documented_shape(name: str, sips: int, cubes: int, pes: int) -> None:
    cfg = DeviceConfig.preset(name)
    assert cfg.name == name
    assert (cfg.topology.sips, cfg.topology.cubes_per_sip, cfg.topology.pes_per_cube) == (sips, cubes, pes)
    assert cfg.num_sips == sips
    assert cfg.num_cubes == sips * cubes
    assert cfg.num_pes == sips * cubes * pes
    assert len(list(cfg.pe_coords())) == cfg.num_pes


def test_large_has_4096_pes() -> None:
    assert DeviceConfig.preset("large").num_pes == 4096


def test_available_presets() -> None:
    assert available_presets() == ("default", "large", "tiny")


def test_default_preset_equals_builtin_defaults() -> None:
    # The class defaults and default.toml must not drift apart: partial files are overlaid on them.
    assert DeviceConfig.preset("default") == DeviceConfig()


def test_internal_units_are_integers() -> None:
    cfg = DeviceConfig()
    assert cfg.links.noc_pe == LinkSpec(latency=5 * NS, bandwidth=256 * 10**9)
    assert cfg.memory.sram_per_pe == 4 * 1024**2
    assert cfg.memory.page_size == 64 * 1024
    assert cfg.memory.va_size == 1024**4
    assert cfg.compute.kernel_launch == 200 * NS
    assert cfg.processing.io_cpu == 50 * NS


def test_unknown_preset_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown preset 'huge'; available presets: default, large, tiny"):
        DeviceConfig.preset("huge")


def test_preset_name_cannot_escape_the_presets_directory() -> None:
    with pytest.raises(ConfigError, match="unknown preset"):
        DeviceConfig.preset("../presets/tiny")


# -- round trips --------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "default", "large"])
def test_toml_round_trip_of_every_preset(name: str) -> None:
    cfg = DeviceConfig.preset(name)
    text = cfg.to_toml()
    assert DeviceConfig.from_toml_text(text) == cfg
    assert DeviceConfig.from_dict(cfg.to_dict()) == cfg


def test_to_toml_writes_human_units() -> None:
    text = DeviceConfig().to_toml()
    assert 'latency = "5ns"' in text
    assert 'bandwidth = "256GB/s"' in text
    assert 'sram_per_pe = "4MiB"' in text
    assert "hbm_base = 0x10_0000_0000" in text
    assert "pe_clock_hz = 1_500_000_000" in text
    assert "[links.noc_pe]" in text


def test_round_trip_keeps_awkward_values_exact(tmp_path: Path) -> None:
    cfg = (
        DeviceConfig()
        .replace("links.noc_pe.latency", 1_234_567)  # ps
        .replace("links.noc_pe.bandwidth", 12_345_678_901)  # bytes/s
        .replace("memory.sram_per_pe", 1536 * 1024 + 7)
        .replace("name", 'quote " backslash \\ newline \n tab \t del \x7f é')
    )
    assert cfg.links.noc_pe.latency == 1_234_567
    path = write(tmp_path, cfg.to_toml(), "odd.toml")
    assert DeviceConfig.from_toml(path) == cfg


@given(st.integers(min_value=0, max_value=10**18))
def test_duration_format_is_exact(ps: int) -> None:
    assert parse_time(config_module._fmt_time(ps)) == ps


@given(st.integers(min_value=1, max_value=10**18))
def test_bandwidth_format_is_exact(bps: int) -> None:
    assert parse_bandwidth(config_module._fmt_bandwidth(bps)) == bps


@given(st.integers(min_value=0, max_value=2**64))
def test_size_format_is_exact(n: int) -> None:
    assert parse_size(config_module._fmt_size(n)) == n


@given(
    name=st.text(max_size=20),
    latency=st.integers(min_value=0, max_value=10**15),
    bandwidth=st.integers(min_value=1, max_value=10**15),
    capacity=st.integers(min_value=1, max_value=10**6),
    page_shift=st.integers(min_value=12, max_value=24),
)
def test_round_trip_of_generated_configs(
    name: str, latency: int, bandwidth: int, capacity: int, page_shift: int
) -> None:
    cfg = DeviceConfig().with_overrides(
        {
            "name": name,
            "links.dma_hbm.latency": latency,
            "links.dma_hbm.bandwidth": bandwidth,
            "fabric.inbox_capacity": capacity,
            "memory.page_size": 1 << page_shift,
        }
    )
    assert DeviceConfig.from_toml_text(cfg.to_toml()) == cfg


# -- partial files and loading ------------------------------------------------


def test_partial_file_overrides_only_its_keys(tmp_path: Path) -> None:
    path = write(tmp_path, '[links.noc_pe]\nlatency = "12ns"\n[fabric]\ninbox_capacity = 8\n', "slow.toml")
    cfg = DeviceConfig.from_toml(path)
    default = DeviceConfig()
    assert cfg.links.noc_pe == LinkSpec(latency=12 * NS, bandwidth=default.links.noc_pe.bandwidth)
    assert cfg.fabric == FabricConfig(inbox_capacity=8, msg_bytes=default.fabric.msg_bytes)
    assert cfg.name == "slow"  # named after the file, not mistaken for the default preset
    assert attrs.evolve(cfg, name="default", links=default.links, fabric=default.fabric) == default


def test_partial_file_over_another_base(tmp_path: Path) -> None:
    path = write(tmp_path, 'name = "tiny-slow"\n[links.noc_pe]\nlatency = "1us"\n')
    cfg = DeviceConfig.from_toml(path, base=DeviceConfig.preset("tiny"))
    assert cfg.num_pes == 8
    assert cfg.links.noc_pe.latency == 1 * US
    assert cfg.name == "tiny-slow"


def test_load_accepts_every_spelling(tmp_path: Path) -> None:
    path = write(tmp_path, "[topology]\nsips = 1\n")
    tiny = DeviceConfig.preset("tiny")
    assert DeviceConfig.load("tiny") is tiny
    assert DeviceConfig.load(tiny) is tiny
    assert DeviceConfig.load(None) == DeviceConfig()
    assert DeviceConfig.load(path).topology.sips == 1
    assert DeviceConfig.load(str(path)).topology.sips == 1


def test_load_of_an_unknown_name_lists_presets() -> None:
    with pytest.raises(ConfigError, match="'tinyy' is neither a preset nor a TOML file; presets: default, large, tiny"):
        DeviceConfig.load("tinyy")


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read device config: .*nothere\.toml"):
        DeviceConfig.load(tmp_path / "nothere.toml")


# -- errors -------------------------------------------------------------------


def test_unknown_key_names_the_dotted_key_and_the_file(tmp_path: Path) -> None:
    err = config_error(tmp_path, '[links.noc_pee]\nlatency = "5ns"\n')
    assert err.key == "links.noc_pee"
    assert str(err).startswith("links.noc_pee: unknown key (did you mean 'noc_pe'?)")
    assert str(err).endswith("(in " + str(tmp_path / "my.toml") + ")")


def test_unknown_leaf_key_suggests_the_right_one(tmp_path: Path) -> None:
    err = config_error(tmp_path, '[links.noc_pe]\nlatncy = "5ns"\n')
    assert "links.noc_pe.latncy: unknown key (did you mean 'latency'?); valid keys in [links.noc_pe]" in str(err)


def test_unknown_top_level_table(tmp_path: Path) -> None:
    err = config_error(tmp_path, "[topolgy]\nsips = 1\n")
    assert "topolgy: unknown key (did you mean 'topology'?)" in str(err)


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ('[topology]\nsips = "2"\n', "topology.sips", "expected an integer, got the string '2'"),
        ("[topology]\nsips = true\n", "topology.sips", "expected an integer, got the boolean true"),
        ("[topology]\nsips = 2.0\n", "topology.sips", "expected an integer, got the float 2.0"),
        ("[fabric]\ninbox_capacity = [1]\n", "fabric.inbox_capacity", "got an array"),
        ("name = 3\n", "name", "expected a string, got the integer 3"),
        ("[links.noc_pe]\nlatency = 5\n", "links.noc_pe.latency", "a bare number has no unit"),
        ("[links.noc_pe]\nbandwidth = 5.0\n", "links.noc_pe.bandwidth", "a bare number has no unit"),
        ('[memory]\nhbm_base = "0x1000"\n', "memory.hbm_base", "expected an integer"),
        ("links = 5\n", "links", "expected a table, got the integer 5"),
        ('[links]\nnoc_pe = "5ns"\n', "links.noc_pe", "expected a table, got the string '5ns'"),
    ],
)
def test_wrong_types_are_rejected(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    err = config_error(tmp_path, text)
    assert err.key == key
    assert str(err).startswith(f"{key}: ")
    assert fragment in str(err)


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ('[links.noc_pe]\nlatency = "12 parsecs"\n', "links.noc_pe.latency", "'12 parsecs' is not a duration"),
        ('[links.noc_pe]\nlatency = "-5ns"\n', "links.noc_pe.latency", "is not a duration"),
        ('[links.noc_pe]\nbandwidth = "64GB"\n', "links.noc_pe.bandwidth", "'64GB' is not a bandwidth"),
        ('[links.noc_pe]\nbandwidth = "0GB/s"\n', "links.noc_pe.bandwidth", "a bandwidth must be > 0"),
        ('[memory]\nsram_per_pe = "4 MiBs"\n', "memory.sram_per_pe", "'4 MiBs' is not a size"),
        ('[compute]\nkernel_launch = "fast"\n', "compute.kernel_launch", "'fast' is not a duration"),
    ],
)
def test_bad_unit_strings_are_rejected(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    err = config_error(tmp_path, text)
    assert err.key == key
    assert str(err).startswith(f"{key}: ")
    assert fragment in str(err)


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("[fabric]\ninbox_capacity = 0\n", "fabric.inbox_capacity", "must be >= 1, got 0"),
        ("[fabric]\nmsg_bytes = -1\n", "fabric.msg_bytes", "must be >= 1, got -1"),
        ("[topology]\nsips = 0\n", "topology.sips", "must be >= 1, got 0"),
        ('[memory]\npage_size = "48KiB"\n', "memory.page_size", "must be a power of two, got 48KiB"),
        ('[memory]\npage_size = "2KiB"\n', "memory.page_size", "must be >= 4KiB, got 2KiB"),
        (
            '[memory]\nsram_per_pe = "8MiB"\nhbm_base = 0x40_0000\n',
            "memory.hbm_base",
            "0x40_0000 overlaps SRAM: it must be >= sram_per_pe (8MiB)",
        ),
        ("[memory]\nhbm_base = 0x10_0000_1000\n", "memory.hbm_base", "is not aligned to page_size (64KiB)"),
        ('[memory]\nva_size = "100KiB"\n', "memory.va_size", "is not a multiple of page_size (64KiB)"),
        ("[compute]\npe_clock_hz = 0\n", "compute.pe_clock_hz", "must be >= 1Hz, got 0Hz"),
        (
            "[topology]\nsips = 64\ncubes_per_sip = 64\npes_per_cube = 64\n",
            "topology",
            "64 SIPs x 64 cubes x 64 PEs = 262144 PEs; at most 65536 PEs are supported",
        ),
    ],
)
def test_out_of_range_values_are_rejected(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    err = config_error(tmp_path, text)
    assert err.key == key
    assert str(err).startswith(f"{key}: ")
    assert fragment in str(err)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = """
[topology]
sips = "2"
[fabric]
inbox_capacity = 0
[links.noc_pe]
latency = "12 parsecs"
[links.noc_pee]
latency = "1ns"
"""
    err = config_error(tmp_path, text)
    message = str(err)
    assert message.startswith(f"4 problems (in {tmp_path / 'my.toml'}):\n")
    lines = message.splitlines()[1:]
    assert [line.split(":")[0].strip() for line in lines] == [
        "topology.sips",
        "fabric.inbox_capacity",
        "links.noc_pe.latency",
        "links.noc_pee",
    ]
    assert err.key == "topology.sips"


def test_malformed_toml_names_the_file_and_line(tmp_path: Path) -> None:
    err = config_error(tmp_path, 'name = "x"\n[links.noc_pe\nlatency = "5ns"\n', "broken.toml")
    assert str(err).startswith("malformed TOML: ")
    assert "line 2" in str(err)


def test_from_dict_rejects_a_non_table() -> None:
    with pytest.raises(ConfigError, match=r"expected a table of settings, got an array \(in <dict>\)"):
        DeviceConfig.from_dict([1, 2])  # type: ignore[arg-type]


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ConfigError, match=r"fabric\.inbox_capacity: must be >= 1, got 0"):
        DeviceConfig(fabric=FabricConfig(inbox_capacity=0))
    with pytest.raises(ConfigError, match=r"topology\.sips: expected an integer"):
        attrs.evolve(DeviceConfig(), topology=Topology(sips="2"))  # type: ignore[arg-type]


# -- replace ------------------------------------------------------------------


def test_replace_returns_a_new_config() -> None:
    cfg = DeviceConfig()
    new = cfg.replace("links.noc_pe.latency", "7ns")
    assert new.links.noc_pe.latency == 7 * NS
    assert new.links.noc_pe.bandwidth == cfg.links.noc_pe.bandwidth
    assert cfg.links.noc_pe.latency == 5 * NS  # the original is untouched
    assert attrs.evolve(new, links=cfg.links) == cfg


def test_replace_accepts_internal_units_and_tables() -> None:
    cfg = DeviceConfig()
    assert cfg.replace("links.noc_pe.latency", 7000).links.noc_pe.latency == 7000
    assert cfg.replace("links.noc_pe", {"bandwidth": "1GB/s"}).links.noc_pe == LinkSpec(5 * NS, 10**9)
    assert cfg.replace("links.noc_pe", LinkSpec(1, 2)).links.noc_pe == LinkSpec(1, 2)
    assert cfg.replace("memory.page_size", 4096).memory.page_size == 4096
    assert cfg.replace("topology", Topology(1, 1, 1)).num_pes == 1


def test_replace_errors_name_the_key() -> None:
    cfg = DeviceConfig()
    with pytest.raises(ConfigError, match=r"^links\.noc_pe\.latency: 'abc' is not a duration.*\(in <replace>\)$"):
        cfg.replace("links.noc_pe.latency", "abc")
    with pytest.raises(ConfigError, match=r"^links\.nope: unknown key"):
        cfg.replace("links.nope", "5ns")
    with pytest.raises(ConfigError, match="is not a dotted key"):
        cfg.replace("links..latency", "5ns")


def test_with_overrides_changes_several_keys() -> None:
    cfg = DeviceConfig().with_overrides({"topology.sips": 1, "links.sip_sip.bandwidth": "50GB/s"})
    assert cfg.topology.sips == 1
    assert cfg.links.sip_sip.bandwidth == 50 * 10**9


# -- topology helpers ---------------------------------------------------------


def test_pe_coords_and_paths() -> None:
    cfg = DeviceConfig.preset("tiny")
    coords = list(cfg.pe_coords())
    assert coords[0] == (0, 0, 0)
    assert coords[-1] == (0, 1, 3)
    assert coords == sorted(coords)
    assert cfg.pe_path(0, 1, 3) == "sip0.cube1.pe3"
    assert cfg.cube_path(0, 1) == "sip0.cube1"
    assert cfg.sip_path(0) == "sip0"


@pytest.mark.parametrize(
    ("coords", "message"),
    [
        ((1, 0, 0), "sip 1 is out of range: valid sip indices are 0..0 (topology.sips = 1"),
        ((0, 2, 0), "cube 2 is out of range: valid cube indices are 0..1 (topology.cubes_per_sip = 2"),
        ((0, 0, 4), "pe 4 is out of range: valid pe indices are 0..3 (topology.pes_per_cube = 4"),
        ((0, 0, -1), "pe -1 is out of range: valid pe indices are 0..3"),
    ],
)
def test_check_coords_names_the_bad_coordinate(coords: tuple[int, int, int], message: str) -> None:
    cfg = DeviceConfig.preset("tiny")
    with pytest.raises(ValueError, match=re.escape(message)):
        cfg.check_coords(*coords)
    with pytest.raises(ValueError, match=re.escape(message)):
        cfg.pe_path(*coords)


def test_check_coords_rejects_non_integers() -> None:
    with pytest.raises(TypeError, match="cube index must be an int"):
        DeviceConfig().check_coords(0, True, 0)


# -- compute and links helpers ------------------------------------------------


def test_compute_helpers_round_up() -> None:
    compute = ComputeConfig(pe_clock_hz=1_500_000_000, pe_flops_per_cycle=512)
    assert compute.pe_flops == 768 * 10**9
    assert compute.cycles_to_ps(3) == 2000
    assert compute.cycles_to_ps(1) == 667  # 666.67ps rounded up: work never takes zero time
    assert compute.cycles_to_ps(0) == 0
    assert compute.flops_to_ps(513) == compute.cycles_to_ps(2)


def test_link_serialization_rounds_up() -> None:
    link = LinkSpec(latency=0, bandwidth=3)
    assert link.serialization(1) == 333_333_333_334
    assert LinkSpec(0, 10**12).serialization(64) == 64


def test_links_items_in_host_outward_order() -> None:
    levels = [name for name, _ in DeviceConfig().links.items()]
    assert levels == [
        "host_pcie",
        "pcie_io",
        "io_mcpu",
        "mcpu_noc",
        "noc_hop",
        "noc_pe",
        "dma_sram",
        "dma_hbm",
        "sip_sip",
        "sip_data",
    ]


# -- presentation -------------------------------------------------------------


def test_describe_covers_every_key_and_the_docstring_documents_them() -> None:
    rows = describe(DeviceConfig())
    keys = [key for key, _, _ in rows]
    flat = set(keys)
    assert len(flat) == len(keys)
    assert {"name", "topology.sips", "memory.va_size", "links.noc_pe.latency", "processing.pe_mmu"} <= flat
    # name, topology, memory, fabric, links (latency + bandwidth each), compute (with host_threads), dma, processing
    assert len(keys) == 1 + 6 + 12 + 5 + 10 * 2 + 4 + 4 + 8
    meaning = "NOC <-> a PE's blocks (PE_CPU, PE_DMA, PE_MMU): fixed delay of one hop"
    assert ("links.noc_pe.latency", "5ns", meaning) in rows
    by_key = {key: value for key, value, _ in rows}
    assert by_key["memory.hbm_base"] == "0x10_0000_0000"
    assert by_key["links.noc_pe.bandwidth"] == "256GB/s"
    assert by_key["compute.pe_clock_hz"] == "1.5GHz"
    doc = config_module.__doc__ or ""
    for key in keys:
        assert f"``{key.split('.')[-1]}``" in doc, key


def render(cfg: DeviceConfig) -> str:
    console = Console(width=200, record=True, color_system=None)
    console.print(tree(cfg))
    return console.export_text()


def test_tree_of_tiny_shows_every_block() -> None:
    text = render(DeviceConfig.preset("tiny"))
    assert "tiny: 1 SIP x 2 cubes x 4 PEs = 8 PEs" in text
    for block in ("pcie_ep", "io_cpu", "m_cpu", "noc", "hbm", "cpu", "dma", "mmu", "sram"):
        assert block in text
    assert "sip0.cube1.pe3" in text
    assert "more" not in text


def test_tree_of_large_collapses_long_lists() -> None:
    text = render(DeviceConfig.preset("large"))
    assert "... 30 more PEs" in text
    assert "... 14 more cubes" in text
    assert "... 6 more SIPs" in text
    assert "sip0.cube0.pe1" in text
    assert "pe2" not in text
    assert len(text.splitlines()) < 200


@pytest.mark.parametrize("name", ["tiny", "default", "large"])
def test_every_value_kbus_info_displays_reads_back(name: str) -> None:
    """What `kbus info` shows is what a TOML file may say: each displayed value loads to the same config."""
    cfg = DeviceConfig.load(name)
    for key, shown, _meaning in describe(cfg):
        if key == "name" or " " in shown:
            continue
        try:
            value: object = int(shown, 0)  # counts and addresses are TOML integers ("0x10_0000_0000")
        except ValueError:
            value = shown  # durations, sizes, bandwidths, frequencies and names are strings
        assert cfg.replace(key, value) == cfg, f"{key} = {shown!r} does not read back"


def test_frequencies_read_with_units_and_bad_ones_are_named() -> None:
    cfg = DeviceConfig.load("tiny")
    assert cfg.replace("compute.pe_clock_hz", "1.5GHz").compute.pe_clock_hz == 1_500_000_000
    assert cfg.replace("compute.pe_clock_hz", "800 MHz").compute.pe_clock_hz == 800_000_000
    assert cfg.replace("compute.pe_clock_hz", 2_000_000_000).compute.pe_clock_hz == 2_000_000_000
    with pytest.raises(ConfigError, match=r"compute.pe_clock_hz: 'fast' is not a frequency"):
        cfg.replace("compute.pe_clock_hz", "fast")
    with pytest.raises(ConfigError, match=r"'1.0000000005GHz' is not a whole number of hertz"):
        cfg.replace("compute.pe_clock_hz", "1.0000000005GHz")


def test_a_zero_bandwidth_says_it_must_be_positive() -> None:
    with pytest.raises(ConfigError, match=r"links.noc_pe.bandwidth: '0GB/s': a bandwidth must be > 0"):
        DeviceConfig.load("tiny").replace("links.noc_pe.bandwidth", "0GB/s")
