"""Processing parity against Hugging Face transformers (the PIL-backend image processor, the Qwen2.5-VL
and Qwen3-VL processors built locally from our tiny tokenizer) and against known outputs of the released
processors and templates (worked smart_resize examples, rendered templates, token ids).
"""
import json
import random

import numpy as np
import PIL.Image
import pytest
import tokenizers

from dig_jax import processing
from dig_jax.processing import (CHAT_TEMPLATES, ImageProcessorConfig, Processor, SPECIAL_TOKENS, build_tiny_tokenizer,
                                chat_messages, chat_prompt, expand_image_tokens, load_tokenizer, preprocess_images,
                                smart_resize)

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, Qwen2_5_VLProcessor, Qwen3VLProcessor  # noqa: E402
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_pil  # noqa: E402

FAMILIES = ("qwen2_5_vl", "qwen3_vl")
HF_PROCESSORS = {"qwen2_5_vl": Qwen2_5_VLProcessor, "qwen3_vl": Qwen3VLProcessor}


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    dirs = {}
    for family in FAMILIES:
        d = tmp_path_factory.mktemp(f"tok_{family}")
        build_tiny_tokenizer(str(d), family)
        dirs[family] = str(d)
    return dirs


def hf_image_processor(cfg: ImageProcessorConfig):
    return hf_pil.Qwen2VLImageProcessorPil(
        patch_size=cfg.patch_size, temporal_patch_size=cfg.temporal_patch_size, merge_size=cfg.merge_size,
        image_mean=list(cfg.image_mean), image_std=list(cfg.image_std),
        size={"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels})


def hf_processor(family, tokenizer_dir, cfg):
    """The HF processor of `family`, built from our tokenizer; no video processor (it needs torchvision)."""

    class NoVideo(HF_PROCESSORS[family]):
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor" and arg is None:
                return None
            return super().check_argument_for_proper_class(name, arg)

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return NoVideo(image_processor=hf_image_processor(cfg), tokenizer=tok, video_processor=None,
                   chat_template=CHAT_TEMPLATES[family])


def random_image(rng, h, w, channels=3):
    return rng.integers(0, 256, (h, w, channels), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------ smart_resize
@pytest.mark.parametrize("hw, factor, max_pixels, expected", [
    ((1080, 1920), 28, 12845056, (1092, 1932)),
    ((1080, 1920), 28, 1003520, (728, 1316)),
    ((4000, 3000), 28, 12845056, (4004, 2996)),
    ((224, 224), 28, 12845056, (224, 224)),
])
def test_smart_resize_spec_examples_qwen2_5(hw, factor, max_pixels, expected):
    assert smart_resize(*hw, factor, 3136, max_pixels) == expected


def test_smart_resize_spec_examples_qwen3():
    assert smart_resize(1080, 1920, 32, 65536, 16777216) == (1088, 1920)
    assert smart_resize(224, 224, 32, 65536, 16777216) == (256, 256)  # upscaled: 224^2 < 65536


def test_smart_resize_matches_hf_on_random_sizes():
    rng = random.Random(0)
    settings = [(28, 3136, 12845056), (28, 3136, 1003520), (32, 65536, 16777216), (28, 3136, 50000),
                (32, 65536, 70000)]
    checked = 0
    for _ in range(3000):
        h, w = rng.randint(1, 5000), rng.randint(1, 5000)
        if max(h, w) / min(h, w) > 200:
            continue
        for factor, lo, hi in settings:
            assert smart_resize(h, w, factor, lo, hi) == hf_pil.smart_resize(h, w, factor, lo, hi), (h, w, factor)
            checked += 1
    assert checked > 10000


def test_smart_resize_rejects_extreme_aspect_ratio():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2010, 28, 3136, 12845056)


# ------------------------------------------------------------------------------------------------ images
IMAGE_CASES = [  # (height, width, channels): square, landscape, portrait, tiny (upscaled), gray, RGBA
    (224, 224, 3), (300, 450, 3), (517, 123, 3), (20, 90, 3), (97, 61, 1), (150, 200, 4), (1000, 700, 3),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("max_pixels", [None, 160000])
def test_pixel_values_match_hf_pil_backend(family, max_pixels):
    rng = np.random.default_rng(1)
    cfg = ImageProcessorConfig.for_family(family, **({"max_pixels": max_pixels} if max_pixels else {}))
    images = [random_image(rng, h, w, c) for h, w, c in IMAGE_CASES]
    ref = hf_image_processor(cfg)(images, return_tensors="np")
    pixel_values, grid = preprocess_images(images, cfg)
    np.testing.assert_array_equal(grid, ref["image_grid_thw"])
    assert grid.dtype == np.int64 and pixel_values.dtype == np.float32
    np.testing.assert_allclose(pixel_values, ref["pixel_values"], rtol=0, atol=1e-6)


def test_pil_inputs_match_hf():
    rng = np.random.default_rng(2)
    cfg = ImageProcessorConfig.qwen2_5_vl()
    rgba = PIL.Image.fromarray(random_image(rng, 130, 170, 4), mode="RGBA")
    palette = PIL.Image.fromarray(random_image(rng, 90, 120)).convert("P")
    gray = PIL.Image.fromarray(random_image(rng, 64, 300, 1)[..., 0], mode="L")
    images = [rgba, palette, gray]
    ref = hf_image_processor(cfg)(images, return_tensors="np")
    pixel_values, grid = preprocess_images(images, cfg)
    np.testing.assert_array_equal(grid, ref["image_grid_thw"])
    np.testing.assert_allclose(pixel_values, ref["pixel_values"], rtol=0, atol=1e-6)


def test_spec_verified_shapes():
    rng = np.random.default_rng(3)
    images = [random_image(rng, 224, 224), random_image(rng, 300, 450)]
    pv, grid = preprocess_images(images, ImageProcessorConfig.qwen2_5_vl())
    assert pv.shape == (960, 1176) and grid.tolist() == [[1, 16, 16], [1, 22, 32]]
    pv, grid = preprocess_images(images, ImageProcessorConfig.qwen3_vl())
    assert pv.shape == (760, 1536) and grid.tolist() == [[1, 16, 16], [1, 18, 28]]


def test_patch_order_against_pixels():
    """Rows are 2x2 merge blocks in raster order; columns (C, T, P, P); checked on raw pixels, not HF."""
    rng = np.random.default_rng(4)
    cfg = ImageProcessorConfig.qwen2_5_vl()
    img = random_image(rng, 56, 84)  # already a multiple of 28: no resize, so pixels are known exactly
    pv, grid = preprocess_images([img], cfg)
    assert grid.tolist() == [[1, 4, 6]]
    norm = ((img.astype(np.float64) / 255 - np.array(cfg.image_mean)) / np.array(cfg.image_std))

    def expected_patch(r, c):  # patch at patch-row r, patch-col c -> [C, T, P, P] flattened
        block = norm[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14].transpose(2, 0, 1)
        return np.stack([block, block], axis=1).reshape(-1)

    for row, (r, c) in {0: (0, 0), 1: (0, 1), 2: (1, 0), 3: (1, 1), 4: (0, 2), 12: (2, 0), 23: (3, 5)}.items():
        np.testing.assert_allclose(pv[row], expected_patch(r, c), atol=1e-5)


def test_two_dim_gray_equals_one_channel():
    gray = random_image(np.random.default_rng(9), 40, 50, 1)
    cfg = ImageProcessorConfig.qwen3_vl()
    np.testing.assert_array_equal(preprocess_images([gray[..., 0]], cfg)[0], preprocess_images([gray], cfg)[0])


def test_float_images_are_rejected_with_a_clear_error():
    with pytest.raises(TypeError, match="image 1: .*uint8"):
        preprocess_images([np.zeros((28, 28, 3), np.uint8), np.zeros((28, 28, 3), np.float32)],
                          ImageProcessorConfig.qwen3_vl())


# ------------------------------------------------------------------------------------------------ templates
SPEC_TEXT = "…text…"


def test_templates_match_spec_rendered_examples():
    """The strings the released HF templates render (jinja2, trim_blocks + lstrip_blocks) for two images."""
    pair = "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>"
    assert chat_prompt("qwen2_5_vl", SPEC_TEXT, 2) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + pair
        + "…text…<|im_end|>\n<|im_start|>assistant\n")
    assert chat_prompt("qwen3_vl", SPEC_TEXT, 2) == (
        "<|im_start|>user\n" + pair + "…text…<|im_end|>\n<|im_start|>assistant\n")
    labelled = chat_prompt("qwen3_vl", SPEC_TEXT, 2, add_vision_id=True)
    assert labelled == ("<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>"
                        "Picture 2: <|vision_start|><|image_pad|><|vision_end|>…text…<|im_end|>\n"
                        "<|im_start|>assistant\n")


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_prompt_matches_hf_apply_chat_template(family, tokenizer_dirs):
    # AutoTokenizer picks up the chat_template.jinja written beside tokenizer.json.
    tok = AutoTokenizer.from_pretrained(tokenizer_dirs[family])
    for num_images in (0, 1, 2):
        for add_vision_id in (False, True):
            for system in (None, "You box differences."):
                messages = chat_messages("Find every difference.", num_images, system)
                ref = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                              add_vision_id=add_vision_id)
                ours = chat_prompt(family, "Find every difference.", num_images, add_vision_id, system)
                assert ours == ref, (num_images, add_vision_id, system)
    conversation = chat_messages("Find every difference.", 2) + [
        {"role": "assistant", "content": '[{"bbox_2d": [1, 2, 3, 4], "label": "color"}]'},
        {"role": "user", "content": [{"type": "text", "text": "And now?"}, {"type": "image"}]}]
    ref = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False, add_vision_id=True)
    assert processing.render_messages(family, conversation, add_generation_prompt=False, add_vision_id=True) == ref


