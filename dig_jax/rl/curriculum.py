"""Curriculum phases: which difference counts to train on, and when to move to the next phase.

Why: with many differences per pair the DiG reward is sparse and GRPO is unstable, so training starts
on pairs with one difference and widens the mix phase by phase (the DiG paper's curriculum: the number of
differences grows from one to several across training phases).

A phase ends after `max_steps` steps, or earlier once the moving average of the batch-mean reward over
the last `window` steps reaches `reward_threshold` (only after `min_steps` steps and with a full
window, so that a few lucky batches do not end it). `reward_threshold` None (the default) means no
early end: the phase runs exactly `max_steps` steps whatever the rewards. A threshold is inclusive, so
one at or below the smallest possible reward (0 for the DiG reward) ends the phase at its first full
window; `config_validation` refuses that for the DiG reward. The last phase never ends.

The state is a small frozen dataclass; `to_dict` gives plain ints / floats / lists (a JSON document
and a pytree), which the checkpoint stores beside the parameters and `from_dict` restores.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

_PHASE_KEYS = ("name", "selection", "max_steps", "reward_threshold", "window", "min_steps")


@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase.

    Attributes:
      name: unique label used in logs.
      selection: ((allowed num_differences, weight), ...): a mixture over sources of pairs; each entry
        draws pairs whose number of differences is in `allowed`, with relative weight `weight`.
        In a config an entry may be a pair `[[1, 2], 0.5]`, a bare count `[1, 0.5]`, or a mapping
        `{"num_differences": [1, 2], "weight": 0.5}`.
      max_steps: steps after which the phase ends (None: only the reward threshold ends it).
      reward_threshold: end early when the moving-average reward reaches this (None: never early, the
        phase runs its max_steps).
      window: number of steps in the moving average.
      min_steps: no early end before this many steps in the phase.
    """
    name: str
    selection: tuple[tuple[tuple[int, ...], float], ...]
    max_steps: int | None
    reward_threshold: float | None = None
    window: int = 20
    min_steps: int = 0

    def mixture(self) -> tuple[tuple[tuple[int, ...], float], ...]:
        """The selection with weights normalised to sum to 1 (what a data mixer consumes)."""
        total = sum(w for _, w in self.selection)
        return tuple((allowed, w / total) for allowed, w in self.selection)


def _as_mapping(value: Any, where: str) -> Mapping:
    if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
        value = value.to_dict()
    if isinstance(value, Phase):
        value = dataclasses.asdict(value)
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a mapping with keys {_PHASE_KEYS}, got {type(value).__name__}")
    return value


