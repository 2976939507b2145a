"""The TPU slices a run can be planned for: names, `get_topology_desc` arguments and per-chip figures.

Naming (Google Cloud's accelerator types): v5e-N and v6e-N count chips (v5e-64 is 64 chips, `v5e:8x8`);
v4-N and v5p-N count TensorCores, two per chip, which XLA fuses into one device per chip
(`chip_config_name="megacore"`): v5p-8 is 4 chips, `v5:2x2x1`. Full pods wrap around in their torus
dimensions (v5e/v6e 16x16: both axes; v4/v5p cubes of 4x4x4 and more: all three). Hosts are the TPU VM
workers (one process each): four chips per host (`chips_per_host_bounds=(2, 2, 1)`), except the
single-host slices of 1 and 8 chips of v5e / v6e.

Per-chip figures (peak bf16 FLOP/s, HBM bytes/s, ICI bytes/s), from the key-specification tables of
Google Cloud's TPU documentation, cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}:
  v4   275 TFLOP/s, HBM2 32 GiB at 1200 GB/s; the v4 page gives no per-chip ICI figure, so ICI is its
       "all-reduce bandwidth per Pod" 1.1 PB/s divided by the pod's 4096 chips (268.6 GB/s);
  v5e  197 TFLOP/s, 16 GB at 819 GB/s, ICI 1600 Gbit/s (200 GB/s);
  v5p  459 TFLOP/s, 95 GB at 2765 GB/s, ICI 4800 Gbit/s (600 GB/s);
  v6e  918 TFLOP/s, 32 GB at 1640 GB/s, ICI 3584 Gbit/s (448 GB/s).
Usable HBM per chip as libtpu 0.0.42 enforces it (the figure its "exceeds available HBM (...)" refusal
names; `analysis.usable_hbm_bytes` reads it from the compiler, this table is the fallback and the check):
v4 30.75 GiB, v5e 15.75 GiB, v5p 95.74 GiB, v6e 31.25 GiB.
"""
from __future__ import annotations

import dataclasses
import math

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Generation:
    """One TPU generation: how XLA names it and what one chip offers."""

    name: str  # the accelerator-type prefix: "v5p"
    xla_name: str  # the prefix of get_topology_desc's topology_name: "v5"
    chip_config_name: str  # "megacore" (one device per chip of two TensorCores) or "default"
    cores_per_chip: int  # how many units the accelerator-type number counts per chip
    peak_bf16_flops: float  # per chip, FLOP/s
    hbm_bandwidth: float  # per chip, bytes/s
    ici_bandwidth: float  # per chip, bytes/s
    published_hbm: str  # the documentation's capacity, in its own unit
    usable_hbm_bytes: int  # what libtpu 0.0.42 lets one program use


GENERATIONS = {
    "v4": Generation("v4", "v4", "megacore", 2, 275e12, 1200e9, 1.1e15 / 4096, "32 GiB", int(30.75 * GIB)),
    "v5e": Generation("v5e", "v5e", "default", 1, 197e12, 819e9, 1600e9 / 8, "16 GB", int(15.75 * GIB)),
    "v5p": Generation("v5p", "v5", "megacore", 2, 459e12, 2765e9, 4800e9 / 8, "95 GB", int(95.74 * GIB)),
    "v6e": Generation("v6e", "v6e", "default", 1, 918e12, 1640e9, 3584e9 / 8, "32 GB", int(31.25 * GIB)),
}

# Slice shapes in chips, smallest to the full pod (the last entry of each list).
_SHAPES = {
    "v5e": [(1, 1), (2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16)],
    "v6e": [(1, 1), (2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16)],
    "v4": [(2, 2, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4), (4, 4, 4), (4, 4, 8), (4, 8, 8), (8, 8, 8), (8, 8, 16),
           (8, 16, 16), (16, 16, 16)],
    "v5p": [(2, 2, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4), (4, 4, 4), (4, 4, 8), (4, 8, 8), (8, 8, 8), (8, 8, 16),
            (8, 16, 16), (16, 16, 16), (16, 16, 24)],
}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A named slice: what `get_topology_desc` needs to describe it, and its size."""

    name: str  # "v5p-32"
    generation: Generation
    shape: tuple[int, ...]  # chips per torus axis
    chips_per_host_bounds: tuple[int, int, int]
    wrap: tuple[bool, bool, bool]

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def hosts(self) -> int:
        return self.chips // math.prod(self.chips_per_host_bounds)

    @property
    def topology_name(self) -> str:
        return f"{self.generation.xla_name}:{'x'.join(map(str, self.shape))}"

    def describe(self, num_slices: int = 1):
        """The compile-only `TopologyDescription` of `num_slices` such slices (needs libtpu)."""
        if num_slices < 1:
            raise ValueError(f"num_slices must be >= 1, got {num_slices}")
        from jax.experimental.topologies import get_topology_desc

        return get_topology_desc(platform="tpu", topology_name=self.topology_name,
                                 chip_config_name=self.generation.chip_config_name,
                                 chips_per_host_bounds=self.chips_per_host_bounds, num_slices=num_slices,
                                 wrap=self.wrap)


def _topology(gen: Generation, shape: tuple[int, ...], full_pod: bool) -> Topology:
    chips = math.prod(shape)
    if chips in (1, 8) and len(shape) == 2:  # v5e / v6e single-host slices: all chips on one host
        bounds = (*shape, 1)
    else:
        bounds = (2, 2, 1)
    if len(shape) == 2:
        wrap = (full_pod, full_pod, False)
    else:  # v4 / v5p: slices of whole 4x4x4 cubes are tori
        wrap = (True, True, True) if min(shape) >= 4 else (False, False, False)
    return Topology(f"{gen.name}-{chips * gen.cores_per_chip}", gen, shape, bounds, wrap)


def _table() -> dict[str, Topology]:
    table = {}
    for gen_name, shapes in _SHAPES.items():
        gen = GENERATIONS[gen_name]
        for i, shape in enumerate(shapes):
            topo = _topology(gen, shape, full_pod=i == len(shapes) - 1)
            table[topo.name] = topo
    return table


TOPOLOGIES: dict[str, Topology] = _table()


def get(name: str) -> Topology:
    """The slice called `name` ("v5p-32", "v5e-64", ...); a ValueError listing the known names otherwise."""
    if name not in TOPOLOGIES:
        raise ValueError(f"unknown TPU topology {name!r}; known: {', '.join(TOPOLOGIES)}")
    return TOPOLOGIES[name]