# ------------------------------------------------------------------------------------------------ tokenizer
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_tokenizer_special_ids_and_hf_agreement(family, tokenizer_dirs):
    tok = load_tokenizer(tokenizer_dirs[family])
    for token, expected in {**SPECIAL_TOKENS, **processing.NON_SPECIAL_ADDED_TOKENS[family]}.items():
        assert tok.token_to_id(token) == expected
        assert tok.encode(token).ids == [expected]
    assert SPECIAL_TOKENS["<|im_end|>"] == 151645 and SPECIAL_TOKENS["<|image_pad|>"] == 151655
    assert tok.get_vocab_size() <= 151936  # fits the tiny models' embedding table
    hf = AutoTokenizer.from_pretrained(tokenizer_dirs[family])
    assert hf.eos_token_id == 151645 and hf.pad_token_id == 151643
    texts = [
        chat_prompt(family, "Find every difference between Picture 1 and Picture 2.", 2, add_vision_id=True),
        '```json\n[{"bbox_2d": [12, 34, 56, 78], "label": "color"}, {"bbox_2d": [0, 5, 999, 1000]}]\n```',
        "Unseen words: Zürich naïve 東京 🤖 tab\tnewline\r\n  spaces   end",
    ]
    for text in texts:
        ids = tok.encode(text).ids
        assert ids == hf(text)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=False) == text  # byte-level: lossless round trip