def _int(value: Any, where: str, minimum: int) -> int:
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy / jax scalar from a restore
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{where} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _parse_phase(raw: Any, where: str) -> Phase:
    cfg = _as_mapping(raw, where)
    unknown = sorted(set(cfg) - set(_PHASE_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; allowed: {_PHASE_KEYS}")
    for key in ("name", "selection", "max_steps"):
        if key not in cfg:
            raise ValueError(f"{where}.{key} is required")
    name = cfg["name"]
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}.name must be a non-empty string, got {name!r}")
    selection_raw = cfg["selection"]
    if isinstance(selection_raw, (str, bytes)) or not isinstance(selection_raw, Sequence) \
        or not selection_raw:
        raise ValueError(f"{where}.selection must be a non-empty list of (num_differences, weight) pairs, "
                         f"got {selection_raw!r}")
    selection = []
    for j, entry in enumerate(selection_raw):
        at = f"{where}.selection[{j}]"
        if isinstance(entry, Mapping):
            entry = (entry.get("num_differences"), entry.get("weight"))
        if not isinstance(entry, Sequence) or len(entry) != 2:
            raise ValueError(f"{at} must be a pair (allowed num_differences, weight), got {entry!r}")
        allowed, weight = entry
        if isinstance(allowed, int) and not isinstance(allowed, bool):
            allowed = (allowed,)
        if not isinstance(allowed, Sequence) or not allowed:
            raise ValueError(f"{at}: allowed num_differences must be a non-empty tuple of ints, "
                             f"got {allowed!r}")
        allowed = tuple(_int(k, f"{at} num_differences", 0) for k in allowed)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
            or not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"{at}: weight must be a finite number > 0, got {weight!r}")
        selection.append((allowed, float(weight)))
    max_steps = cfg["max_steps"]
    if max_steps is not None:
        max_steps = _int(max_steps, f"{where}.max_steps", 1)
    threshold = cfg.get("reward_threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not math.isfinite(threshold)):
        raise ValueError(f"{where}.reward_threshold must be a finite number or None, got {threshold!r}")
    window = _int(cfg.get("window", 20), f"{where}.window", 1)
    min_steps = _int(cfg.get("min_steps", 0), f"{where}.min_steps", 0)
    if max_steps is not None and min_steps > max_steps:
        raise ValueError(f"{where}.min_steps ({min_steps}) exceeds max_steps ({max_steps})")
    return Phase(name, tuple(selection), max_steps,
                 None if threshold is None else float(threshold), window, min_steps)


@dataclasses.dataclass(frozen=True)
class CurriculumState:
    """Where training is: phase index, steps taken in it, and the recent batch-mean rewards."""
    phase_index: int = 0
    steps_in_phase: int = 0
    recent_rewards: tuple[float, ...] = ()

    def to_dict(self) -> dict:
        """Plain ints / floats / lists: a JSON document and a pytree."""
        return {"phase_index": self.phase_index, "steps_in_phase": self.steps_in_phase,
                "recent_rewards": list(self.recent_rewards)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


class Curriculum:
    """An ordered list of phases and the transition rule. Build with `Curriculum(phases)`.

    `phases` is a sequence of `Phase`s or mappings (dicts / ConfigDicts) with the `Phase` fields; errors
    name the offending field as `curriculum.phases[i].field`.
    """

    def __init__(self, phases: Sequence[Any], where: str = "curriculum.phases"):
        if isinstance(phases, (str, bytes, Mapping)) or not isinstance(phases, Sequence) or not phases:
            raise ValueError(f"{where} must be a non-empty list of phases, got {phases!r}")
        self.phases: tuple[Phase, ...] = tuple(_parse_phase(p, f"{where}[{i}]") for i, p in enumerate(phases))
        names = [p.name for p in self.phases]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"{where}[{i}].name {name!r} is used by an earlier phase")
        for i, p in enumerate(self.phases[:-1]):
            if p.max_steps is None and p.reward_threshold is None:
                raise ValueError(f"{where}[{i}] ({p.name!r}) would never end: "
                                 "set max_steps or reward_threshold")

    def initial_state(self) -> CurriculumState:
        return CurriculumState()

    def phase(self, state: CurriculumState) -> Phase:
        return self.phases[state.phase_index]

    def update(self, state: CurriculumState, reward_mean: float) -> tuple[CurriculumState, bool]:
        """Record one training step's batch-mean reward; returns (new state, whether the phase changed)."""
        reward = float(reward_mean)
        if not math.isfinite(reward):
            raise ValueError(f"Curriculum.update: reward_mean must be finite, got {reward_mean!r} "
                             f"(phase {self.phase(state).name!r}, step {state.steps_in_phase})")
        phase = self.phase(state)
        steps = state.steps_in_phase + 1
        recent = (state.recent_rewards + (reward,))[-phase.window:]
        is_last = state.phase_index == len(self.phases) - 1
        by_steps = phase.max_steps is not None and steps >= phase.max_steps
        by_reward = (phase.reward_threshold is not None and steps >= phase.min_steps
                     and len(recent) == phase.window
                     and sum(recent) / phase.window >= phase.reward_threshold)
        if not is_last and (by_steps or by_reward):
            return CurriculumState(state.phase_index + 1, 0, ()), True
        return CurriculumState(state.phase_index, steps, recent), False

    def state_from_dict(self, data: Mapping) -> CurriculumState:
        """Inverse of `CurriculumState.to_dict`, checked against this curriculum."""
        try:
            index = _int(data["phase_index"], "curriculum state phase_index", 0)
            steps = _int(data["steps_in_phase"], "curriculum state steps_in_phase", 0)
            recent = tuple(float(r) for r in list(data["recent_rewards"]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"curriculum state: malformed {dict(data)!r} ({e})") from None
        if index >= len(self.phases):
            raise ValueError(f"curriculum state phase_index {index} but the curriculum has "
                             f"{len(self.phases)} phases")
        if len(recent) > self.phases[index].window:
            raise ValueError(f"curriculum state has {len(recent)} recent rewards, more than phase "
                             f"{self.phases[index].name!r} window {self.phases[index].window}")
        return CurriculumState(index, steps, recent)

    def state_from_json(self, text: str) -> CurriculumState:
        return self.state_from_dict(json.loads(text))
