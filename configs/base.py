"""The base training configuration: every field the trainer reads, with its default and meaning.

Variants (`demo_cpu.py`, `dig_qwen3vl.py`) import `get_config` from here and override only what
differs. Any field can be overridden on the command line: `--config.grpo.group_size=8`.
`dig_jax.config_validation.validate` checks the result before anything compiles.
"""
import ml_collections


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0
    for section in (_model, _data, _mesh, _optim, _sft,
                    _grpo, _reward, _curriculum, _checkpoint_log_eval):
        section(c)
    return c


def _model(c):
    # ---- model --------------------------------------------------------------------------------------
    c.model = ml_collections.ConfigDict()
    c.model.preset = "qwen3_vl_tiny"  # a name in dig_jax.models.config.PRESETS
    c.model.init_checkpoint = ""  # HF safetensors directory; empty = random init (tiny models only)
    c.model.tokenizer_path = ""  # tokenizer.json; empty = the project's tiny tokenizer, built in the workdir
    # Tiny tokenizer only: number the special tokens right after its 1k BPE tokens (not at 151643+) and
    # shrink the model's vocabulary to match, so a CPU model's output layer is 1.2k wide, not 152k.
    c.model.compact_tokenizer = False
    c.model.param_dtype = "float32"  # float32 | bfloat16
    c.model.dtype = "float32"  # computation dtype: float32 | bfloat16
    # Rematerialisation of each scanned decoder layer / ViT block: "none" | "full" | "dots" (see
    # dig_jax.models.layers). "full" keeps only each layer's input for the backward pass and recomputes
    # the rest (about one extra forward): activation memory, not compute, is what limits the paper's
    # 4B/8B runs (qwen3_vl_4b forward+backward, one row of two 448 px images per v5p chip: 23.8 GiB of
    # temporaries per chip with "none", 6.2 with "dots", 3.3 with "full"), and on the tiny CPU model
    # it cost no measurable step time.
    c.model.remat = "full"
    # Attention kernel of both towers for whole sequences (training, scoring): "auto" = Pallas splash on
    # TPU, cuDNN on GPU, dense XLA on CPU (by the platform the step compiles for); or force "dense" |
    # "splash" | "cudnn". Splash never writes the float32 score matrix to HBM (dig_jax.models.attention).
    c.model.attention = "auto"
    # Random init only, Qwen3-VL only: "normal" = HF's N(0, 0.02) for the ViT's learned position table;
    # "sincos" = a 2-D sinusoidal start (a from-scratch model then sees absolute positions at once; see
    # dig_jax.models.vision.sincos_position_table). Ignored when loading init_checkpoint.
    c.model.vision_position_init = "normal"
    c.model.freeze_vision = False  # train only the decoder (and merger, see below)
    # Field overrides of the preset, e.g. {"text": {"num_hidden_layers": 4}}: small variants for tests/demos.
    c.model.overrides = ml_collections.ConfigDict({"text": {}, "vision": {}})


def _data(c):
    # ---- data ---------------------------------------------------------------------------------------
    c.data = ml_collections.ConfigDict()
    c.data.train_files = ""  # glob of ArrayRecord shards made by data_pipeline.generate
    c.data.eval_files = ""
    c.data.prompt = ("The two pictures show the same scene with some differences. Find every difference "
                     "and output its bounding box as JSON.")
    c.data.add_vision_id = True  # "Picture 1:" / "Picture 2:" before each image
    # The checkpoint's chat template: "instruct" (Qwen2.5-VL / Qwen3-VL Instruct) or "thinking" (Qwen3-VL
    # Thinking: the prompt opens a <think> block, answers are read after </think>, and supervised targets
    # close an empty block). It must match the checkpoint: the preset does not decide it.
    c.data.chat_template = "instruct"
    # Thinking template only: tokens of reasoning that grpo/eval.max_new_tokens must leave room for besides
    # the closing </think> and an answer of max_boxes boxes (checked at start-up). 0 with "instruct".
    c.data.reasoning_budget = 0
    c.data.label = "kind"  # answer label per box: "kind" (the difference kind) or a fixed string
    c.data.max_boxes = 8
    c.data.min_pixels = 0  # 0 = the family's processor default
    c.data.max_pixels = 0
    c.data.num_threads = 2
    c.data.on_corrupt = "error"  # error | skip
    c.data.prompt_bucket = 64  # prompt lengths are padded up to a multiple of this
    # grpo/eval.max_new_tokens must hold an answer of max_boxes boxes (checked at start-up); True lets
    # them be shorter, for smoke tests that decode a few tokens from a random model.
    c.data.allow_truncated_answers = False


