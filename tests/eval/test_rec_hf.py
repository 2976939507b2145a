"""The REC protocol against Hugging Face transformers: the same prompt through HF's processor and ours
gives the same input ids and pixels, and a tiny HF model's greedy answer and ours, through the whole
evaluator path (prompt, letterbox, generation, parsing, mapping back), give the same box and score.

A random tiny model answers noise, which parses to no box on both sides and would make the comparison
vacuous; so the HF model's output layer is first trained (in torch) to answer this one sentence with a
known box, then the model is saved with `save_pretrained` and loaded by `hf_io`.
"""
from __future__ import annotations

import glob
import importlib.util
import os

import numpy as np
import pytest
import torch

from dig_jax.eval import rec
from dig_jax.eval.greedy import GreedyAnswers
from dig_jax.models import hf_io
from dig_jax.processing import CHAT_TEMPLATES, ImageProcessorConfig, build_tiny_tokenizer, load_tokenizer
from dig_jax.processing.answers import format_answer
from dig_jax.processing.questions import QuestionBuilder, QuestionSpec, decode_image, letterbox
from dig_jax.processing.template import chat_messages

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, Qwen2_5_VLProcessor, Qwen3VLProcessor  # noqa: E402
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_pil  # noqa: E402

_ORACLE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "models", "hf_oracle.py")
_spec = importlib.util.spec_from_file_location("hf_oracle", _ORACLE)
oracle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(oracle)

CANVAS = 64
EXPRESSION = "the large red metal cube"


def _hf_processor(family, tok_dir, image_cfg):
    processors = {"qwen2_5_vl": Qwen2_5_VLProcessor, "qwen3_vl": Qwen3VLProcessor}

    class NoVideo(processors[family]):  # the video processor needs torchvision
        def check_argument_for_proper_class(self, name, arg):
            return None if name == "video_processor" and arg is None else super().check_argument_for_proper_class(name, arg)

    images = hf_pil.Qwen2VLImageProcessorPil(
        patch_size=image_cfg.patch_size, temporal_patch_size=image_cfg.temporal_patch_size,
        merge_size=image_cfg.merge_size, image_mean=list(image_cfg.image_mean), image_std=list(image_cfg.image_std),
        size={"shortest_edge": image_cfg.min_pixels, "longest_edge": image_cfg.max_pixels})
    return NoVideo(image_processor=images, tokenizer=AutoTokenizer.from_pretrained(tok_dir), video_processor=None,
                   chat_template=CHAT_TEMPLATES[family])


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen2_5_vl"])
def setup(request, rec_set, tmp_path_factory):
    family = request.param
    tok_dir = str(tmp_path_factory.mktemp(f"tok_{family}"))
    build_tiny_tokenizer(tok_dir, family=family)
    cfg = oracle.tiny_cfg(family, tie=False)
    v = cfg.vision
    image_cfg = ImageProcessorConfig.for_family(family, patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                                                temporal_patch_size=v.temporal_patch_size,
                                                min_pixels=CANVAS * CANVAS, max_pixels=CANVAS * CANVAS)
    builder = QuestionBuilder(QuestionSpec(family=family, image_cfg=image_cfg, canvas_hw=(CANVAS, CANVAS),
                                           prompt_bucket=16), os.path.join(tok_dir, "tokenizer.json"))
    image_path = sorted(glob.glob(os.path.join(rec_set[0], "coco_train2014", "*.jpg")))[0]
    with open(image_path, "rb") as f:
        encoded = f.read()
    return family, tok_dir, cfg, image_cfg, builder, encoded


