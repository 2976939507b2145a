"""The Qwen2 byte-level BPE tokenizer: loading a real one, and building a tiny one with the real token ids.

Both families share the Qwen2 tokenizer: byte-level BPE behind a regex pre-tokenizer that isolates every
digit (so "1234" is four tokens), NFC normalisation, and added tokens from id 151643 on. Real
checkpoints' `tokenizer.json` is read from a path the user gives; nothing is downloaded.

The tiny tokenizer (for the tiny model presets and the tests) is built by this project: a small BPE is
trained on an embedded corpus of the text the DiG task produces (prompts, chat scaffolding, JSON box
answers), then laid out so that every id that matters has its real value:

  [0, n_bpe)            the trained byte-level BPE vocabulary (256 byte symbols first, then merges);
  [n_bpe, 151643)       filler entries `<|unused_N|>` that no merge can produce, so they are never emitted;
                        they exist only to push the added tokens to their real ids;
  151643 ... 151656     the special tokens of `SPECIAL_TOKENS` (same ids as Qwen2.5-VL / Qwen3-VL);
  151657 ...            the family's non-special added tokens (`<tool_call>`, `<think>`, ...).

Command line: `python -m dig_jax.processing --out DIR [--family qwen3_vl|qwen2_5_vl]
[--chat-template instruct|thinking]`.

Words in `PINNED_IDS` ("assistant" -> 77091, which Qwen's fine-tuning code uses to find answer spans) are
moved from their trained id to the real one, and a filler takes their old place. The model's embedding
table (151936 rows) is larger than the tokenizer, exactly as for the real checkpoints.
"""
from __future__ import annotations

import json
import os
import random

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from dig_jax.processing.template import jinja_template

# The released Qwen2 tokenizer's ids (tokenizer_config.json, shared by both families; <|im_end|> is the
# EOS); `special=True` tokens are skipped when decoding answers.
SPECIAL_TOKENS: dict[str, int] = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}
# Added but not special in the released tokenizer_config.json files (decoded like ordinary text).
_QWEN2_5_ADDED: dict[str, int] = {
    "<tool_call>": 151657, "</tool_call>": 151658, "<|fim_prefix|>": 151659, "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661, "<|fim_pad|>": 151662, "<|repo_name|>": 151663, "<|file_sep|>": 151664,
}
NON_SPECIAL_ADDED_TOKENS: dict[str, dict[str, int]] = {
    "qwen2_5_vl": _QWEN2_5_ADDED,
    "qwen3_vl": {**_QWEN2_5_ADDED, "<tool_response>": 151665, "</tool_response>": 151666,
                 "<think>": 151667, "</think>": 151668},
}
FIRST_ADDED_ID = 151643
PINNED_IDS: dict[str, int] = {"assistant": 77091}

# The Qwen2 pre-tokenizer split: contractions, letter runs with one leading non-letter, single digits,
# punctuation runs, newlines, whitespace.
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _empty_qwen2_tokenizer(model: models.Model) -> tokenizers.Tokenizer:
    """A tokenizer with the Qwen2 normaliser, pre-tokeniser, decoder and post-processor around `model`."""
    tok = tokenizers.Tokenizer(model)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def tiny_corpus(seed: int = 0, num_answers: int = 400) -> list[str]:
    """Deterministic training text for the tiny BPE: chat scaffolding, DiG prompts and JSON box answers."""
    rng = random.Random(seed)
    kinds = ["add", "remove", "color", "material", "size", "shape", "move", "rotate"]
    labels = kinds + ["added object", "removed object", "color change", "material change", "moved object",
                      "red cube", "blue sphere", "green cylinder", "yellow cone", "metal", "rubber", "wood"]
    lines = [
        "system\nYou are a helpful assistant.",
        "user\nassistant\nsystem\nuser\nassistant\n",
        "Picture 1: Picture 2: ",
        "The two images are nearly identical. Find every difference between Picture 1 and Picture 2.",
        "Compare the two images and find all the differences. Output the bounding box of each difference "
        "in Picture 2 in JSON format, with the key bbox_2d and a short label.",
        "Locate every region where the second image differs from the first image.",
        "Output the bounding box of the object described by the referring expression in JSON format.",
        "Please output bbox coordinates and names of every item in this image in JSON format.",
        "There are no differences between the two images.",
        "the left, the right, the top, the bottom, the center, in front of, behind, next to, on the table",
        "```json\n[]\n```",
    ]
    for _ in range(num_answers):
        boxes = []
        for _ in range(rng.randint(0, 4)):
            x1, y1 = rng.randint(0, 980), rng.randint(0, 980)
            x2, y2 = rng.randint(x1 + 1, 1000), rng.randint(y1 + 1, 1000)
            boxes.append({"bbox_2d": [x1, y1, x2, y2], "label": rng.choice(labels)})
        answer = json.dumps(boxes)
        lines.append(f"```json\n{answer}\n```" if rng.random() < 0.5 else answer)
        lines.append(json.dumps(boxes, indent=2))
    return lines


