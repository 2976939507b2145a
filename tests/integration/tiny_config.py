"""The trainer tests' run config: configs/demo_cpu.py shrunk until a whole SFT + GRPO run takes seconds.

    python -m dig_jax.main --config=tests/integration/tiny_config.py:'/tmp/data/*.array_record' --workdir=...

The config argument is the glob of the training shards (the tests render them once per session).
What shrinks: a 2-layer text decoder (hidden 64), a 2-block vision tower (hidden 32), 64 px images
(2x2 merged tokens each), batches of 4 prompts on a data=2 x fsdp=2 x tensor=2 mesh, a few steps, and
synchronous checkpoints every step (so the set of checkpoint files is deterministic when a test looks).
The curriculum has two phases of one step-limited phase each reading a different difference count, so a
test can see both the phase change and the data selection change.
"""
from configs import demo_cpu

RESOLUTION = 64


def get_config(arg: str | None = None):
    c = demo_cpu.get_config()
    c.model.overrides = {
        "vision": {"depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "out_hidden_size": 64,
                   "deepstack_visual_indexes": (0,)},
        "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "head_dim": 16, "mrope_section": (4, 2, 2)},
    }
    c.data.train_files = arg or ""
    c.data.min_pixels = RESOLUTION * RESOLUTION
    c.data.max_pixels = RESOLUTION * RESOLUTION
    c.data.max_boxes = 2
    c.data.allow_truncated_answers = True  # a random model: a few decoded tokens are enough
    c.data.num_threads = 1
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2  # every axis sharded over the 8 fake devices
    c.sft.steps = 2
    c.sft.batch_size = 4
    c.sft.num_differences = (1, 2)
    c.optim.warmup_steps = 1
    c.grpo.steps = 2
    c.grpo.prompts_per_batch = 4
    c.grpo.group_size = 2
    c.grpo.max_new_tokens = 12
    c.curriculum.phases = [
        {"name": "one", "selection": [[[1], 1.0]], "max_steps": 1, "reward_threshold": None, "window": 1,
         "min_steps": 0},
        {"name": "two", "selection": [[[2], 1.0]], "max_steps": None, "reward_threshold": None, "window": 1,
         "min_steps": 0},
    ]
    c.checkpoint.every = 1
    c.checkpoint.keep = 100
    c.checkpoint.use_async = False
    c.log.every = 1
    c.log.transfer_guard = "disallow"  # no implicit host <-> device transfer inside a jitted step
    c.eval.num_pairs = 4
    c.eval.batch_size = 4
    c.eval.max_new_tokens = 12
    c.eval.num_visualise = 2
    return c
