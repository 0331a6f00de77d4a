"""The original InternVL layout (`OpenGVLab/InternVL3-*`, `InternVLChatModel`) read as the `-hf` one.

`hf.load_pretrained` reads both layouts through its one mapping table; this module stands in front
of it for an original directory: its config.json (read as data, never with trust_remote_code)
becomes the `-hf` config dict, and its tensor names become `-hf` names, the fused vision
`attn.qkv` split into q/k/v. The facts are those of transformers'
`models/internvl/convert_internvl_weights_to_hf.py`:
  vision_model. -> vision_tower.; encoder.layers. -> encoder.layer.; class_embedding -> cls_token;
  position_embedding -> position_embeddings; patch_embedding -> patch_embeddings.projection;
  ls1/ls2 -> lambda_1/lambda_2; attn.proj -> attention.projection_layer; attn.qkv -> attention.q/k/v_proj
  (rows [:D], [D:2D], [2D:] of weight and bias); attn -> attention; norm1/norm2 -> layernorm_before/after;
  mlp1.0/1/3 -> multi_modal_projector.layer_norm/linear_1/linear_2; language_model.* unchanged for
  Qwen2/Qwen3 decoders; llm_config -> text_config; qkv_bias -> attention_bias; qk_normalization ->
  use_qk_norm; select_layer -> vision_feature_layer; the <IMG_CONTEXT> id from the tokenizer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

# Original key pieces -> -hf ones, applied in order to `vision_model.*` keys.
_VISION_RENAMES = [
    (r"^vision_model\.", "vision_tower."),
    (r"\.encoder\.layers\.", ".encoder.layer."),
    (r"\.embeddings\.class_embedding$", ".embeddings.cls_token"),
    (r"\.embeddings\.position_embedding$", ".embeddings.position_embeddings"),
    (r"\.embeddings\.patch_embedding\.", ".embeddings.patch_embeddings.projection."),
    (r"\.ls(\d)$", r".lambda_\1"),
    (r"\.attn\.proj\.", ".attention.projection_layer."),
    (r"\.attn\.", ".attention."),
    (r"\.norm1\.", ".layernorm_before."),
    (r"\.norm2\.", ".layernorm_after."),
]
_VISION_RENAMES = [(re.compile(p), r) for p, r in _VISION_RENAMES]
_PROJECTOR = {"mlp1.0.": "multi_modal_projector.layer_norm.", "mlp1.1.": "multi_modal_projector.linear_1.",
              "mlp1.3.": "multi_modal_projector.linear_2."}
_QKV = re.compile(r"^(.*\.attention\.)qkv\.(weight|bias)$")
_DECODERS = ("qwen2", "qwen3")
# convert_internvl_weights_to_hf.py's <IMG_CONTEXT> id for Qwen2-based InternVL (InternVL2.5/3).
_QWEN2_IMAGE_TOKEN_ID = 151667
_IMAGE_TOKEN = "<IMG_CONTEXT>"


def is_original(config: dict[str, Any]) -> bool:
  """An original InternVLChatModel config.json (as opposed to an InternVLForConditionalGeneration one)."""
  return (config.get("model_type") == "internvl_chat" or "InternVLChatModel" in (config.get("architectures") or ())
          or "llm_config" in config)


def hf_config(config: dict[str, Any], path: str | Path) -> dict[str, Any]:
  """The `-hf` config.json dict of an original one; `path` is its directory (for the tokenizer)."""
  v, t = dict(config.get("vision_config") or {}), dict(config.get("llm_config") or {})
  if not v or not t:
    raise ValueError(f"{path}/config.json is an original InternVL config without vision_config/llm_config")
  if t.get("model_type") not in _DECODERS:
    raise ValueError(f"{path}: the original checkpoint's language model is {t.get('model_type')!r}; "
                     f"only {' and '.join(_DECODERS)} decoders (InternVL3, InternVL3.5) are supported")
  if config.get("ps_version", "v2") != "v2":
    raise ValueError(f"{path}: ps_version {config['ps_version']!r}; only InternVL's v2 pixel shuffle is supported")
  image_size = config.get("force_image_size") or v.get("image_size", 448)
  vision = dict(v, image_size=image_size,
                attention_bias=v.get("qkv_bias", False),  # InternVisionConfig's defaults when absent
                use_qk_norm=v.get("qk_normalization", False),
                norm_type=v.get("norm_type", "rms_norm"))
  tie = t.get("tie_word_embeddings", False)
  return {
      "model_type": "internvl",
      "architectures": ["InternVLForConditionalGeneration"],
      "vision_config": vision,
      "text_config": t,
      "tie_word_embeddings": tie,
      "downsample_ratio": config.get("downsample_ratio", 0.5),
      "vision_feature_layer": config.get("select_layer", -1),
      "image_token_id": image_token_id(path, t["model_type"]),
  }


def image_token_id(path: str | Path, decoder: str) -> int:
  """<IMG_CONTEXT>'s id from the directory's tokenizer files (tokenizer.json, tokenizer_config.json,
  added_tokens.json); without them, the conversion script's constant for Qwen2 decoders."""
  path = Path(path)
  sources = (("tokenizer.json", lambda d: {a["content"]: a["id"] for a in d.get("added_tokens", [])}),
             ("tokenizer_config.json",
              lambda d: {a["content"]: int(i) for i, a in (d.get("added_tokens_decoder") or {}).items()}),
             ("added_tokens.json", lambda d: d))
  for name, table in sources:
    file = path / name
    if file.is_file():
      found = table(json.loads(file.read_text(encoding="utf-8"))).get(_IMAGE_TOKEN)
      if found is not None:
        return int(found)
  if decoder == "qwen2":
    return _QWEN2_IMAGE_TOKEN_ID
  raise ValueError(f"{path}: no {_IMAGE_TOKEN} token in tokenizer.json, tokenizer_config.json or "
                   "added_tokens.json; the image token id of this original checkpoint is unknown")


def hf_name(key: str) -> str:
  """The `-hf` on-disk name of an original tensor name (unknown names come back unchanged)."""
  if key.startswith("vision_model."):
    for pattern, replacement in _VISION_RENAMES:
      key = pattern.sub(replacement, key)
    return key
  for old, new in _PROJECTOR.items():
    if key.startswith(old):
      return new + key[len(old):]
  return key


class HFView:
  """A safetensors handle of an original checkpoint seen with `-hf` names: `keys()` and `get_tensor()`."""

  def __init__(self, handle, vision_hidden_size: int):
    self._handle = handle
    self._dim = vision_hidden_size
    self._source: dict[str, tuple[str, int | None]] = {}  # -hf name -> (original name, q/k/v index)
    for key in handle.keys():
      name = hf_name(key)
      m = _QKV.match(name)
      if m:
        for i, part in enumerate("qkv"):
          self._source[f"{m.group(1)}{part}_proj.{m.group(2)}"] = (key, i)
      else:
        self._source[name] = (key, None)

  def keys(self) -> Iterator[str]:
    return iter(self._source)

  def get_tensor(self, name: str):
    key, part = self._source[name]
    x = self._handle.get_tensor(key)
    if part is None:
      return x
    if x.shape[0] != 3 * self._dim:
      raise ValueError(f"{key}: fused q/k/v of {x.shape[0]} rows, expected 3 x vision hidden size {self._dim}")
    return x[part * self._dim:(part + 1) * self._dim]
