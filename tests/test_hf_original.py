"""Original-layout InternVL checkpoints (InternVLChatModel) load into the same model as the -hf ones.

The original-layout writer below works from the -hf side and shares nothing with the loader
(facellm_jax/hf_original.py): its own renames, written from the facts of transformers'
convert_internvl_weights_to_hf.py read backwards, q/k/v fused back into `attn.qkv`, and the
config rewritten as InternVLChatConfig lays it out (`vision_config` / `llm_config`).
"""

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from facellm_jax import hf
from hf_tiny import IMAGE_TOKEN_ID, hf_logits, make_hf_model, random_inputs, rel_err

VARIANTS = {
    "300m-style": dict(),  # LayerNorm, q/k/v bias, untied head
    "6b-style": dict(norm="rms_norm", qk_norm=True, tie=True, kv_heads=1, image_size=84, feature_layer=-2),
}
# -hf on-disk name -> original name, per piece (transformers >= 5 writes its in-memory names first).
IN_MEMORY = [("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."),
             ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")]
TO_ORIGINAL = [("vision_tower.", "vision_model."), (".encoder.layer.", ".encoder.layers."),
               (".embeddings.cls_token", ".embeddings.class_embedding"),
               (".embeddings.position_embeddings", ".embeddings.position_embedding"),
               (".embeddings.patch_embeddings.projection.", ".embeddings.patch_embedding."),
               (".lambda_1", ".ls1"), (".lambda_2", ".ls2"),
               (".attention.projection_layer.", ".attn.proj."), (".attention.", ".attn."),
               (".layernorm_before.", ".norm1."), (".layernorm_after.", ".norm2."),
               ("multi_modal_projector.layer_norm.", "mlp1.0."), ("multi_modal_projector.linear_1.", "mlp1.1."),
               ("multi_modal_projector.linear_2.", "mlp1.3.")]


def write_original(hf_dir, out, token_file="added_tokens.json"):
  """An InternVLChatModel directory holding the same weights as the -hf directory `hf_dir`."""
  tensors = {}
  for name, x in load_file(str(hf_dir / "model.safetensors")).items():
    for new, old in IN_MEMORY:
      if name.startswith(new):
        name = old + name[len(new):]
        break
    if name.startswith(("vision_tower.", "multi_modal_projector.")):
      for a, b in TO_ORIGINAL:
        name = name.replace(a, b)
    tensors[name] = x
  for name in [k for k in tensors if re.search(r"\.attn\.q_proj\.(weight|bias)$", k)]:
    parts = [tensors.pop(name.replace(".q_proj.", f".{p}_proj.")) for p in "qkv"]
    tensors[name.replace(".q_proj.", ".qkv.")] = np.concatenate(parts, axis=0)
  assert not any("_proj" in k for k in tensors if k.startswith("vision_model."))
  out.mkdir()
  save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

  c = json.loads((hf_dir / "config.json").read_text())
  v, t = c["vision_config"], c["text_config"]
  rope = t.get("rope_theta") or t["rope_parameters"]["rope_theta"]
  tie = c.get("tie_word_embeddings", t.get("tie_word_embeddings", False))
  original = {
      "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
      "auto_map": {"AutoModel": "modeling_internvl_chat.InternVLChatModel"},  # never executed
      "downsample_ratio": c["downsample_ratio"], "select_layer": c["vision_feature_layer"], "ps_version": "v2",
      "template": "internvl2_5", "force_image_size": v["image_size"], "dynamic_image_size": True,
      "use_thumbnail": True, "min_dynamic_patch": 1, "max_dynamic_patch": 12,
      "vision_config": {
          "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": v["hidden_size"],
          "intermediate_size": v["intermediate_size"], "num_hidden_layers": v["num_hidden_layers"],
          "num_attention_heads": v["num_attention_heads"], "image_size": v["image_size"],
          "patch_size": v["patch_size"], "num_channels": 3, "qkv_bias": v["attention_bias"],
          "qk_normalization": v["use_qk_norm"], "norm_type": v["norm_type"], "layer_norm_eps": v["layer_norm_eps"],
          "hidden_act": "gelu", "initializer_factor": 0.1, "drop_path_rate": 0.0, "use_flash_attn": False},
      "llm_config": {
          "architectures": ["Qwen3ForCausalLM" if t["model_type"] == "qwen3" else "Qwen2ForCausalLM"],
          "model_type": t["model_type"], "vocab_size": t["vocab_size"], "hidden_size": t["hidden_size"],
          "intermediate_size": t["intermediate_size"], "num_hidden_layers": t["num_hidden_layers"],
          "num_attention_heads": t["num_attention_heads"], "num_key_value_heads": t["num_key_value_heads"],
          "head_dim": t["head_dim"], "rope_theta": rope, "rms_norm_eps": t["rms_norm_eps"],
          "max_position_embeddings": t["max_position_embeddings"], "tie_word_embeddings": tie,
          "hidden_act": t["hidden_act"]},
  }
  (out / "config.json").write_text(json.dumps(original))
  if token_file == "added_tokens.json":
    (out / token_file).write_text(json.dumps({"<IMG_CONTEXT>": IMAGE_TOKEN_ID}))
  else:
    (out / token_file).write_text(json.dumps({"added_tokens_decoder": {
        str(IMAGE_TOKEN_ID): {"content": "<IMG_CONTEXT>", "special": True}}}))
  return out


@pytest.fixture(scope="module", params=list(VARIANTS))
def layouts(request, tmp_path_factory):
  torch_model = make_hf_model(**VARIANTS[request.param])
  root = tmp_path_factory.mktemp(request.param)
  torch_model.save_pretrained(root / "hf")
  token_file = "added_tokens.json" if request.param == "300m-style" else "tokenizer_config.json"
  return torch_model, root / "hf", write_original(root / "hf", root / "original", token_file)


def test_original_layout_gives_the_same_model_and_logits(layouts):
  torch_model, hf_dir, original_dir = layouts
  model_hf, config_hf = hf.load_pretrained(hf_dir)
  model, config = hf.load_pretrained(original_dir)
  assert config == config_hf  # told apart from config.json alone; same architecture
  ids, pixels = random_inputs(config.vision.image_size, config.image_seq_length)
  ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(pixels)))
  assert rel_err(ours, model_hf(jnp.asarray(ids), jnp.asarray(pixels))) <= 1e-5
  assert rel_err(ours, hf_logits(torch_model, ids, pixels)) <= 1e-4


