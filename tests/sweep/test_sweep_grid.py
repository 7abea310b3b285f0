"""Grids and ``--set`` parsing: point order, zip, value types, and errors that name the problem."""

from __future__ import annotations

import pytest

from kbus.sweep import Grid, SweepError, parse_set, parse_value
from kbus.sweep.cli import grid_from_sets


def test_product_keeps_key_order_and_varies_the_last_key_fastest() -> None:
    g = Grid.product({"a.x": ["1ns", "2ns"], "b.y": [1, 2, 3]})
    assert g.keys == ("a.x", "b.y")
    assert list(g) == [
        {"a.x": "1ns", "b.y": 1},
        {"a.x": "1ns", "b.y": 2},
        {"a.x": "1ns", "b.y": 3},
        {"a.x": "2ns", "b.y": 1},
        {"a.x": "2ns", "b.y": 2},
        {"a.x": "2ns", "b.y": 3},
    ]
    assert len(g) == 6


def test_zip_pairs_values_and_rejects_unequal_lengths() -> None:
    g = Grid.zip({"a.x": ["1ns", "2ns"], "b.y": [1, 2]})
    assert list(g) == [{"a.x": "1ns", "b.y": 1}, {"a.x": "2ns", "b.y": 2}]
    with pytest.raises(SweepError, match=r"a\.x: 2, b\.y: 3"):
        Grid.zip({"a.x": ["1ns", "2ns"], "b.y": [1, 2, 3]})


@pytest.mark.parametrize(
    ("axes", "match"),
    [
        ({}, "at least one key"),
        ({"a..b": [1]}, "not a dotted config key"),
        ({"a.b": []}, r"a\.b: the list of values is empty"),
        ({"a.b": "128GB/s"}, r"a\.b: expected a list of values"),
    ],
)
def test_bad_axes_are_named(axes: dict[str, object], match: str) -> None:
    with pytest.raises(SweepError, match=match):
        Grid.product(axes)  # type: ignore[arg-type]


def test_values_are_read_as_toml_scalars_or_kept_as_strings() -> None:
    assert parse_value("4") == 4 and isinstance(parse_value("4"), int)
    assert parse_value("0x10") == 16
    assert parse_value("true") is True
    assert parse_value("1.5") == 1.5
    assert parse_value("128GB/s") == "128GB/s"
    assert parse_value("7ns") == "7ns"
    assert parse_value('"4"') == "4"


def test_parse_set_and_its_errors() -> None:
    assert parse_set("links.noc_hop.bandwidth=64GB/s,128GB/s") == ("links.noc_hop.bandwidth", ["64GB/s", "128GB/s"])
    assert parse_set("topology.cubes_per_sip=1,2") == ("topology.cubes_per_sip", [1, 2])
    with pytest.raises(SweepError, match="expected KEY=V1,V2"):
        parse_set("links.noc_hop.bandwidth")
    with pytest.raises(SweepError, match=r"empty value in the list for topology\.cubes_per_sip"):
        parse_set("topology.cubes_per_sip=1,,2")


def test_grid_from_sets_refuses_a_key_given_twice_and_an_empty_sweep() -> None:
    assert len(grid_from_sets(["a.b=1,2", "c.d=x,y,z"], zipped=False)) == 6
    assert len(grid_from_sets(["a.b=1,2", "c.d=x,y"], zipped=True)) == 2
    with pytest.raises(SweepError, match=r"a\.b is given twice"):
        grid_from_sets(["a.b=1", "a.b=2"], zipped=False)
    with pytest.raises(SweepError, match="nothing to sweep"):
        grid_from_sets([], zipped=False)


def test_batches_give_each_worker_about_sixteen_tasks_and_never_zero_points() -> None:
    from kbus.sweep.runner import batch_size

    assert batch_size(16, 2) == 1
    assert batch_size(1000, 2) == 31
    assert batch_size(1000, 0) == 62  # no worker known yet: count one
    assert batch_size(3, 100) == 1
