"""The collective parser: operand bytes by kind, loop trip counts, loops of unknown trip count; on a
hand-written HLO module and on real compiled psums."""
import numpy as np
import pytest

from dig_jax.aot import analysis
from tests.aot.conftest import requires_libtpu

HLO = """HloModule hand_written, entry_computation_layout={()->()}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%counted_body (p: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
  %p = (s32[], f32[8,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %i.copy = s32[] copy(%i)
  %x = f32[8,128]{1,0} get-tuple-element(%p), index=1
  %one = s32[] constant(1)
  %next = s32[] add(%i.copy, %one)
  %ar = f32[8,128]{1,0:T(8,128)} all-reduce(%x), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add
  %cps = (f32[8,128]{1,0}, f32[8,128]{1,0}) collective-permute-start(%ar), source_target_pairs={{0,1},{1,0}}
  %cpd = f32[8,128]{1,0} collective-permute-done(%cps)
  ROOT %t = (s32[], f32[8,128]{1,0}) tuple(%next, %cpd)
}

%counted_cond (p: (s32[], f32[8,128])) -> pred[] {
  %p = (s32[], f32[8,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%open_body (q: (s32[], bf16[16,64])) -> (s32[], bf16[16,64]) {
  %q = (s32[], bf16[16,64]) parameter(0)
  %k = s32[] get-tuple-element(%q), index=0
  %y = bf16[16,64] get-tuple-element(%q), index=1
  %a2a = bf16[16,64] all-to-all(%y), dimensions={0}, replica_groups={{0,1,2,3}}
  ROOT %u = (s32[], bf16[16,64]) tuple(%k, %a2a)
}

%open_cond (q: (s32[], bf16[16,64])) -> pred[] {
  %q = (s32[], bf16[16,64]) parameter(0)
  %k = s32[] get-tuple-element(%q), index=0
  %limit = s32[] constant(9)
  %below = pred[] compare(%k, %limit), direction=LT
  %y = bf16[16,64] get-tuple-element(%q), index=1
  %flag = pred[] custom-call(%y), custom_call_target="any_nonzero"
  ROOT %both = pred[] and(%below, %flag)
}

%stated_body (r: f32[2,2]) -> f32[2,2] {
  %r = f32[2,2] parameter(0)
  ROOT %ag = f32[2,2] all-gather(%r), dimensions={0}, replica_groups={{0,1}}
}

%stated_cond (r: f32[2,2]) -> pred[] {
  %r = f32[2,2] parameter(0)
  ROOT %t = pred[] constant(true)
}

%fused (f: bf16[4,256]) -> bf16[1,256] {
  %f = bf16[4,256]{1,0} parameter(0)
  ROOT %rs = bf16[1,256]{1,0} reduce-scatter(%f), dimensions={0}, replica_groups={{0,1,2,3}}, to_apply=%add
}

ENTRY %main (x: f32[8,128], y: bf16[2,1024], z: bf16[4,256], w: bf16[16,64], r: f32[2,2]) -> bf16[1,256] {
  %x = f32[8,128]{1,0} parameter(0)
  %y = bf16[2,1024]{1,0} parameter(1)
  %z = bf16[4,256]{1,0} parameter(2)
  %w = bf16[16,64]{1,0} parameter(3)
  %r = f32[2,2]{1,0} parameter(4)
  %ags = (bf16[2,1024]{1,0}, bf16[8,1024]{1,0}) all-gather-start(%y), dimensions={0}, replica_groups={{0,1,2,3}}
  %agd = bf16[8,1024]{1,0} all-gather-done(%ags)
  %two = s32[] constant(2)
  %two.copy = s32[] copy(%two)
  %init = (s32[], f32[8,128]{1,0}) tuple(%two.copy, %x)
  %counted = (s32[], f32[8,128]{1,0}) while(%init), condition=%counted_cond, body=%counted_body
  %zero = s32[] constant(0)
  %init2 = (s32[], bf16[16,64]) tuple(%zero, %w)
  %open = (s32[], bf16[16,64]) while(%init2), condition=%open_cond, body=%open_body
  %stated = f32[2,2] while(%r), condition=%stated_cond, body=%stated_body, backend_config={"known_trip_count":{"n":"7"}}
  ROOT %fusion = bf16[1,256]{1,0} fusion(%z), kind=kLoop, calls=%fused
}
"""