def test_export_of_an_original_checkpoint_is_the_hf_layout(layouts, tmp_path):
  _, hf_dir, original_dir = layouts
  model, config = hf.load_pretrained(original_dir)
  hf.save_pretrained(model, config, tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["InternVLForConditionalGeneration"]
  assert set(load_file(str(tmp_path / "model.safetensors"))) == set(hf.export_state(hf.load_pretrained(hf_dir)[0]))


def test_unsupported_original_configs_say_why(layouts, tmp_path):
  _, _, original_dir = layouts
  base = json.loads((original_dir / "config.json").read_text())
  cases = [({"ps_version": "v1"}, "only InternVL's v2 pixel shuffle"),
           ({"llm_config": dict(base["llm_config"], model_type="internlm2")}, "'internlm2'; only qwen2 and qwen3")]
  for i, (change, message) in enumerate(cases):
    bad = tmp_path / str(i)
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(dict(base, **change)))
    with pytest.raises(ValueError, match=message):
      hf.read_config(bad)


def test_a_missing_fused_qkv_is_reported_with_the_hf_names(layouts, tmp_path):
  _, _, original_dir = layouts
  tensors = load_file(str(original_dir / "model.safetensors"))
  del tensors["vision_model.encoder.layers.0.attn.qkv.weight"]
  bad = tmp_path / "bad"
  bad.mkdir()
  save_file(tensors, str(bad / "model.safetensors"))
  for name in ("config.json", "added_tokens.json", "tokenizer_config.json"):
    if (original_dir / name).exists():
      (bad / name).write_text((original_dir / name).read_text())
  with pytest.raises(hf.CheckpointMismatchError) as error:
    hf.load_pretrained(bad)
  assert "missing: vision.layers.0.attn.q_proj.kernel" in str(error.value)
  assert "missing: vision.layers.0.attn.v_proj.kernel" in str(error.value)
