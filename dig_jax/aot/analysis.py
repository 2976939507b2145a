"""What the compiler says about one program: its memory per chip, its collective traffic, or its refusal.

Memory (`compiled.memory_analysis()`, per chip): arguments, outputs, aliases (outputs written into
donated arguments), temporaries (activations kept for the backward pass, gathered FSDP weights,
gradients, collective buffers, the KV cache of a generation) and the liveness-aware peak.

A program that does not fit is refused by `.compile()` itself, within seconds, with RESOURCE_EXHAUSTED
("Ran out of memory on HBM ... exceeds available HBM (15.75G)"): that refusal is the authoritative
verdict, and `compile_program` turns it into a `DOES NOT FIT` result naming the program instead of a
traceback. The same message names the HBM a program may use, which `usable_hbm_bytes` reads.

Collectives (`collective_bytes`): operand bytes of every all-gather / all-reduce / reduce-scatter /
all-to-all / collective-permute in the optimised HLO (`compiled.as_text()`), per call, per chip, and
the bytes each chip receives for them over ICI (`wire_bytes`: an all-gather's operand is one shard,
while the chip receives the other g - 1), which the ICI roofline uses. A
collective inside a `while` body counts trip-count times when the trip count is known: from
`known_trip_count` in the loop's backend_config, or from the counted-loop pattern XLA emits for
`lax.scan` / `fori_loop` and for its own windowed (collective) matmuls: the condition compares a
counter that starts at a constant and grows by a constant step against a constant bound. Loops whose trip count the HLO does not state (the sampler's decode loop,
which stops when every row has emitted EOS) are counted once: their bytes are reported apart, as bytes
per iteration. A `conditional` counts every branch (an upper bound).
"""
from __future__ import annotations

import collections
import dataclasses
import re
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4,
                "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True)) + r")\[([0-9,]*)\]")
