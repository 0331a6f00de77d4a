"""FaceLLM = InternVL: InternViT -> pixel shuffle -> MLP projector -> image tokens merged into Qwen."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from facellm_jax.models.config import FaceLLMConfig
from facellm_jax.models.language import LanguageModel, LayerCache, segment_mask
from facellm_jax.models.layers import LayerNorm, Linear, Rngs, activation, init_keys
from facellm_jax.models.vision import VisionModel

Array = jax.Array


def pixel_shuffle(x: Array, ratio: float) -> Array:
  """[N, a, b, C] -> [N, a*r, b*r, C/r^2], the exact reshapes/transposes InternVL uses."""
  n, a, b, c = x.shape
  x = x.reshape(n, a, int(b * ratio), int(c / ratio))
  x = x.transpose(0, 2, 1, 3)
  x = x.reshape(n, int(b * ratio), int(a * ratio), int(c / ratio**2))
  return x.transpose(0, 2, 1, 3)


class Projector(nnx.Module):
  """LayerNorm -> Linear -> GELU -> Linear from shuffled ViT features to the LLM width."""

  def __init__(self, cfg: FaceLLMConfig, rngs: Rngs, dtype, param_dtype):
    d_in = cfg.vision.hidden_size * int(1 / cfg.downsample_ratio) ** 2
    d_out = cfg.text.hidden_size
    self.norm = LayerNorm(d_in, eps=1e-5, rngs=rngs, param_dtype=param_dtype)  # torch's default eps
    kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.linear_1 = Linear(d_in, d_out, axes=("vit_mlp", "embed"), **kw)
    self.linear_2 = Linear(d_out, d_out, axes=("mlp", "embed"), **kw)
    self.act = activation(cfg.projector_hidden_act)

  def __call__(self, x: Array) -> Array:
    return self.linear_2(self.act(self.linear_1(self.norm(x))))


def merge_image_tokens(input_ids: Array, text_embeds: Array, image_embeds: Array, image_token_id: int) -> Array:
  """Replaces the i-th `image_token_id` placeholder (row-major over the batch) by image row i."""
  is_image = input_ids == image_token_id
  flat = image_embeds.reshape(-1, image_embeds.shape[-1]).astype(text_embeds.dtype)
  index = jnp.cumsum(is_image.reshape(-1)) - 1
  gathered = jnp.take(flat, jnp.clip(index, 0, flat.shape[0] - 1), axis=0).reshape(text_embeds.shape)
  return jnp.where(is_image[..., None], gathered, text_embeds)


class FaceLLM(nnx.Module):
  """`logits = model(input_ids, pixel_values)`; see DESIGN.md (Model) for the contract."""

  def __init__(self, config: FaceLLMConfig, *, rngs: Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    self.config = config
    rngs = init_keys(rngs)
    self.vision = VisionModel(config.vision, rngs, dtype, param_dtype)
    self.projector = Projector(config, rngs, dtype, param_dtype)
    self.language = LanguageModel(config.text, rngs, dtype, param_dtype)

  def encode_images(self, pixel_values: Array) -> Array:
    """[N, H, W, 3] normalized NHWC pixels -> [N, image_seq_length, D_text]."""
    c = self.config
    x = self.vision(pixel_values, c.vision_feature_layer)
    if c.vision_feature_select_strategy == "default":
      x = x[:, 1:]
    n, t, d = x.shape
    side = int(round(t ** 0.5))
    x = pixel_shuffle(x.reshape(n, side, side, d), c.downsample_ratio)
    return self.projector(x.reshape(n, -1, x.shape[-1]))

  def embed(self, input_ids: Array, pixel_values: Array | None) -> Array:
    embeds = self.language.embed_tokens(input_ids)
    if pixel_values is None:
      return embeds
    image_embeds = self.encode_images(pixel_values)
    if not isinstance(input_ids, jax.core.Tracer):
      placeholders = int((input_ids == self.config.image_token_id).sum())
      if placeholders > image_embeds.shape[0] * image_embeds.shape[1]:
        raise ValueError(
            f"input_ids hold {placeholders} image placeholders but {image_embeds.shape[0]} image(s) give "
            f"only {image_embeds.shape[0] * image_embeds.shape[1]} ({image_embeds.shape[1]} per image)")
    return merge_image_tokens(input_ids, embeds, image_embeds, self.config.image_token_id)

  def __call__(self, input_ids: Array, pixel_values: Array | None = None, *, positions: Array | None = None,
               segment_ids: Array | None = None) -> Array:
    """Float32 logits [B, T, vocab]. Packed rows pass `segment_ids` (0 = padding) and `positions`."""
    b, t = input_ids.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    hidden, _ = self.language(self.embed(input_ids, pixel_values), positions, segment_mask(segment_ids))
    return self.language.logits(hidden)

  def decode_step(self, input_ids: Array, pixel_values: Array | None, positions: Array, key_valid: Array,
                  cache: list[LayerCache], cache_index: Array) -> tuple[Array, list[LayerCache]]:
    """Runs T new tokens against a cache of length S, writing them at `cache_index`.

    key_valid [B, S] marks cache slots holding real tokens (after this step's write), so
    left-padded prompts of different lengths batch together.
    """
    b, t = input_ids.shape
    s = cache[0].k.shape[1]
    query_slot = cache_index + jnp.arange(t)
    mask = (jnp.arange(s)[None, :] <= query_slot[:, None])[None, None] & key_valid[:, None, None, :]
    hidden, cache = self.language(self.embed(input_ids, pixel_values), positions, mask, cache, cache_index)
    return self.language.logits(hidden[:, -1:]), cache
