"""The paper's setting: GRPO with the hybrid F1 + IoU reward on rendered DiG pairs, curriculum from one
difference to many, on Qwen3-VL 4B / 8B (or Qwen2.5-VL 3B / 7B) on a TPU slice.

    python -m dig_jax.main --config=configs/dig_qwen3vl.py:4b --workdir=gs://BUCKET/runs/dig4b \
        --config.model.init_checkpoint=/ckpt/Qwen3-VL-4B-Instruct \
        --config.data.train_files='/data/dig/train/*.array_record' \
        --config.data.eval_files='/data/dig/eval/*.array_record'

`arg` picks the model: "4b" (default), "8b", "4b_thinking", "8b_thinking", "qwen2_5_vl_3b", "qwen2_5_vl_7b".

"4b_thinking" / "8b_thinking" are the checkpoints the paper trained (Qwen3-VL-4B/8B-Thinking, as a public
note on the paper reports), with `--config.model.init_checkpoint=/ckpt/Qwen3-VL-4B-Thinking`. They differ
from "4b" / "8b" only where the Thinking checkpoints need it (`_thinking` below): the same architecture,
but the Thinking chat template (the prompt opens a `<think>` block; the reward reads the answer after
`</think>`) and generation caps that hold the reasoning before the answer.

What comes from the paper (DiG: Differential Grounding, arXiv 2512.12633; the reward's details and the
data size as third-party summaries of it report them): Qwen3-VL 4B/8B, GRPO with a KL term to the
initial model, reward r = (1 - alpha) (lambda1 F1 + lambda2 IoU) + alpha r_format with Hungarian
matching on L1 + GIoU, a curriculum whose number of differences grows across phases, about 4.8K training
pairs (1.6K with one difference, 1.6K with two, 1.6K mixed). Everything else is our choice, taken from
what open RL stacks (EasyR1, VLM-R1, Tunix, MaxText) use: group size 8, clip epsilons 0.2 / 0.28, KL
coefficient 0.01 (k3), learning rate 1e-6 with warm-up, temperature 1.0, 448 px renders, no supervised
warm-up (the released models already answer in the grounding JSON format), alpha 0.1 and
lambda1 = lambda2 = 0.5.
"""
from configs import base

_MODELS = {
    "4b": "qwen3_vl_4b",
    "8b": "qwen3_vl_8b",
    "4b_thinking": "qwen3_vl_4b_thinking",
    "8b_thinking": "qwen3_vl_8b_thinking",
    "qwen2_5_vl_3b": "qwen2_5_vl_3b",
    "qwen2_5_vl_7b": "qwen2_5_vl_7b",
}


def get_config(arg=None):
    arg = arg or "4b"
    if arg not in _MODELS:
        raise ValueError(f"configs/dig_qwen3vl.py: unknown variant {arg!r}; choose one of {sorted(_MODELS)}")
    c = base.get_config()
    c.model.preset = _MODELS[arg]
    c.model.dtype = "bfloat16"  # computation; the master weights stay base's float32

    # Base keeps: data.label "kind", data.max_boxes 8, the vision tower trained (not frozen).
    c.data.prompt_bucket = 128

    # A v5p-32 slice has 16 chips: FSDP over all of them (a 4B/8B model does not need tensor parallelism,
    # so mesh.tensor stays base's 1).
    c.mesh.data = 1
    c.mesh.fsdp = -1

    # No supervised warm-up (base's sft.steps = 0); the batch size applies if one is switched on.
    c.sft.batch_size = 32
    # Base keeps: group size 8, temperature 1.0, KL coefficient 0.01, and grpo/eval.max_new_tokens 512
    # (8 boxes take up to ~300 tokens; checked at start-up).
    c.grpo.steps = 600
    c.grpo.prompts_per_batch = 32
    c.grpo.num_minibatches = 2
    c.grpo.scoring_chunk = 256
    # The reference is read in bfloat16 (the compute dtype): half the HBM of a float32 copy.
    c.grpo.reference_dtype = "bfloat16"

    # Base keeps: learning rate 1e-6, weight decay 0.01, gradient clipping at 1.0, and the reward weights
    # (alpha 0.1, lambda1 = lambda2 = 0.5, IoU threshold 0.5).
    c.optim.warmup_steps = 20

    c.curriculum.phases = [
        {"name": "one", "selection": [[[1], 1.0]], "max_steps": 200, "reward_threshold": 0.85, "window": 20,
         "min_steps": 50},
        {"name": "two", "selection": [[[2], 1.0]], "max_steps": 200, "reward_threshold": 0.8, "window": 20,
         "min_steps": 50},
        {"name": "mixed", "selection": [[[1], 1.0], [[2], 1.0], [[3, 4, 5], 1.0]], "max_steps": None,
         "reward_threshold": None, "window": 20, "min_steps": 0},
    ]

    c.checkpoint.every = 50
    c.log.every = 1
    c.eval.batch_size = 32
    c.eval.num_pairs = 1000
    if arg.endswith("_thinking"):
        _thinking(c)
    return c


def _thinking(c):
    """What the Thinking checkpoints change, and why.

    The chat template is theirs: the generation prompt opens `<think>\\n`, a completion is reasoning, then
    `</think>\\n\\n` and the JSON answer, and the reward scores only what follows `</think>` (one cut off
    while reasoning has no answer). The caps are 2048 new tokens, EasyR1's default `max_response_length`
    (the framework the paper reportedly used): room for `data.reasoning_budget` = 1536 tokens of reasoning
    before the longest answer (8 boxes with the closing `\\n</think>\\n\\n`: 277 tokens with the tiny
    tokenizer, whose digits cost what the real one's do; Qwen3-VL's 0..1000 coordinates do not grow with
    the resolution), which the start-up check enforces for both caps. 4x the Instruct caps makes a rollout
    up to 4x longer to sample and score; by arithmetic (not a compiler verdict: `--mode=aot` gives that),
    the bf16 KV cache of 32 x 8 sequences of ~2.6k tokens (a 448 px pair's prompt is ~460 tokens) is
    ~97 GB for the 4B model, ~6 GB per chip over 16 chips.
    """
    c.data.chat_template = "thinking"
    c.data.reasoning_budget = 1536
    c.grpo.max_new_tokens = 2048
    c.eval.max_new_tokens = 2048