def _mesh(c):
    # ---- mesh ---------------------------------------------------------------------------------------
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all remaining devices
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.num_devices = 0  # 0: every device; N: the first N (e.g. a single-device reference run)


def _optim(c):
    # ---- optimisation -------------------------------------------------------------------------------
    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-6
    c.optim.warmup_steps = 10
    c.optim.end_lr_fraction = 0.1  # cosine decay to this fraction of the peak
    c.optim.weight_decay = 0.01
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.grad_clip_norm = 1.0
    c.optim.grad_accum_steps = 1


def _sft(c):
    # ---- supervised warm-up -------------------------------------------------------------------------
    c.sft = ml_collections.ConfigDict()
    c.sft.steps = 0
    c.sft.batch_size = 8
    c.sft.learning_rate = 1e-5
    c.sft.num_differences = (1, 2, 3)  # which pairs the warm-up reads


def _grpo(c):
    # ---- GRPO ---------------------------------------------------------------------------------------
    c.grpo = ml_collections.ConfigDict()
    c.grpo.steps = 0  # rollout iterations (each: sample, score, update)
    c.grpo.prompts_per_batch = 8  # prompts per rollout batch (global)
    c.grpo.group_size = 8  # samples per prompt (G)
    c.grpo.max_new_tokens = 512
    c.grpo.temperature = 1.0
    c.grpo.top_p = 1.0
    c.grpo.top_k = 0  # 0 = off
    c.grpo.eps_low = 0.2
    c.grpo.eps_high = 0.28
    c.grpo.kl_coef = 0.01  # 0 drops the reference model
    # Storage dtype of the frozen KL reference's parameters. "bfloat16" halves its HBM (it is only read,
    # in the forward of `reference_logprobs`, whose matmuls already run in model.dtype); "float32" keeps
    # an exact copy of the policy as GRPO starts.
    c.grpo.reference_dtype = "float32"
    # None: GRPO continues the run's key and data order (from `seed`). An int folds into the key GRPO
    # starts from and reseeds its data stream, so GRPO runs resumed from one warm-up checkpoint are
    # independent seeds of the GRPO stage (`seed` alone cannot do that: the key comes from the checkpoint).
    c.grpo.seed = ml_collections.config_dict.placeholder(int)
    c.grpo.num_minibatches = 1  # policy updates per rollout batch
    c.grpo.scale_by_std = True  # advantages divided by the group std; False = Dr. GRPO (mean baseline only)
    # Completion positions whose full-vocabulary logits are computed at a time when scoring answers (SFT
    # loss, GRPO update, reference log-probs): float32[rows, scoring_chunk, V] at once. Each position's
    # log-softmax is independent of the others, so this trades memory for loop steps only.
    c.grpo.scoring_chunk = 64
    # The smallest response-length bucket. The reference scoring and the update run over the longest
    # answer of the rollout rounded up to a bucket (powers of two from this one, then max_new_tokens),
    # not over all max_new_tokens positions; each bucket compiles once. 0 = always max_new_tokens.
    c.grpo.response_bucket = 64
    # Where the rollout decodes (`dig_jax.generate.sampling_layout`): "auto" (tensor-parallel within a
    # host, data-parallel across hosts; the training mesh on one device), "training" (decode on the FSDP
    # training mesh, which gathers every weight for every token) or "tensor=N". The policy is copied
    # into the sampling layout once per iteration.
    c.grpo.sampling_mesh = "auto"


