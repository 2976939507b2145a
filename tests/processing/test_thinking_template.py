"""The Qwen3-VL Thinking template against the released one, and what the example builder makes of it.

`qwen3_vl_thinking_chat_template.jinja` beside this file is the chat template shipped with the
Qwen3-VL Thinking checkpoints (Apache-2.0), as copies of it in public repositories give it (a GGUF
agent's template string, and the template a llama.cpp server logged for a Qwen3-VL Thinking GGUF; the two
agree). It is rendered here with jinja2 the way transformers renders chat templates (trim_blocks,
lstrip_blocks) and is the reference for both of our renderings: the Python one the trainer uses and the
Jinja one written beside the tiny tokenizer.
"""
import os

import jinja2
import numpy as np
import pytest

from dig_jax.processing import (SPECIAL_TOKENS, answer_prefix, build_tiny_tokenizer, chat_messages, chat_prompt,
                                jinja_template, load_tokenizer, render_messages)
from dig_jax.processing.examples import ExampleBuilder, InputSpec, max_answer_tokens
from dig_jax.processing.image import ImageProcessorConfig

RELEASED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen3_vl_thinking_chat_template.jinja")
THINK, END_THINK = 151667, 151668  # the released Qwen3 tokenizer's ids (added, not special)
PROMPT = "Find every difference between the two pictures."
TWO_IMAGES = ("Picture 1: <|vision_start|><|image_pad|><|vision_end|>"
              "Picture 2: <|vision_start|><|image_pad|><|vision_end|>")


@pytest.fixture(scope="module")
def released():
    with open(RELEASED) as f:
        source = f.read()
    template = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(source)

    def render(messages, add_generation_prompt=True, add_vision_id=False):
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               add_vision_id=add_vision_id)

    return render


@pytest.fixture(scope="module")
def thinking_tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok_thinking")
    build_tiny_tokenizer(str(d), "qwen3_vl", chat_template="thinking")
    return str(d)


# A conversation for every branch of the released template that our renderer supports: assistant turns
# before and after the last user turn, with reasoning given as `reasoning_content`, inside the content,
# or not at all, a user turn that is a wrapped tool response, images after text, a system turn.
IMAGES = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": PROMPT}]
CONVERSATIONS = {
    "answer_without_reasoning": [{"role": "user", "content": IMAGES},
                                 {"role": "assistant", "content": '[{"bbox_2d": [1, 2, 3, 4], "label": "add"}]'}],
    "history": [{"role": "system", "content": "You box differences."},
                {"role": "user", "content": IMAGES},
                {"role": "assistant", "content": "<think>\nfirst look\n</think>\n\n[]"},
                {"role": "user", "content": [{"type": "text", "text": "Look again."}, {"type": "image"}]},
                {"role": "assistant", "content": "the cube moved\n</think>\n\n[]"}],
    "reasoning_content": [{"role": "user", "content": IMAGES},
                          {"role": "assistant", "content": "[]", "reasoning_content": "\nnothing differs\n"},
                          {"role": "assistant", "content": "x</think>kept", "reasoning_content": ""}],
    # The assistant turn before the tool response keeps its reasoning: the last query is the first turn.
    "tool_response_is_not_a_query": [{"role": "user", "content": IMAGES},
                                     {"role": "assistant", "content": "checking</think>[]"},
                                     {"role": "user", "content": "<tool_response>ok</tool_response>"},
                                     {"role": "assistant", "content": "[]"}],
}


@pytest.mark.parametrize("add_vision_id", [True, False])
@pytest.mark.parametrize("system", [None, "You box differences."])
def test_thinking_prompt_with_two_images_renders_as_released(released, add_vision_id, system):
    ours = chat_prompt("qwen3_vl", PROMPT, 2, add_vision_id=add_vision_id, system=system, chat_template="thinking")
    assert ours == released(chat_messages(PROMPT, 2, system), add_vision_id=add_vision_id)