def test_the_rec_prompt_gives_hf_input_ids_and_pixels(setup):
    family, tok_dir, _, image_cfg, builder, encoded = setup
    prompt = rec.rec_prompt(family, "", EXPRESSION)
    ours = builder([encoded], prompt)
    hf = _hf_processor(family, tok_dir, image_cfg)
    canvas, _ = letterbox(decode_image(encoded), (CANVAS, CANVAS))
    text = hf.apply_chat_template(chat_messages(prompt, 1), tokenize=False, add_generation_prompt=True)
    ref = hf(text=[text], images=[canvas], return_tensors="np")
    np.testing.assert_array_equal(ours["prompt_ids"][ours["prompt_mask"] == 1], ref["input_ids"][0])
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
    np.testing.assert_allclose(ours["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-6)


def _teach_answer(hf_model, inputs, answer_ids: list[int], max_steps: int = 1000, margin: float = 1.0) -> float:
    """Trains the HF model's (untied) output layer so that greedy decoding continues the prompt with
    `answer_ids`; returns the smallest logit margin of an answer token over the best other token.

    Only `lm_head` changes, so the final hidden states of the teacher-forced sequence, float[T, D], are
    computed once: greedy decoding reproduces that sequence exactly when every answer position's argmax
    is its next token, since a causal model's state at a position depends only on the tokens before it.
    Training stops once every position's margin exceeds `margin` (some positions' states are close
    in a random model, so it may end below): any margin far above the two implementations' logit
    differences (~1e-5 in float32, the parity tests) keeps every argmax the same in both. (Training the whole model in torch takes minutes on a loaded 2-core
    machine; this takes seconds.)
    """
    ids = torch.cat([inputs["input_ids"], torch.tensor([answer_ids])], 1)
    extra = {}
    if "mm_token_type_ids" in inputs:  # which tokens are image tokens (HF's M-RoPE input); text for the answer
        extra["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"],
                                                torch.zeros((1, len(answer_ids)), dtype=torch.long)], 1)
    with torch.no_grad():
        out = hf_model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                       image_grid_thw=inputs["image_grid_thw"], output_hidden_states=True, **extra)
        hidden = out.hidden_states[-1][0, -len(answer_ids) - 1:-1]  # float[T, D]: the states that predict the answer
        torch.testing.assert_close(hf_model.lm_head(hidden), out.logits[0, -len(answer_ids) - 1:-1])
    targets = torch.tensor(answer_ids)
    optimizer = torch.optim.Adam(hf_model.lm_head.parameters(), lr=1e-2)

    def smallest_margin() -> float:
        with torch.no_grad():
            logits = hf_model.lm_head(hidden)  # float[T, V]
            right = logits.gather(1, targets[:, None])[:, 0]
            logits.scatter_(1, targets[:, None], -torch.inf)
            return float((right - logits.max(1).values).min())

    for _ in range(max_steps):
        if smallest_margin() > margin:
            break
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(hf_model.lm_head(hidden), targets).backward()
        optimizer.step()
    return smallest_margin()


def test_a_tiny_hf_model_and_ours_answer_the_same_box_and_score(setup, rec_set, tmp_path):
    family, tok_dir, cfg, image_cfg, builder, encoded = setup
    prompt = rec.rec_prompt(family, "", EXPRESSION)
    example = {k: v[None] for k, v in builder([encoded], prompt).items()}
    gt = np.array([20.0, 12.0, 44.0, 40.0])
    target = format_answer(gt * example["scale"][0][0], [EXPRESSION], family, (CANVAS, CANVAS), builder.resized_hw)
    tokenizer = load_tokenizer(os.path.join(tok_dir, "tokenizer.json"))
    answer_ids = tokenizer.encode(target + "<|im_end|>", add_special_tokens=False).ids

    hf = _hf_processor(family, tok_dir, image_cfg)
    canvas, _ = letterbox(decode_image(encoded), (CANVAS, CANVAS))
    text = hf.apply_chat_template(chat_messages(prompt, 1), tokenize=False, add_generation_prompt=True)
    inputs = hf(text=[text], images=[canvas], return_tensors="pt")
    hf_model = oracle.hf_model(cfg)
    assert _teach_answer(hf_model, inputs, answer_ids) > 0.05
    with torch.no_grad():
        out = hf_model.generate(**inputs, max_new_tokens=len(answer_ids) + 4, do_sample=False,
                                eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    hf_text = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:].tolist(), skip_special_tokens=True)

    hf_model.save_pretrained(tmp_path / "hf")
    model = hf_io.load_hf_checkpoint(str(tmp_path / "hf"))
    ours_text, = GreedyAnswers(cfg, tokenizer, max_new_tokens=len(answer_ids) + 4, prompt_bucket=16).answer(
        model, example)
    assert ours_text == hf_text

    boxes = [rec.predicted_box(t, family, example, 0, thinking=False) for t in (hf_text, ours_text)]
    np.testing.assert_array_equal(boxes[0], boxes[1])
    assert boxes[0].shape == (4,)  # a real box, not two invalid answers
    scores = [rec.split_metrics([rec.box_iou(b, gt)], [False]) for b in boxes]
    assert scores[0] == scores[1] and scores[0]["acc@0.5"] == 1.0
