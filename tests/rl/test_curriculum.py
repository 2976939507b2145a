"""Curriculum: transitions by steps and by reward, last phase, JSON round trip, config errors."""
import json

import ml_collections
import numpy as np
import pytest

from dig_jax.rl.curriculum import Curriculum, CurriculumState, Phase

PHASES = [
    {"name": "one", "selection": [((1,), 1.0)], "max_steps": 5},
    {"name": "few", "selection": [((2,), 1.0), ((1, 2, 3), 3.0)], "max_steps": 100,
     "reward_threshold": 0.6, "window": 3, "min_steps": 4},
    {"name": "many", "selection": [((3, 4, 5), 1.0)], "max_steps": 2},
]


def _run(cur, rewards, state=None):
    state = state or cur.initial_state()
    log = []
    for r in rewards:
        state, moved = cur.update(state, r)
        log.append((state.phase_index, moved))
    return state, log


def test_transition_by_steps():
    cur = Curriculum(PHASES)
    state, log = _run(cur, [0.0] * 5)
    assert [m for _, m in log] == [False] * 4 + [True]
    assert state == CurriculumState(1, 0, ())
    assert cur.phase(state).name == "few"


def test_transition_by_reward_needs_min_steps_and_full_window():
    cur = Curriculum(PHASES)
    state = CurriculumState(1, 0, ())
    # High rewards from the first step: window full at step 3, but min_steps is 4.
    state, log = _run(cur, [0.9, 0.9, 0.9], state)
    assert [m for _, m in log] == [False, False, False] and state.steps_in_phase == 3
    state_slid, _ = _run(cur, [0.1], CurriculumState(1, 1, (0.2, 0.3, 0.4)))
    assert state_slid.recent_rewards == (0.3, 0.4, 0.1)  # only the last `window` rewards are kept
    state, log = _run(cur, [0.9], state)
    assert log == [(2, True)]
    # The moving average (not the last value) decides: 0.0, 1.0, 0.7 -> 0.567 < 0.6; then 1.0 -> 0.9.
    state, log = _run(cur, [0.0, 0.0, 0.0, 0.0, 1.0, 0.7, 1.0], CurriculumState(1, 0, ()))
    assert [m for _, m in log] == [False] * 6 + [True]


def test_threshold_is_inclusive_and_window_slides():
    cur = Curriculum(PHASES)
    state, log = _run(cur, [1.0, 1.0, 1.0, 0.0, 0.2, 0.6, 1.0], CurriculumState(1, 0, ()))
    # step 4 avg(1,1,0)=0.667 >= 0.6: transition at the 4th update.
    assert [m for _, m in log][:4] == [False, False, False, True]
    state, log = _run(cur, [0.0, 0.0, 0.0, 0.0, 0.6, 0.6, 0.6], CurriculumState(1, 0, ()))
    assert [m for _, m in log] == [False] * 6 + [True]  # exactly 0.6 at step 7


def test_phase_without_threshold_runs_to_max_steps():
    """No reward_threshold: perfect rewards with full windows do not end the phase before max_steps."""
    cur = Curriculum([{"name": "a", "selection": [((1,), 1.0)], "max_steps": 6, "window": 2},
                      {"name": "b", "selection": [((2,), 1.0)], "max_steps": None}])
    assert cur.phases[0].reward_threshold is None
    state, log = _run(cur, [1.0] * 6)
    assert [m for _, m in log] == [False] * 5 + [True]
    assert state == CurriculumState(1, 0, ())


def test_base_config_phases_end_by_steps_only():
    """The base config's phases have no threshold: phase one lasts its max_steps, even at reward 1."""
    from configs import base

    phases = list(base.get_config().curriculum.phases)
    assert all(p["reward_threshold"] is None for p in phases)
    cur = Curriculum(phases)
    max_steps = cur.phases[0].max_steps
    state, log = _run(cur, [1.0] * max_steps)
    assert [m for _, m in log] == [False] * (max_steps - 1) + [True]
    assert state.phase_index == 1


def test_last_phase_continues():
    cur = Curriculum(PHASES)
    state, log = _run(cur, [1.0] * 10, CurriculumState(2, 0, ()))
    assert all(not moved for _, moved in log)
    assert state.phase_index == 2 and state.steps_in_phase == 10
    assert state.recent_rewards == (1.0,) * 10  # default window 20, not yet full


