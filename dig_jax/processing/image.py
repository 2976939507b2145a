"""Image preprocessing for Qwen2.5-VL and Qwen3-VL, bit-identical to HF's PIL-backend image processor.

Why a re-implementation: the trainer and the data loader run without torch, and the model needs the exact
pixel layout the vision tower was trained on. The pipeline (that of HF's `Qwen2VLImageProcessorPil`, used
by both families; the torchvision backend resizes with other code and is not matched):

    convert to RGB (alpha on white) -> PIL BICUBIC resize of the uint8 image to `smart_resize(h, w)` ->
    `x * (1/255)` in float64, cast to float32 -> `(x - mean) / std` in float32 -> CHW -> patchify.

Patchify axis legend: C channels, T temporal patch (the still image is repeated T times), P patch side,
m merge size, gh/gw grid height/width in patches. Rows of `pixel_values` are ordered by 2x2 merge block
in raster order, then row/col inside the block; columns are ordered (C, T, P_h, P_w).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import PIL.Image

ImageLike = np.ndarray | PIL.Image.Image

# The OpenAI CLIP statistics used by Qwen2-VL / Qwen2.5-VL (preprocessor_config.json of the released models).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """Static settings of the image processor; use the family presets rather than filling fields by hand.

    `min_pixels` / `max_pixels` bound the area of the resized image (HF's `size.shortest_edge` /
    `size.longest_edge`); the resized sides are multiples of `factor = patch_size * merge_size`.
    """

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    def __post_init__(self):
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ImageProcessorConfig.{name} must be positive, got {getattr(self, name)!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(
                f"ImageProcessorConfig.min_pixels ({self.min_pixels}) exceeds max_pixels ({self.max_pixels})")
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"ImageProcessorConfig.{name} needs 3 values (R, G, B), got {getattr(self, name)!r}")

    @property
    def factor(self) -> int:
        """Side granularity of the resized image in pixels: one merged token covers factor x factor pixels."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Length of one row of `pixel_values`: C * T * P * P."""
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    @classmethod
    def qwen2_5_vl(cls, min_pixels: int = 3136, max_pixels: int = 12845056) -> "ImageProcessorConfig":
        """Qwen2.5-VL release settings: 14 px patches, 2x2 merge (28 px per token), CLIP mean/std."""
        return cls(patch_size=14, temporal_patch_size=2, merge_size=2, min_pixels=min_pixels,
                   max_pixels=max_pixels, image_mean=CLIP_MEAN, image_std=CLIP_STD)

    @classmethod
    def qwen3_vl(cls, min_pixels: int = 65536, max_pixels: int = 16777216) -> "ImageProcessorConfig":
        """Qwen3-VL release settings: 16 px patches, 2x2 merge (32 px per token), mean = std = 0.5."""
        return cls(patch_size=16, temporal_patch_size=2, merge_size=2, min_pixels=min_pixels,
                   max_pixels=max_pixels, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))

    @classmethod
    def for_family(cls, family: str, **overrides) -> "ImageProcessorConfig":
        """The preset of `family` ('qwen2_5_vl' or 'qwen3_vl') with any fields overridden.

        Overrides are field names of this class (`min_pixels`, `merge_size`, ...); a model whose vision
        geometry differs from the release passes its own patch and merge sizes here.
        """
        presets = {"qwen2_5_vl": cls.qwen2_5_vl, "qwen3_vl": cls.qwen3_vl}
        if family not in presets:
            raise ValueError(f"unknown model family {family!r}; expected one of {sorted(presets)}")
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"ImageProcessorConfig has no field(s) {unknown}")
        return dataclasses.replace(presets[family](), **overrides)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The (height, width) an image is resized to: sides multiples of `factor`, area within the bounds.

    Same arithmetic as HF's `smart_resize` (round half to even in the first step, `max(factor, .)` only in
    the shrink branch), because grid sizes and hence token counts and box coordinates depend on it.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be at most 200, got {height}x{width} "
                         f"(ratio {max(height, width) / min(height, width):.1f})")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb_uint8(image: ImageLike) -> np.ndarray:
    """uint8[H, W, 3] from a PIL image (any mode) or a uint8 array [H, W], [H, W, 1|3|4].

    Transparency is composited on white, as HF does, so RGBA renders and their RGB flattening agree.
    Float arrays are refused: their scale (0..1 or 0..255) is ambiguous and HF guesses it from the values.
    """
    if isinstance(image, PIL.Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.asarray(PIL.Image.alpha_composite(white, rgba).convert("RGB"))
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8 [H, W, 3] (got dtype {array.dtype}, shape {array.shape}); "
                        "convert float images with (x * 255).round().astype(np.uint8) first")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image array must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]; got shape {array.shape}")
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    if array.shape[-1] == 4:
        alpha = array[..., 3:4] / 255
        return np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return array


