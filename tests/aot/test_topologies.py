"""The topology table: names, chips, hosts, megacore, wrap, the unknown-name error, and (with libtpu)
that libtpu describes each slice with as many devices and hosts as the table says and enforces the
table's usable HBM."""
import collections

import pytest

from dig_jax.aot import topologies
from tests.aot.conftest import requires_libtpu


@pytest.mark.parametrize("name, topology_name, chips, hosts, chip_config", [
    ("v5p-8", "v5:2x2x1", 4, 1, "megacore"),     # v5p-N counts TensorCores: 2 per chip
    ("v5p-32", "v5:2x2x4", 16, 4, "megacore"),
    ("v4-8", "v4:2x2x1", 4, 1, "megacore"),
    ("v4-128", "v4:4x4x4", 64, 16, "megacore"),
    ("v5e-1", "v5e:1x1", 1, 1, "default"),       # v5e-N / v6e-N count chips
    ("v5e-8", "v5e:2x4", 8, 1, "default"),
    ("v5e-64", "v5e:8x8", 64, 16, "default"),
    ("v6e-32", "v6e:4x8", 32, 8, "default"),
    ("v6e-256", "v6e:16x16", 256, 64, "default"),
])
def test_names_chips_hosts_and_chip_config(name, topology_name, chips, hosts, chip_config):
    topo = topologies.get(name)
    assert (topo.topology_name, topo.chips, topo.hosts, topo.generation.chip_config_name) == \
        (topology_name, chips, hosts, chip_config)


def test_every_generation_runs_from_four_chips_to_its_full_pod_which_wraps():
    by_generation = collections.defaultdict(list)
    for topo in topologies.TOPOLOGIES.values():
        by_generation[topo.generation.name].append(topo)
        assert int(topo.name.split("-")[1]) == topo.chips * topo.generation.cores_per_chip
    full_pods = {"v5e": (256, (True, True, False)), "v6e": (256, (True, True, False)),
                 "v4": (4096, (True, True, True)), "v5p": (6144, (True, True, True))}
    for gen, (chips, wrap) in full_pods.items():
        sizes = [t.chips for t in by_generation[gen]]
        assert 4 in sizes and max(sizes) == chips
        biggest = max(by_generation[gen], key=lambda t: t.chips)
        assert biggest.wrap == wrap
    assert topologies.get("v5e-64").wrap == (False, False, False)
    assert topologies.get("v5p-32").wrap == (False, False, False)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown TPU topology .v5p-31.*v5e-64.*v5p-32"):
        topologies.get("v5p-31")
    with pytest.raises(ValueError, match="num_slices"):
        topologies.get("v5e-4").describe(0)


@requires_libtpu
def test_libtpu_describes_every_slice_as_the_table_does():
    for topo in topologies.TOPOLOGIES.values():
        devices = topo.describe().devices
        assert len(devices) == topo.chips, topo.name
        assert len({d.process_index for d in devices}) == topo.hosts, topo.name
    kinds = {name: topologies.get(name).describe().devices[0].device_kind
             for name in ("v4-8", "v5p-8", "v5e-4", "v6e-4")}
    assert kinds == {"v4-8": "TPU v4", "v5p-8": "TPU v5", "v5e-4": "TPU v5 lite", "v6e-4": "TPU v6 lite"}


@requires_libtpu
def test_multi_slice_doubles_the_devices():
    devices = topologies.get("v5p-32").describe(num_slices=2).devices
    assert len(devices) == 32
    assert {d.slice_index for d in devices} == {0, 1}


@requires_libtpu
def test_the_compiler_enforces_the_tables_usable_hbm():
    from dig_jax.aot import analysis

    for gen, name in (("v4", "v4-8"), ("v5e", "v5e-1"), ("v5p", "v5p-8"), ("v6e", "v6e-1")):
        device = topologies.get(name).describe().devices[0]
        assert analysis.usable_hbm_bytes(device) == topologies.GENERATIONS[gen].usable_hbm_bytes, gen