def test_state_round_trips_through_json():
    cur = Curriculum(PHASES)
    state, _ = _run(cur, [0.0] * 5 + [0.25, 0.5])
    text = state.to_json()
    assert json.loads(text) == {"phase_index": 1, "steps_in_phase": 2, "recent_rewards": [0.25, 0.5]}
    restored = cur.state_from_json(text)
    assert restored == state
    # A resumed run continues exactly like an uninterrupted one.
    tail = [0.9, 0.9, 0.9, 0.9]
    assert _run(cur, tail, restored) == _run(cur, tail, state)
    # numpy scalars (as a pytree restore returns them) are accepted.
    np_dict = {"phase_index": np.int64(1), "steps_in_phase": np.array(2),
               "recent_rewards": np.array([0.25, 0.5])}
    assert cur.state_from_dict(np_dict) == state


def test_state_errors():
    cur = Curriculum(PHASES)
    with pytest.raises(ValueError, match="phase_index 3 but the curriculum has 3 phases"):
        cur.state_from_dict({"phase_index": 3, "steps_in_phase": 0, "recent_rewards": []})
    with pytest.raises(ValueError, match="window 3"):
        cur.state_from_dict({"phase_index": 1, "steps_in_phase": 0, "recent_rewards": [0.0] * 4})
    with pytest.raises(ValueError, match="malformed"):
        cur.state_from_dict({"phase_index": 1})
    with pytest.raises(ValueError, match="finite.*'one'"):
        cur.update(cur.initial_state(), float("nan"))


def test_configdict_and_mixture():
    cfg = ml_collections.ConfigDict({"phases": PHASES})
    cur = Curriculum(cfg.phases)
    few = cur.phases[1]
    assert isinstance(few, Phase) and few.selection == (((2,), 1.0), ((1, 2, 3), 3.0))
    assert few.mixture() == (((2,), 0.25), ((1, 2, 3), 0.75))
    bare = Curriculum([{"name": "a", "selection": [(1, 2)], "max_steps": 3}])
    assert bare.phases[0].selection == (((1,), 2.0),)  # a bare int means a one-element tuple


@pytest.mark.parametrize("phases, message", [
    ([], r"curriculum.phases must be a non-empty list"),
    ([{"name": "a", "selection": [((1,), 1.0)]}], r"phases\[0\].max_steps is required"),
    ([{"name": "", "selection": [((1,), 1.0)], "max_steps": 1}], r"phases\[0\].name"),
    ([{"name": "a", "selection": [], "max_steps": 1}], r"phases\[0\].selection must be"),
    ([{"name": "a", "selection": [((1,), 0.0)], "max_steps": 1}], r"phases\[0\].selection\[0\]: weight"),
    ([{"name": "a", "selection": [((), 1.0)], "max_steps": 1}], r"phases\[0\].selection\[0\]: allowed"),
    ([{"name": "a", "selection": [((-1,), 1.0)], "max_steps": 1}], r"selection\[0\] num_differences"),
    ([{"name": "a", "selection": [((1,), 1.0)], "max_steps": 0}], r"phases\[0\].max_steps"),
    ([{"name": "a", "selection": [((1,), 1.0)], "max_steps": 2, "min_steps": 3}], r"min_steps \(3\)"),
    ([{"name": "a", "selection": [((1,), 1.0)], "max_steps": 2, "window": 0}], r"phases\[0\].window"),
    ([{"name": "a", "selection": [((1,), 1.0)], "max_steps": 2, "reward_threshold": "hi"}],
     r"phases\[0\].reward_threshold"),
    ([{"name": "a", "selection": [((1,), 1.0)], "max_steps": 2, "max_step": 3}], r"unknown field.*max_step"),
    ([PHASES[0], dict(PHASES[0])], r"phases\[1\].name 'one' is used"),
    ([{"name": "a", "selection": [((1,), 1.0)], "max_steps": None}, PHASES[0]], r"phases\[0\].*never end"),
])
def test_config_errors_name_the_field(phases, message):
    with pytest.raises(ValueError, match=message):
        Curriculum(phases)
