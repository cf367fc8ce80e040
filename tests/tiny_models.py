"""Tiny configs of every supported architecture (random weights, no downloads) and matching inputs."""
from __future__ import annotations

import torch
import transformers as tf

VOCAB = 96
IMAGE_TOKEN = 90


def _llama_text(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
    base.update(kw)
    return base


def _clip_vision(**kw):
    base = dict(hidden_size=24, intermediate_size=36, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                patch_size=4, projection_dim=16)
    base.update(kw)
    return base


def build(name: str, seed: int = 0):
    """Build the tiny model ``name`` (a key of ARCHS) in float32 eval mode."""
    torch.manual_seed(seed)
    model = ARCHS[name][0]()
    return model.eval()


def _llava():
    cfg = tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(**_clip_vision()), text_config=tf.LlamaConfig(**_llama_text()),
                         image_token_index=IMAGE_TOKEN, vision_feature_layer=-1, projector_hidden_act="gelu")
    return tf.LlavaForConditionalGeneration(cfg)


def _llava_next():
    cfg = tf.LlavaNextConfig(vision_config=tf.CLIPVisionConfig(**_clip_vision()), text_config=tf.LlamaConfig(**_llama_text()),
                             image_token_index=IMAGE_TOKEN, vision_feature_layer=-1, image_grid_pinpoints=[[16, 16]])
    return tf.LlavaNextForConditionalGeneration(cfg)


def _idefics2():
    cfg = tf.Idefics2Config(
        vision_config=dict(hidden_size=24, intermediate_size=36, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=4),
        perceiver_config=dict(hidden_size=32, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                              resampler_head_dim=8, num_key_value_heads=1),
        text_config=dict(model_type="mistral", **_llama_text()), image_token_id=IMAGE_TOKEN)
    return tf.Idefics2ForConditionalGeneration(cfg)


def _idefics3():
    cfg = tf.Idefics3Config(
        vision_config=dict(hidden_size=24, intermediate_size=36, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=4),
        text_config=dict(model_type="llama", **_llama_text()), image_token_id=IMAGE_TOKEN, scale_factor=2)
    return tf.Idefics3ForConditionalGeneration(cfg)


def _qwen2_vl():
    cfg = tf.Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        text_config=dict(**_llama_text(), rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        image_token_id=IMAGE_TOKEN, vision_start_token_id=91, vision_end_token_id=92, video_token_id=93)
    return tf.Qwen2VLForConditionalGeneration(cfg)


def _qwen2_5_vl():
    cfg = tf.Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3, fullatt_block_indexes=[1],
                           window_size=16),
        text_config=dict(**_llama_text(), rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        image_token_id=IMAGE_TOKEN, vision_start_token_id=91, vision_end_token_id=92, video_token_id=93)
    return tf.Qwen2_5_VLForConditionalGeneration(cfg)


ARCHS = {
    "llava": (_llava, "mm"),
    "llava_next": (_llava_next, "mm"),
    "idefics2": (_idefics2, "mm"),
    "idefics3": (_idefics3, "mm"),
    "qwen2_vl": (_qwen2_vl, "mm"),
    "qwen2_5_vl": (_qwen2_5_vl, "mm"),
    "llama": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_llama_text())), "text"),
    "mistral": (lambda: tf.MistralForCausalLM(tf.MistralConfig(**_llama_text())), "text"),
    "qwen2": (lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_llama_text())), "text"),
    "clip": (lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(**_clip_vision())), "vision"),
    "siglip": (lambda: tf.SiglipVisionModel(tf.SiglipVisionConfig(**_clip_vision())), "vision"),
}


def _image_tokens_and_pixels(name: str, model, batch: int, g: torch.Generator):
    """(number of image tokens per sample, vision kwargs) for one image per sample."""
    if name == "llava":
        return 16, {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    if name == "llava_next":
        pv = torch.randn(batch, 2, 3, 16, 16, generator=g)
        sizes = torch.tensor([[16, 16]] * batch)
        feats = model.model.get_image_features(pixel_values=pv, image_sizes=sizes)
        feats = getattr(feats, "pooler_output", feats)
        return feats[0].shape[0], {"pixel_values": pv, "image_sizes": sizes}
    if name == "idefics2":
        return 4, {"pixel_values": torch.randn(batch, 1, 3, 16, 16, generator=g),
                   "pixel_attention_mask": torch.ones(batch, 1, 16, 16, dtype=torch.bool)}
    if name == "idefics3":
        return 4, {"pixel_values": torch.randn(batch, 1, 3, 16, 16, generator=g),
                   "pixel_attention_mask": torch.ones(batch, 1, 16, 16, dtype=torch.bool)}
    if name in ("qwen2_vl", "qwen2_5_vl"):
        return 4, {"pixel_values": torch.randn(batch * 16, 96, generator=g),
                   "image_grid_thw": torch.tensor([[1, 4, 4]] * batch)}
    raise KeyError(name)


def inputs(name: str, model, batch: int = 2, text_len: int = 7, pad: int = 2, multimodal: bool = True, seed: int = 1):
    """Model kwargs for a tiny model: right-padded text (last sample shorter by ``pad``), with one image per sample
    in front for multimodal models."""
    g = torch.Generator().manual_seed(seed)
    kind = ARCHS[name][1]
    if kind == "vision":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    n_img, extra = (0, {})
    if kind == "mm" and multimodal:
        n_img, extra = _image_tokens_and_pixels(name, model, batch, g)
    ids = torch.randint(3, 80, (batch, n_img + text_len), generator=g)
    ids[:, :n_img] = IMAGE_TOKEN
    att = torch.ones_like(ids)
    if pad:
        ids[-1, -pad:] = 0
        att[-1, -pad:] = 0
    if name in ("qwen2_vl", "qwen2_5_vl") and n_img:
        extra["mm_token_type_ids"] = (ids == IMAGE_TOKEN).long()
    return {"input_ids": ids, "attention_mask": att, **extra}