def test_hand_written_module():
    got = analysis.collective_bytes(HLO)
    # all-gather: bf16[2,1024] once + f32[2,2] x 7 (known_trip_count); the counted loop runs 5 - 2 = 3
    # times (all-reduce and collective-permute of f32[8,128]); the fusion's reduce-scatter of bf16[4,256].
    assert got.counted == {"all-gather": 2 * 1024 * 2 + 7 * 2 * 2 * 4, "all-reduce": 3 * 8 * 128 * 4,
                           "collective-permute": 3 * 8 * 128 * 4, "reduce-scatter": 4 * 256 * 2}
    # the loop whose condition also reads data has no stated trip count: its all-to-all is counted once, apart
    assert got.per_unknown_iteration == {"all-to-all": 16 * 64 * 2} and got.unknown_loops == 1
    assert got.total == sum(got.counted.values())
    # received per chip (ring algorithms over the replica groups: 4 chips, the stated loop's 2)
    assert got.wire == {"all-gather": 3 * 4096 + 7 * 1 * 16, "all-reduce": 3 * 4096 * 2 * 3 // 4,
                        "collective-permute": 3 * 4096, "reduce-scatter": 2048 * 3 // 4}
    assert got.wire_per_unknown_iteration == {"all-to-all": 2048 * 3 // 4}


def test_type_bytes():
    assert analysis.type_bytes("bf16[4096,1024]{1,0:T(8,128)(2,1)S(1)}") == 4096 * 1024 * 2
    assert analysis.type_bytes("(s32[]{:T(128)}, f32[4,1024]{1,0}, pred[3])") == 4 + 4 * 1024 * 4 + 3


def test_trip_counts_of_other_steps_and_of_no_constant_step():
    by_two = analysis.collective_bytes(HLO.replace("%one = s32[] constant(1)", "%one = s32[] constant(2)"))
    assert by_two.counted["all-reduce"] == 2 * 8 * 128 * 4  # 2, 4 < 5: two iterations
    by_data = analysis.collective_bytes(HLO.replace("%one = s32[] constant(1)",
                                                    "%one = s32[] get-tuple-element(%p), index=0"))
    assert "all-reduce" not in by_data.counted and by_data.per_unknown_iteration["all-reduce"] == 8 * 128 * 4
    assert by_data.unknown_loops == 2


def test_group_sizes_in_each_spelling():
    assert analysis.group_size("replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}", 8) == 4
    assert analysis.group_size("replica_groups=[2,8]<=[16], dimensions={0}", 16) == 8
    assert analysis.group_size("replica_groups=mesh['axis_0'=4,'axis_1'=2,'axis_2'=2] {'axis_0','axis_2'}", 16) == 8
    assert analysis.group_size("replica_groups={}, to_apply=%add", 16) == 16
    assert analysis.wire_bytes("all-gather", 100, 1) == 0 and analysis.wire_bytes("collective-permute", 100, 1) == 100


def _v5e_mesh():
    import jax
    from jax.sharding import Mesh

    from dig_jax.aot import topologies

    devices = topologies.get("v5e-4").describe().devices
    return jax, Mesh(np.asarray(devices), ("x",))


@requires_libtpu
@pytest.mark.parametrize("repeats", [1, 3, 12])
def test_a_compiled_psum(repeats):
    """psum over 4 chips of an f32[8, 128] shard: one all-reduce of 4 KiB per call, `repeats` times when
    it sits in a scanned loop (which XLA may also unroll: the count is the same)."""
    jax, mesh = _v5e_mesh()
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    def body(x):
        def step(carry, _):
            return jnp.tanh(jax.lax.psum(carry, "x")) + carry, None  # varying again, as the carry
        return jax.lax.scan(step, x, None, length=repeats)[0]

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P("x")))
    x = jax.ShapeDtypeStruct((32, 128), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    got = analysis.collective_bytes(f.lower(x).compile().as_text())
    assert got.counted == {"all-reduce": repeats * 8 * 128 * 4}
    assert got.wire == {"all-reduce": repeats * 8 * 128 * 4 * 2 * 3 // 4}  # reduce-scatter + all-gather over 4
    assert got.unknown_loops == 0