def _reward(c):
    # ---- reward -------------------------------------------------------------------------------------
    c.reward = ml_collections.ConfigDict()
    c.reward.fn = "dig"  # the reward function, by name (dig_jax.rl.rewards.REWARD_FNS)
    c.reward.alpha = 0.1  # weight of the format reward
    c.reward.lambda1 = 0.5  # F1
    c.reward.lambda2 = 0.5  # mean IoU of matches
    # Ours, not the paper's (0 = off): + count_weight when a well-formatted answer has as many boxes as
    # there are differences (dig_jax/rl/rewards.py says why).
    c.reward.count_weight = 0.0
    # Ours, not the paper's (0 = off): - extra_box_penalty per box beyond the number of differences in a
    # well-formatted answer, pricing over-counting like under-counting (dig_jax/rl/rewards.py says why).
    c.reward.extra_box_penalty = 0.0
    c.reward.iou_threshold = 0.5


def _curriculum(c):
    # ---- curriculum (GRPO phases) -------------------------------------------------------------------
    # A phase ends after max_steps GRPO iterations, or earlier once the moving average of the batch-mean
    # reward over `window` iterations reaches reward_threshold (not before min_steps). reward_threshold
    # None = no early end: the phase runs its max_steps. The last phase runs until grpo.steps.
    c.curriculum = ml_collections.ConfigDict()
    c.curriculum.phases = [
        {"name": "one", "selection": [[[1], 1.0]], "max_steps": 100, "reward_threshold": None, "window": 10,
         "min_steps": 0},
        {"name": "mixed", "selection": [[[1], 0.34], [[2], 0.33], [[3], 0.33]], "max_steps": 100,
         "reward_threshold": None, "window": 10, "min_steps": 0},
    ]


def _checkpoint_log_eval(c):
    # ---- checkpoints, logging, evaluation -----------------------------------------------------------
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 100
    c.checkpoint.keep = 3
    c.checkpoint.use_async = True

    c.log = ml_collections.ConfigDict()
    c.log.every = 10
    # jax.transfer_guard level around the jitted steps: "disallow" turns any implicit host <-> device
    # transfer inside them into an error (the tests run so); "log" prints them.
    c.log.transfer_guard = "allow"

    c.eval = ml_collections.ConfigDict()
    c.eval.num_pairs = 64
    c.eval.batch_size = 16
    c.eval.max_new_tokens = 512
    c.eval.num_visualise = 8
    c.eval.checkpoint_step = -1  # -1: the newest
    c.eval.every = 0  # during training, run the evaluators every N steps (0 = only in --mode=eval)
    c.eval.evaluators = ("dig",)  # by name (dig_jax.eval.registry.EVALUATORS): dig, rec, perception
    # "rec": referring expressions (RefCOCO / RefCOCO+ / RefCOCOg) from a tensorflow-datasets data_dir made
    # by `python -m dig_jax.eval.prepare_refcoco` (or a catalogue ref_coco dataset stored as ArrayRecord).
    c.eval.rec = ml_collections.ConfigDict()
    c.eval.rec.data_dir = ""
    c.eval.rec.splits = ("refcoco_unc/val", "refcoco_unc/testA", "refcoco_unc/testB", "refcocoplus_unc/val",
                         "refcocoplus_unc/testA", "refcocoplus_unc/testB", "refcocog_umd/val", "refcocog_umd/test")
    c.eval.rec.prompt = ""  # "" = the family's published grounding prompt; else a template with {expr}
    c.eval.rec.image_size = 640  # the square letterbox canvas (COCO images keep their pixels at 640)
    c.eval.rec.max_text_tokens = 96  # the longest prompt text (prompt + expression) in tokens
    c.eval.rec.max_new_tokens = 128
    c.eval.rec.max_examples = 0  # sentences per split (0 = all)
    # "perception": question-answering benchmarks from JSONL files, each "kind:path" with kind yesno
    # (POPE-style), mcq (multiple choice) or mmvp (multiple choice scored also by pairs); see
    # dig_jax/eval/perception.py for the record fields.
    c.eval.perception = ml_collections.ConfigDict()
    c.eval.perception.benchmarks = ()
    c.eval.perception.image_size = 448  # the square letterbox canvas
    c.eval.perception.max_text_tokens = 256
    c.eval.perception.max_new_tokens = 32
    c.eval.perception.max_examples = 0  # questions per benchmark (0 = all)