def test_pipeline_equals_hf_qwen2_tokenizer_definition(tokenizer_dirs):
    """HF's Qwen2Tokenizer wraps our vocab/merges in ITS normaliser, pre-tokeniser and decoder: same ids."""
    with open(f"{tokenizer_dirs['qwen3_vl']}/tokenizer.json") as f:
        model = json.load(f)["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    hf = transformers.Qwen2Tokenizer(vocab=model["vocab"], merges=merges)
    ours = load_tokenizer(tokenizer_dirs["qwen3_vl"])
    texts = ["Hello world!! It's 2024-11-26, I'll   go\n\n\tthere.", "Zürich naïve 東京 🤖 e\u0301 ﬁ",
             '```json\n[{"bbox_2d": [12, 345, 6789, 0], "label": "rotate"}]\n```', "  lead and trail   "]
    for text in texts:
        ids = ours.encode(text).ids
        assert ids == hf(text)["input_ids"], text
        assert hf.decode(ids) == ours.decode(ids)


def test_digits_are_single_tokens_and_assistant_has_its_real_id(tokenizer_dirs):
    tok = load_tokenizer(tokenizer_dirs["qwen3_vl"])
    enc = tok.encode("[120, 7, 9981]")
    digits = [t for t in enc.tokens if any(ch.isdigit() for ch in t)]
    assert digits == list("12079981")
    assert tok.encode("assistant").ids == [77091]  # Qwen's fine-tuning code locates answers with it
    prompt_ids = tok.encode(chat_prompt("qwen3_vl", "hi", 0)).ids
    assert prompt_ids[-3:] == [151644, 77091, tok.token_to_id("Ċ")]


def test_tiny_tokenizer_build_is_deterministic(tokenizer_dirs, tmp_path):
    again = build_tiny_tokenizer(str(tmp_path), "qwen3_vl")
    with open(again, "rb") as a, open(f"{tokenizer_dirs['qwen3_vl']}/tokenizer.json", "rb") as b:
        assert a.read() == b.read()


def test_load_tokenizer_rejects_wrong_special_ids(tmp_path):
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={"a": 0}, merges=[]))
    tok.add_special_tokens(list(SPECIAL_TOKENS))  # ids 1.. instead of 151643..
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"<\|endoftext\|> has id 1, expected 151643"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------------------ processor
@pytest.mark.parametrize("family", FAMILIES)
def test_processor_matches_hf_processor_two_images(family, tokenizer_dirs):
    rng = np.random.default_rng(5)
    cfg = ImageProcessorConfig.for_family(family)
    images = [random_image(rng, 224, 224), random_image(rng, 300, 450)]
    hf = hf_processor(family, tokenizer_dirs[family], cfg)
    text = hf.apply_chat_template(chat_messages("Find every difference.", 2), tokenize=False,
                                  add_generation_prompt=True, add_vision_id=True)
    ref = hf(text=[text], images=images, return_tensors="np")
    ours = Processor(family, tokenizer_dirs[family])(
        chat_prompt(family, "Find every difference.", 2, add_vision_id=True), images)
    assert ours["input_ids"].dtype == np.int32 and ours["input_ids"].shape == ref["input_ids"].shape
    np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(ours["attention_mask"], ref["attention_mask"])
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
    np.testing.assert_allclose(ours["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-6)
    n_tokens = (ref["image_grid_thw"].prod(-1) // 4).sum()
    assert (ours["input_ids"] == 151655).sum() == n_tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_batch_of_two_matches_hf(family, tokenizer_dirs):
    rng = np.random.default_rng(6)
    cfg = ImageProcessorConfig.for_family(family)
    hf = hf_processor(family, tokenizer_dirs[family], cfg)
    hf.tokenizer.padding_side = "left"
    long_prompt = chat_prompt(family, "Find every difference.", 2, add_vision_id=True)
    short_prompt = chat_prompt(family, "Box the red cube.", 1)
    images = [[random_image(rng, 224, 224), random_image(rng, 256, 320)], [random_image(rng, 64, 64)]]
    ref = hf(text=[long_prompt, short_prompt], images=images[0] + images[1], padding=True, return_tensors="np")
    proc = Processor(family, tokenizer_dirs[family])
    ours = proc([long_prompt, short_prompt], images)  # per-prompt image lists
    np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(ours["attention_mask"], ref["attention_mask"])
    assert ours["attention_mask"][1, 0] == 0 and ours["input_ids"][1, 0] == proc.pad_token_id
    flat = proc([long_prompt, short_prompt], images[0] + images[1])  # HF-style flat list
    np.testing.assert_array_equal(flat["input_ids"], ours["input_ids"])


def test_padding_options_keep_the_tokens(tokenizer_dirs):
    rng = np.random.default_rng(7)
    proc = Processor("qwen3_vl", tokenizer_dirs["qwen3_vl"])
    prompts = [proc.prompt("a", 1), proc.prompt("a longer request here", 1)]
    images = [[random_image(rng, 64, 64)], [random_image(rng, 64, 96)]]
    single = [proc(p, im)["input_ids"][0] for p, im in zip(prompts, images)]
    right = proc(prompts, images, padding_side="right", pad_multiple=64)
    fixed = proc(prompts, images, pad_to=300)
    assert right["input_ids"].shape[1] % 64 == 0 and fixed["input_ids"].shape == (2, 300)
    for b, ids in enumerate(single):
        n = len(ids)
        np.testing.assert_array_equal(right["input_ids"][b, :n], ids)
        np.testing.assert_array_equal(fixed["input_ids"][b, 300 - n:], ids)
        assert right["attention_mask"][b].sum() == n == fixed["attention_mask"][b].sum()
    with pytest.raises(ValueError, match="prompt 1 has .* more than pad_to=10"):
        proc(prompts, images, pad_to=10)
    with pytest.raises(ValueError, match="prompt 1 needs images 1..1 but only 1 images were given"):
        proc(prompts, images[0])
    with pytest.raises(ValueError, match="3 images were given but the prompts hold 2"):
        proc(prompts, images[0] + images[1] + images[1])
    with pytest.raises(ValueError, match="prompt 0 holds 1 .* but its image list has 2 images"):
        proc(prompts, [images[0] + images[1], []])


def test_messages_input_and_expand_image_tokens(tokenizer_dirs):
    rng = np.random.default_rng(8)
    proc = Processor("qwen2_5_vl", tokenizer_dirs["qwen2_5_vl"])
    images = [random_image(rng, 100, 140), random_image(rng, 70, 200)]
    messages = chat_messages("Find every difference.", 2)
    from_messages = proc([messages], [images])
    prompt = chat_prompt("qwen2_5_vl", "Find every difference.", 2)
    np.testing.assert_array_equal(from_messages["input_ids"], proc(prompt, images)["input_ids"])
    grid = from_messages["image_grid_thw"]
    by_text = proc.encode(expand_image_tokens(prompt, grid, merge_size=2))
    by_ids = expand_image_tokens(proc.encode(prompt), grid, merge_size=2)
    np.testing.assert_array_equal(by_text, from_messages["input_ids"][0])
    np.testing.assert_array_equal(by_ids, from_messages["input_ids"][0])
    assert [proc.num_image_tokens(100, 140), proc.num_image_tokens(70, 200)] == list(grid.prod(-1) // 4)
    with pytest.raises(ValueError, match="2 <\\|image_pad\\|> placeholders but 1 images"):
        expand_image_tokens(prompt, grid[:1], merge_size=2)


def test_decode_drops_special_tokens(tokenizer_dirs):
    proc = Processor("qwen3_vl", tokenizer_dirs["qwen3_vl"])
    answer = '[{"bbox_2d": [10, 20, 300, 400], "label": "move"}]'
    ids = np.concatenate([proc.encode(answer + "<|im_end|>"), [proc.pad_token_id] * 3])
    assert proc.decode(ids) == answer
    assert json.loads(proc.decode(ids))[0]["bbox_2d"] == [10, 20, 300, 400]
    assert len(proc.encode("1000")) == 4
    tail = proc.encode("garbage after the end")
    batch = np.stack([np.concatenate([ids, tail]), np.concatenate([tail, ids])])
    assert proc.batch_decode(batch) == [answer, "garbage after the end" + answer]
    assert proc.batch_decode(batch, stop_at_eos=False)[0] == answer + "garbage after the end"