def _train_bpe(corpus: list[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE with the Qwen2 pre-tokeniser; returns (vocab, merges)."""
    tok = _empty_qwen2_tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def build_tiny_tokenizer(path: str, family: str = "qwen3_vl", bpe_vocab_size: int = 1024,
                         seed: int = 0, compact: bool = False, chat_template: str = "instruct") -> str:
    """Build the tiny Qwen2-style tokenizer and write `tokenizer.json` (plus HF side files) under `path`.

    `path` is a directory (created if needed). Also writes `tokenizer_config.json` and the family's
    `chat_template.jinja` (of style `chat_template`: "instruct" or, Qwen3-VL only, "thinking") so that HF's
    `AutoTokenizer.from_pretrained(path)` loads the same tokenizer and template (used by the parity tests;
    our own code reads only tokenizer.json). The template only decides that side file: Qwen3-VL's
    `<think>` / `</think>` are added tokens at their real ids whichever style is written.
    Returns the path of `tokenizer.json`. Deterministic: the same arguments give the same file.

    `compact=True` keeps the same tokens (special tokens included, same strings) but numbers the added
    tokens right after the trained BPE vocabulary instead of at their real ids: a CPU demo model then
    needs an output layer of ~1.1k rows instead of 152k (the lm_head dominates a tiny model's cost).
    Such a tokenizer loads with `load_tokenizer(path, require_real_ids=False)`, and the model's special
    ids come from `special_token_ids(tokenizer)`.
    """
    if family not in NON_SPECIAL_ADDED_TOKENS:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(NON_SPECIAL_ADDED_TOKENS)}")
    template = jinja_template(family, chat_template)
    vocab, merges = _train_bpe(tiny_corpus(seed), bpe_vocab_size)
    n_bpe = len(vocab)
    if compact:
        return _write_compact(path, family, vocab, merges, template)
    if n_bpe > min(PINNED_IDS.values()):
        raise ValueError(f"bpe_vocab_size={bpe_vocab_size} leaves no room below the pinned ids {PINNED_IDS}")
    by_id = {i: t for t, i in vocab.items()}
    for word, real_id in PINNED_IDS.items():
        if word not in vocab:
            raise ValueError(f"the tiny corpus did not make {word!r} a single BPE token; add it to tiny_corpus()")
        by_id[vocab[word]] = f"<|unused_{vocab[word]}|>"
        by_id[real_id] = word
    full_vocab = {by_id.get(i, f"<|unused_{i}|>"): i for i in range(FIRST_ADDED_ID)}
    assert len(full_vocab) == FIRST_ADDED_ID, "filler names collided with trained tokens"

    tok = _empty_qwen2_tokenizer(models.BPE(vocab=full_vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    added = [(t, i, True) for t, i in SPECIAL_TOKENS.items()]
    added += [(t, i, False) for t, i in NON_SPECIAL_ADDED_TOKENS[family].items()]
    for token, expected_id, special in sorted(added, key=lambda a: a[1]):
        tok.add_tokens([tokenizers.AddedToken(token, special=special, normalized=False)])
        if tok.token_to_id(token) != expected_id:
            raise AssertionError(f"{token} got id {tok.token_to_id(token)}, expected {expected_id}")

    os.makedirs(path, exist_ok=True)
    tokenizer_file = os.path.join(path, "tokenizer.json")
    tok.save(tokenizer_file)
    added_decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                              "single_word": False, "special": s} for t, i, s in added}
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 131072,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "bos_token": None,
        "errors": "replace",
        "split_special_tokens": False,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_decoder,
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(path, "chat_template.jinja"), "w") as f:
        f.write(template)
    return tokenizer_file


def _write_compact(path: str, family: str, vocab: dict[str, int], merges, template: str) -> str:
    tok = _empty_qwen2_tokenizer(models.BPE(vocab=dict(vocab), merges=merges, fuse_unk=False, byte_fallback=False))
    added = [(t, True) for t in SPECIAL_TOKENS] + [(t, False) for t in NON_SPECIAL_ADDED_TOKENS[family]]
    for token, special in added:
        tok.add_tokens([tokenizers.AddedToken(token, special=special, normalized=False)])
    os.makedirs(path, exist_ok=True)
    tokenizer_file = os.path.join(path, "tokenizer.json")
    tok.save(tokenizer_file)
    with open(os.path.join(path, "chat_template.jinja"), "w") as f:
        f.write(template)
    return tokenizer_file


def special_token_ids(tok: tokenizers.Tokenizer) -> dict[str, int]:
    """The ids the model needs, read from the tokenizer (real Qwen ids, or a compact tokenizer's)."""
    ids = {name: tok.token_to_id(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
        ("eos_token_id", "<|im_end|>"), ("pad_token_id", "<|endoftext|>"))}
    missing = [name for name, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"tokenizer lacks the special tokens for {missing}")
    return ids


def load_tokenizer(path: str, require_real_ids: bool = True) -> tokenizers.Tokenizer:
    """Load `tokenizer.json` (a file, or a directory holding one) and check the Qwen special-token ids.

    A tokenizer whose special tokens sit at other ids would silently feed the model the wrong embeddings
    for the chat scaffolding and image placeholders, so a mismatch is an error naming the token.
    """
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise FileNotFoundError(f"no tokenizer.json at {path!r}; build the tiny one with "
                                "dig_jax.processing.build_tiny_tokenizer(dir) or point at a checkpoint directory")
    tok = tokenizers.Tokenizer.from_file(file)
    if not require_real_ids:
        special_token_ids(tok)  # present, wherever they are
        return tok
    for token, expected in SPECIAL_TOKENS.items():
        got = tok.token_to_id(token)
        if got != expected:
            raise ValueError(f"{file}: special token {token} has id {got}, expected {expected} (Qwen2 tokenizer)")
    return tok

