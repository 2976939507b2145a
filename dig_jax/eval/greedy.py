"""Greedy answers to a global batch of prompts: what every evaluator asks the model.

Shared by the evaluators so that they all decode the same way: temperature 0, stop at <|im_end|>, a fixed
key (greedy decoding does not read it), answers decoded without special tokens.
"""
from __future__ import annotations

import jax

from dig_jax import multihost
from dig_jax.generate import sampler
from dig_jax.generate.batch import prompt_batch
from dig_jax.models.config import ModelConfig
from dig_jax.rl.grpo import decode_texts


class GreedyAnswers:
    """`answer(model, batch)`: one decoded text per row of the global `batch` (prompt_ids, prompt_mask,
    pixel_values [B, N, pd], image_grid_thw [B, n_images, 3]), padding rows included."""

    def __init__(self, model_cfg: ModelConfig, tokenizer, *, max_new_tokens: int, prompt_bucket: int, mesh=None):
        self.model_cfg, self.tokenizer, self.prompt_bucket, self.mesh = model_cfg, tokenizer, prompt_bucket, mesh
        self.sampling = sampler.SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0,
                                               eos_token_ids=(model_cfg.eos_token_id,),
                                               pad_token_id=model_cfg.pad_token_id)

    def answer(self, model, batch: dict) -> list[str]:
        prompts = prompt_batch(self.model_cfg, batch, mesh=self.mesh, prompt_bucket=self.prompt_bucket)
        gen = sampler.generate(model, prompts, jax.random.key(0), self.sampling)
        tokens, mask = multihost.to_host(gen.tokens), multihost.to_host(gen.completion_mask)  # int[B, T] each
        return decode_texts(self.tokenizer, tokens, mask)