_OOM = re.compile(r"resource_exhausted|exceeds available hbm|out of memory", re.IGNORECASE)
_AVAILABLE = re.compile(r"exceeds available HBM \(([0-9.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}


# ----------------------------------------------------------------------------------------------------
# Compiling
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Memory:
    """Per-chip bytes of one compiled program (`compiled.memory_analysis()`)."""

    arguments: int
    outputs: int
    aliases: int
    temporaries: int
    generated_code: int
    peak: int

    @classmethod
    def of(cls, compiled) -> "Memory":
        m = compiled.memory_analysis()
        return cls(arguments=int(m.argument_size_in_bytes), outputs=int(m.output_size_in_bytes),
                   aliases=int(m.alias_size_in_bytes), temporaries=int(m.temp_size_in_bytes),
                   generated_code=int(m.generated_code_size_in_bytes), peak=int(m.peak_memory_in_bytes))


@dataclasses.dataclass
class Compiled:
    """One program's compile: `compiled` and `memory` when it fits, else `refusal` (the compiler's words)."""

    name: str
    seconds: float
    compiled: object | None = None
    memory: Memory | None = None
    refusal: str | None = None

    @property
    def fits(self) -> bool:
        return self.refusal is None


def is_out_of_memory(error: Exception) -> bool:
    """Whether a compile error is the compiler refusing a program too large for HBM."""
    return bool(_OOM.search(str(error)))


def compile_program(name: str, lower: Callable[[], object]) -> Compiled:
    """Lowers and compiles one program; an out-of-HBM refusal becomes a result, any other error is raised."""
    t0 = time.perf_counter()
    try:
        compiled = lower().compile()
    except Exception as e:  # noqa: BLE001 - only the compiler's out-of-memory refusal is a result
        if not is_out_of_memory(e):
            raise
        return Compiled(name, time.perf_counter() - t0, refusal=_first_line(str(e)))
    return Compiled(name, time.perf_counter() - t0, compiled, Memory.of(compiled))


def _first_line(message: str) -> str:
    for line in message.splitlines():
        if _OOM.search(line):
            return line.strip()
    return message.strip().splitlines()[0]


def usable_hbm_bytes(device) -> int | None:
    """The HBM one program may use on `device`, as the compiler states it when it refuses a 1 TiB output
    (to the 0.01 GiB its message prints); None when the refusal does not name it."""
    from jax.sharding import SingleDeviceSharding

    try:
        jax.jit(lambda: jnp.zeros((1 << 40,), jnp.int8), out_shardings=SingleDeviceSharding(device)).lower().compile()
    except Exception as e:  # noqa: BLE001
        match = _AVAILABLE.search(str(e))
        if match:
            return int(float(match.group(1)) * _UNITS[match.group(2)])
        if not is_out_of_memory(e):
            raise
    return None


def shard_bytes(tree) -> int:
    """Bytes one chip holds of the arrays of `tree` (ShapeDtypeStructs or arrays with shardings): the
    largest shard of each leaf (all shards of a NamedSharding are equal), the whole leaf when unsharded."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = tuple(x.shape)
        sharding = getattr(x, "sharding", None)
        if sharding is not None:
            shape = sharding.shard_shape(shape)
        total += int(np.prod(shape, dtype=np.int64)) * x.dtype.itemsize
    return total


def total_elements(tree) -> int:
    """Scalars in the (unsharded) arrays of `tree`: a model's parameter count."""
    return int(sum(int(np.prod(x.shape, dtype=np.int64)) for x in jax.tree.leaves(tree)))


def abstract_outputs(compiled) -> object:
    """The outputs of a compiled program as ShapeDtypeStructs carrying the shardings the compiler chose."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=s.sharding), compiled.out_info)


# ----------------------------------------------------------------------------------------------------
# Collectives in the optimised HLO
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Instruction:
    name: str
    type: str
    opcode: str
    operands: list[str]  # the operand instructions' names
    args: str  # the text between the opcode's parentheses (a constant's value)
    attributes: str
    root: bool


@dataclasses.dataclass
class CollectiveBytes:
    """Bytes per chip of one call, by collective kind.

    counted: operand bytes of every collective of the program, loop bodies times their trip count.
    per_unknown_iteration: operand bytes inside loops whose trip count the HLO does not state, once.
    unknown_loops: how many such loops there are.
    wire / wire_per_unknown_iteration: the same as bytes each chip receives over ICI (`wire_bytes`).
    """

    counted: dict[str, int]
    per_unknown_iteration: dict[str, int]
    unknown_loops: int
    wire: dict[str, int]
    wire_per_unknown_iteration: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.counted.values())

    @property
    def wire_total(self) -> int:
        return sum(self.wire.values())

    def to_dict(self) -> dict:
        return {"counted": dict(self.counted), "per_unknown_iteration": dict(self.per_unknown_iteration),
                "unknown_loops": self.unknown_loops, "total": self.total, "wire": dict(self.wire),
                "wire_per_unknown_iteration": dict(self.wire_per_unknown_iteration), "wire_total": self.wire_total}


def wire_bytes(kind: str, operand_bytes: int, group: int) -> int:
    """Bytes one chip receives for a collective of `operand_bytes` per chip over `group` chips, with the
    bandwidth-optimal (ring) algorithms: an all-gather brings the group's other g - 1 shards; a
    reduce-scatter and an all-to-all move (g - 1) / g of the operand; an all-reduce is a reduce-scatter
    then an all-gather, 2 (g - 1) / g; a collective-permute receives one operand."""
    if kind == "collective-permute":
        return operand_bytes
    if group <= 1:
        return 0
    factor = {"all-gather": group - 1, "reduce-scatter": (group - 1) / group, "all-to-all": (group - 1) / group,
              "all-reduce": 2 * (group - 1) / group}[kind]
    return int(operand_bytes * factor)


def group_size(attributes: str, num_devices: int) -> int:
    """Chips per replica group of a collective, from its `replica_groups` in any of XLA's three
    spellings: explicit `{{0,1,2,3},...}`, iota `[groups,size]<=[n]`, or over a named mesh
    `mesh['axis_0'=16,'axis_1'=1] {'axis_0'}`; every chip (`num_devices`) when it names none."""
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attributes)
    if mesh:
        sizes = {name: int(size) for name, size in re.findall(r"'([^']+)'=(\d+)", mesh.group(1))}
        return int(np.prod([sizes[name] for name in re.findall(r"'([^']+)'", mesh.group(2))], dtype=np.int64))
    iota = re.search(r"replica_groups=\[([\d,]+)\]<=", attributes)
    if iota:
        return int(iota.group(1).split(",")[-1])
    explicit = re.search(r"replica_groups=\{\{([^}]*)\}", attributes)
    if explicit:
        return len([d for d in explicit.group(1).split(",") if d.strip()])
    return num_devices


def type_bytes(hlo_type: str) -> int:
    """Bytes of an HLO type: an array `bf16[4096,1024]{...}` or a tuple of them (layouts ignored)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(hlo_type):
        n = int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64)) if dims else 1
        total += n * _DTYPE_BYTES[dtype]
    return int(total)


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "([{":
            depth += 1
        elif text[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced HLO text near: {text[start:start + 80]!r}")


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if "".join(current).strip():
        parts.append("".join(current))
    return [p.strip() for p in parts]


def _parse_instruction(line: str) -> _Instruction | None:
    body = line.strip()
    root = body.startswith("ROOT ")
    if root:
        body = body[5:]
    if not body.startswith("%") or " = " not in body:
        return None
    name, rest = body.split(" = ", 1)
    if rest.startswith("("):
        end = _balanced(rest, 0)
    else:
        end = rest.index(" ")
    hlo_type, rest = rest[:end], rest[end:].lstrip()
    paren = rest.find("(")
    if paren < 0:
        return None
    opcode = rest[:paren]
    close = _balanced(rest, paren)
    operands = []
    for operand in _split_top_level(rest[paren + 1:close - 1]):
        names = re.findall(r"%[\w.\-]+", operand)
        if names:
            operands.append(names[-1])
    return _Instruction(name.strip(), hlo_type, opcode, operands, rest[paren + 1:close - 1], rest[close:], root)


def parse_hlo(text: str) -> tuple[dict[str, list[_Instruction]], str]:
    """(computation name -> its instructions, the entry computation's name) of an HLO module's text."""
    computations: dict[str, list[_Instruction]] = {}
    entry, current = None, None
    for line in text.splitlines():
        stripped = line.strip()
        header = re.match(r"^(ENTRY\s+)?(%[\w.\-]+)\s*\(.*\{\s*$", stripped)
        if header and not line.startswith(" "):
            current = header.group(2)
            computations[current] = []
            if header.group(1):
                entry = current
            continue
        if stripped == "}":
            current = None
            continue
        if current is not None:
            instruction = _parse_instruction(stripped)
            if instruction is not None:
                computations[current].append(instruction)
    if entry is None:
        raise ValueError("HLO text has no ENTRY computation")
    return computations, entry


def _called(instruction: _Instruction) -> list[tuple[str, str]]:
    """(role, computation) pairs an instruction calls: role is "body"/"condition" for loops, else "call"."""
    out = []
    for role, target in re.findall(r"\b(calls|to_apply|body|condition|true_computation|false_computation)"
                                   r"=(%[\w.\-]+)", instruction.attributes):
        out.append((role if role in ("body", "condition") else "call", target))
    for group in re.findall(r"branch_computations=\{([^}]*)\}", instruction.attributes):
        out += [("call", name) for name in re.findall(r"%[\w.\-]+", group)]
    return out


def _constant_value(name: str, table: dict[str, _Instruction]) -> int | None:
    """The integer a scalar constant (through copies) holds, or None."""
    seen = 0
    while name in table and seen < 16:
        inst = table[name]
        if inst.opcode == "constant":
            match = re.match(r"\s*(-?\d+)\s*$", inst.args)
            return int(match.group(1)) if match else None
        if inst.opcode != "copy" or not inst.operands:
            return None
        name, seen = inst.operands[0], seen + 1
    return None


def trip_count(loop: _Instruction, caller: dict[str, _Instruction],
               computations: dict[str, list[_Instruction]]) -> int | None:
    """The trip count of a `while` instruction, when its HLO states it (see the module docstring)."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop.attributes)
    if known:
        return int(known.group(1))
    targets = dict((role, target) for role, target in _called(loop))
    cond, body = computations.get(targets.get("condition")), computations.get(targets.get("body"))
    if not cond or not body or not loop.operands:
        return None
    cond_table = {i.name: i for i in cond}
    root = next((i for i in cond if i.root), None)
    if root is None or root.opcode != "compare" or "direction=LT" not in root.attributes or len(root.operands) != 2:
        return None
    counter = _through_copies(root.operands[0], cond_table)
    if counter is None or counter.opcode != "get-tuple-element":
        return None
    limit = _constant_value(root.operands[1], cond_table)
    index = re.search(r"index=(\d+)", counter.attributes)
    init_tuple = caller.get(loop.operands[0])
    if limit is None or index is None or init_tuple is None or init_tuple.opcode != "tuple":
        return None
    i = int(index.group(1))
    start = _constant_value(init_tuple.operands[i], caller) if i < len(init_tuple.operands) else None
    step = _step(body, i)
    if start is None or step is None:
        return None
    return max(-(-(limit - start) // step), 0)


def _step(body: list[_Instruction], index: int) -> int | None:
    """The positive constant by which element `index` of the loop state grows each iteration, or None."""
    table = {i.name: i for i in body}
    root = next((i for i in body if i.root), None)
    if root is None or root.opcode != "tuple" or index >= len(root.operands):
        return None
    update = _through_copies(root.operands[index], table)
    if update is None or update.opcode != "add" or len(update.operands) != 2:
        return None
    names = update.operands
    for j in (0, 1):
        g, step = _through_copies(names[j], table), _constant_value(names[1 - j], table)
        if g is not None and g.opcode == "get-tuple-element" and re.search(rf"\bindex={index}\b", g.attributes) \
                and step is not None and step > 0:
            return step
    return None


def _through_copies(name: str, table: dict[str, _Instruction]) -> _Instruction | None:
    """The instruction `name` is a copy (or chain of copies) of."""
    inst = table.get(name)
    for _ in range(16):
        if inst is None or inst.opcode != "copy" or not inst.operands:
            return inst
        inst = table.get(inst.operands[0])
    return inst


def collective_bytes(hlo_text: str, num_devices: int = 1) -> CollectiveBytes:
    """Collective bytes per call of the module in `hlo_text` (see the module docstring); `num_devices`
    is the group of a collective whose replica groups are left empty (all of the program's devices)."""
    computations, entry = parse_hlo(hlo_text)
    memo: dict[str, tuple[collections.Counter, collections.Counter, int]] = {}

    def visit(name: str, stack: tuple = ()) -> tuple[collections.Counter, collections.Counter, int]:
        """(counted, per-unknown-iteration, loops) of one call of computation `name`; the counters are
        keyed by (measure, kind), measure "operand" or "wire"."""
        if name in memo:
            return memo[name]
        if name in stack or name not in computations:
            return collections.Counter(), collections.Counter(), 0
        table = {i.name: i for i in computations[name]}
        counted, unknown, loops = collections.Counter(), collections.Counter(), 0
        for inst in computations[name]:
            kind = inst.opcode[:-len("-start")] if inst.opcode.endswith("-start") else inst.opcode
            if kind in COLLECTIVES:
                operand = sum(type_bytes(table[o].type) for o in inst.operands if o in table)
                counted["operand", kind] += operand
                counted["wire", kind] += wire_bytes(kind, operand, group_size(inst.attributes, num_devices))
            trips = trip_count(inst, table, computations) if inst.opcode == "while" else 1
            for role, target in _called(inst):
                c, u, n = visit(target, stack + (name,))
                if inst.opcode == "while" and trips is None:
                    unknown.update(c)
                    unknown.update(u)
                    loops += 1 + n if role == "body" else n
                else:
                    factor = trips if role in ("body", "condition") else 1
                    counted.update({k: v * factor for k, v in c.items()})
                    unknown.update(u)
                    loops += n
        memo[name] = (counted, unknown, loops)
        return memo[name]

    counted, unknown, loops = visit(entry)
    split = lambda counter, measure: {k: v for (m, k), v in counter.items() if m == measure}  # noqa: E731
    return CollectiveBytes(split(counted, "operand"), split(unknown, "operand"), loops, split(counted, "wire"),
                           split(unknown, "wire"))