def test_thinking_prompt_opens_the_reasoning_block():
    """The exact text: the Instruct prompt, then `<think>\\n` after the assistant header."""
    ours = chat_prompt("qwen3_vl", PROMPT, 2, add_vision_id=True, chat_template="thinking")
    assert ours == f"<|im_start|>user\n{TWO_IMAGES}{PROMPT}<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert ours == chat_prompt("qwen3_vl", PROMPT, 2, add_vision_id=True) + "<think>\n"


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("add_vision_id", [True, False])
def test_history_turns_render_as_released(released, name, add_generation_prompt, add_vision_id):
    messages = CONVERSATIONS[name]
    ref = released(messages, add_generation_prompt, add_vision_id)
    assert render_messages("qwen3_vl", messages, add_generation_prompt, add_vision_id, chat_template="thinking") == ref


def test_an_answer_without_reasoning_gets_the_empty_block(released):
    """What the supervised target continues: the released rendering of [user, assistant answer]."""
    text = released(CONVERSATIONS["answer_without_reasoning"], add_generation_prompt=False)
    prompt = released(CONVERSATIONS["answer_without_reasoning"][:1], add_generation_prompt=True)
    answer = CONVERSATIONS["answer_without_reasoning"][1]["content"]
    assert text == prompt + answer_prefix("thinking") + answer + "<|im_end|>\n"
    assert answer_prefix("thinking") == "\n</think>\n\n" and answer_prefix("instruct") == ""


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_tiny_tokenizer_side_file_renders_the_same_through_hf(thinking_tokenizer_dir, name):
    """The Jinja written beside the tiny tokenizer, through HF's apply_chat_template."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(thinking_tokenizer_dir)
    for add_generation_prompt in (True, False):
        ref = tok.apply_chat_template(CONVERSATIONS[name], tokenize=False, add_generation_prompt=add_generation_prompt,
                                      add_vision_id=True)
        assert ref == render_messages("qwen3_vl", CONVERSATIONS[name], add_generation_prompt, add_vision_id=True,
                                      chat_template="thinking")
    with open(os.path.join(thinking_tokenizer_dir, "chat_template.jinja")) as f:
        assert f.read() == jinja_template("qwen3_vl", "thinking")


def test_think_tokens_have_their_real_ids_and_survive_decoding(thinking_tokenizer_dir):
    tok = load_tokenizer(thinking_tokenizer_dir)
    assert tok.encode("<think>").ids == [THINK] and tok.encode("</think>").ids == [END_THINK]
    prompt_ids = tok.encode(chat_prompt("qwen3_vl", "hi", 0, chat_template="thinking")).ids
    newline = tok.token_to_id("Ċ")
    assert prompt_ids[-5:] == [SPECIAL_TOKENS["<|im_start|>"], 77091, newline, THINK, newline]
    completion = tok.encode("the cube\n</think>\n\n[]<|im_end|>").ids
    # Not special: the reward's decoding (skip_special_tokens=True) keeps the block's close, drops <|im_end|>.
    assert tok.decode(completion, skip_special_tokens=True) == "the cube\n</think>\n\n[]"


@pytest.mark.parametrize("bad, match", [
    (dict(family="qwen2_5_vl", chat_template="thinking"), "family 'qwen2_5_vl' has none"),
    (dict(family="qwen3_vl", chat_template="reasoning"), "chat_template must be one of"),
])
def test_unknown_or_unavailable_template_is_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        chat_prompt(bad["family"], PROMPT, 2, chat_template=bad["chat_template"])


@pytest.mark.parametrize("messages, match", [
    ([{"role": "tool", "content": "42"}], r"messages\[0\]: .* got role 'tool'"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": []}],
     r"messages\[1\]: .*tool_calls"),
    ([{"role": "system", "content": [{"type": "image"}]}], r"messages\[0\]: images or videos in a system turn"),
])
def test_unsupported_turns_are_refused_naming_the_message(messages, match):
    with pytest.raises(ValueError, match=match):
        render_messages("qwen3_vl", messages, chat_template="thinking")


# ------------------------------------------------------------------------------------------ examples
def _builder(tok_dir, chat_template, answer_len=64):
    spec = InputSpec(family="qwen3_vl", image_cfg=ImageProcessorConfig.for_family("qwen3_vl",
                                                                                  min_pixels=64 * 64,
                                                                                  max_pixels=64 * 64),
                     prompt_text=PROMPT, add_vision_id=True, label_mode="kind", max_boxes=2, prompt_bucket=16,
                     answer_len=answer_len, chat_template=chat_template)
    return ExampleBuilder(spec, tok_dir, (64, 64))


def test_supervised_example_continues_the_prompt_as_the_template_renders_the_answer(released,
                                                                                    thinking_tokenizer_dir):
    """Prompt + target decode to the released rendering of [user, assistant answer] (less its last
    newline); the prompt ends in the opened block, the target starts by closing it."""
    builder = _builder(thinking_tokenizer_dir, "thinking")
    image = np.zeros((64, 64, 3), np.uint8)
    example = builder({"image_a": image, "image_b": image, "boxes": np.array([[8, 16, 24, 40]], np.float32),
                       "kinds": ["color"], "num_differences": 1})
    tok = builder.tokenizer
    prompt = example["prompt_ids"][example["prompt_mask"] == 1]
    answer = example["answer_ids"][example["answer_mask"] == 1]
    assert prompt[-2:].tolist() == [THINK, tok.token_to_id("Ċ")]
    assert answer[:2].tolist() == [tok.token_to_id("Ċ"), END_THINK]
    json_answer = builder.answer_text(np.array([[8, 16, 24, 40]]), ["color"])
    conversation = [{"role": "user", "content": IMAGES},
                    {"role": "assistant", "content": json_answer}]
    expected = released(conversation, add_generation_prompt=False, add_vision_id=True)
    one_pad = [int(t) for i, t in enumerate(prompt)
               if t != SPECIAL_TOKENS["<|image_pad|>"] or prompt[i - 1] != t]  # image tokens folded back to one
    assert tok.decode(one_pad + answer.tolist(), skip_special_tokens=False) + "\n" == expected


def test_instruct_builder_is_unchanged_and_thinking_adds_only_the_close(thinking_tokenizer_dir):
    instruct, thinking = _builder(thinking_tokenizer_dir, "instruct"), _builder(thinking_tokenizer_dir, "thinking")
    boxes, kinds = np.array([[8, 16, 24, 40]]), ["move"]
    assert instruct.target_text(boxes, kinds) == instruct.answer_text(boxes, kinds) + "<|im_end|>"
    assert thinking.target_text(boxes, kinds) == "\n</think>\n\n" + instruct.target_text(boxes, kinds)
    close = len(instruct.tokenizer.encode("\n</think>\n\n", add_special_tokens=False).ids)
    assert max_answer_tokens(thinking, 2) == max_answer_tokens(instruct, 2) + close
    assert len(thinking._prompt_ids) == len(instruct._prompt_ids) + 2  # <think> and its newline


def test_thinking_builder_refuses_qwen2_5(thinking_tokenizer_dir):
    spec = InputSpec(family="qwen2_5_vl", image_cfg=ImageProcessorConfig.for_family("qwen2_5_vl"), prompt_text=PROMPT,
                     add_vision_id=True, label_mode="kind", max_boxes=2, prompt_bucket=16, answer_len=64,
                     chat_template="thinking")
    with pytest.raises(ValueError, match="chat_template 'thinking'"):
        ExampleBuilder(spec, thinking_tokenizer_dir, (64, 64))


def test_processor_renders_prompts_and_messages_with_its_template(thinking_tokenizer_dir):
    from dig_jax.processing import Processor

    processor = Processor("qwen3_vl", thinking_tokenizer_dir, chat_template="thinking")
    assert processor.prompt(PROMPT, 2, add_vision_id=True) == chat_prompt("qwen3_vl", PROMPT, 2, add_vision_id=True,
                                                                          chat_template="thinking")
    image = np.zeros((64, 64, 3), np.uint8)
    batch = processor([chat_messages(PROMPT, 1)], [[image]])
    assert batch["input_ids"][0, -2:].tolist() == [THINK, processor.tokenizer.token_to_id("Ċ")]
    with pytest.raises(ValueError, match="family 'qwen2_5_vl' has none"):
        Processor("qwen2_5_vl", thinking_tokenizer_dir, chat_template="thinking")