def resize_and_normalize(image: ImageLike, cfg: ImageProcessorConfig) -> np.ndarray:
    """float32[h, w, 3] with (h, w) = smart_resize of the image, rescaled to [0, 1] and normalised."""
    rgb = to_rgb_uint8(image)
    h, w = rgb.shape[:2]
    new_h, new_w = smart_resize(h, w, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    # HF resizes through PIL even when the size is unchanged; PIL returns a copy then, so skip it.
    if (new_h, new_w) != (h, w):
        rgb = np.asarray(PIL.Image.fromarray(rgb).resize((new_w, new_h), resample=PIL.Image.Resampling.BICUBIC))
    x = (rgb.astype(np.float64) * (1 / 255)).astype(np.float32)  # HF's rescale: float64 product, then cast
    return (x - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)


def patchify(image: np.ndarray, cfg: ImageProcessorConfig) -> tuple[np.ndarray, int, int]:
    """float32[h, w, 3] -> (float32[gh * gw, C * T * P * P], gh, gw), in the vision tower's patch order."""
    h, w, c = image.shape
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    if h % (p * m) or w % (p * m):
        raise ValueError(f"image of {h}x{w} px is not a multiple of patch*merge = {p * m}; resize it first")
    gh, gw = h // p, w // p
    x = image.reshape(gh // m, m, p, gw // m, m, p, c)
    x = x.transpose(0, 3, 1, 4, 6, 2, 5)  # [gh/m, gw/m, m, m, C, P, P]
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))  # [gh/m, gw/m, m, m, C, T, P, P]
    return x.reshape(gh * gw, c * t * p * p), gh, gw


def preprocess_images(images: Sequence[ImageLike], cfg: ImageProcessorConfig) -> tuple[np.ndarray, np.ndarray]:
    """Resize, normalise and patchify a list of images, concatenated along the patch axis as HF does.

    Returns:
        pixel_values: float32[N, C * T * P * P], N = sum of gh * gw over the images.
        image_grid_thw: int64[n_images, 3], rows (1, gh, gw) in patches; image i has gh * gw / m^2 tokens.
    """
    if isinstance(images, (np.ndarray, PIL.Image.Image)):
        raise TypeError("preprocess_images takes a list of images: wrap a single image as [image], "
                        "split a stacked uint8[N, H, W, 3] batch with list(batch)")
    patches, grids = [], []
    for i, image in enumerate(images):
        try:
            flat, gh, gw = patchify(resize_and_normalize(image, cfg), cfg)
        except (TypeError, ValueError) as e:
            raise type(e)(f"image {i}: {e}") from e
        patches.append(flat)
        grids.append((1, gh, gw))
    if not patches:
        return np.zeros((0, cfg.patch_dim), np.float32), np.zeros((0, 3), np.int64)
    return np.concatenate(patches, axis=0), np.asarray(grids, dtype=np.int64)


def num_image_tokens(image_grid_thw: np.ndarray, merge_size: int) -> np.ndarray:
    """int64[n_images]: how many `<|image_pad|>` tokens each image occupies in the text (t * gh * gw / m^2)."""
    grid = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    return grid.prod(axis=-1) // (merge_size * merge_size)
