"""Tiny configs of every tested architecture (random weights, no downloads) and matching inputs.

``ARCHS`` is the list of families the adapter tests cover (tests/test_adapters.py); the README's "Supported
models" section is checked against it (``supported_models_markdown``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import transformers as tf

VOCAB = 96
IMAGE_TOKEN = 90
START, END, VIDEO_TOKEN = 91, 92, 93  # boundary tokens around an image, and the video placeholder
VIDEO_START, VIDEO_END = 94, 95  # GLM-4.1V: a video's frames are image tokens between these
AUDIO_TOKEN = 89  # Phi-4-multimodal's audio placeholder (its audio tower is left out)


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


def _vision(model_type=None, **kw):
    base = dict(hidden_size=24, intermediate_size=36, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                patch_size=4)
    base.update(kw)
    return dict(base, model_type=model_type) if model_type else base


def _mrope(**kw):
    return dict(**_llama_text(head_dim=8), rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2], **kw})


_QWEN_TOKENS = dict(image_token_id=IMAGE_TOKEN, vision_start_token_id=START, vision_end_token_id=END,
                    video_token_id=VIDEO_TOKEN)


def _llava():
    cfg = tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(**_clip_vision()), text_config=tf.LlamaConfig(**_llama_text()),
                         image_token_index=IMAGE_TOKEN, vision_feature_layer=-1, projector_hidden_act="gelu")
    return tf.LlavaForConditionalGeneration(cfg)


def _llava_next():
    cfg = tf.LlavaNextConfig(vision_config=tf.CLIPVisionConfig(**_clip_vision()), text_config=tf.LlamaConfig(**_llama_text()),
                             image_token_index=IMAGE_TOKEN, vision_feature_layer=-1, image_grid_pinpoints=[[16, 16]])
    return tf.LlavaNextForConditionalGeneration(cfg)


def _llava_onevision():
    cfg = tf.LlavaOnevisionConfig(vision_config=_vision("siglip_vision_model"),
                                  text_config=dict(model_type="qwen2", **_llama_text()),
                                  image_token_index=IMAGE_TOKEN, video_token_index=VIDEO_TOKEN, vision_feature_layer=-1,
                                  image_grid_pinpoints=[[16, 16]])
    return tf.LlavaOnevisionForConditionalGeneration(cfg)


def _vipllava():
    cfg = tf.VipLlavaConfig(vision_config=_vision("clip_vision_model", num_hidden_layers=3),
                            text_config=dict(model_type="llama", **_llama_text()), image_token_index=IMAGE_TOKEN,
                            vision_feature_layers=[-2, -1])
    return tf.VipLlavaForConditionalGeneration(cfg)


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


def _smolvlm():
    cfg = tf.SmolVLMConfig(vision_config=_vision(), text_config=dict(model_type="llama", **_llama_text()),
                           image_token_id=IMAGE_TOKEN, scale_factor=2)
    return tf.SmolVLMForConditionalGeneration(cfg)


def _qwen2_vl():
    cfg = tf.Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        text_config=dict(**_llama_text(), rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}), **_QWEN_TOKENS)
    return tf.Qwen2VLForConditionalGeneration(cfg)


def _qwen2_5_vl():
    cfg = tf.Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3, fullatt_block_indexes=[1],
                           window_size=16),
        text_config=dict(**_llama_text(), rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}), **_QWEN_TOKENS)
    return tf.Qwen2_5_VLForConditionalGeneration(cfg)


def _qwen3_vl():
    cfg = tf.Qwen3VLConfig(
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_position_embeddings=16,
                           deepstack_visual_indexes=[0]),
        text_config=_mrope(mrope_interleaved=True), **_QWEN_TOKENS)
    return tf.Qwen3VLForConditionalGeneration(cfg)


def _glm4v():
    cfg = tf.Glm4vConfig(
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32, patch_size=4,
                           image_size=16, spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        text_config=_mrope(), image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, image_start_token_id=START,
        image_end_token_id=END, video_start_token_id=VIDEO_START, video_end_token_id=VIDEO_END)
    return tf.Glm4vForConditionalGeneration(cfg)


def _paligemma():
    cfg = tf.PaliGemmaConfig(vision_config=_vision("siglip_vision_model", projection_dim=32),
                             text_config=dict(model_type="gemma", **_llama_text(head_dim=8)),
                             image_token_index=IMAGE_TOKEN, projection_dim=32, hidden_size=32, vocab_size=VOCAB)
    return tf.PaliGemmaForConditionalGeneration(cfg)


def _gemma3():
    cfg = tf.Gemma3Config(vision_config=_vision("siglip_vision_model"),
                          text_config=_llama_text(head_dim=8, sliding_window=8), mm_tokens_per_image=4,
                          image_token_index=IMAGE_TOKEN, boi_token_index=START, eoi_token_index=END)
    return tf.Gemma3ForConditionalGeneration(cfg)


def _internvl():
    cfg = tf.InternVLConfig(vision_config=_vision(image_size=[16, 16], patch_size=[4, 4]),
                            text_config=dict(model_type="qwen2", **_llama_text()), image_token_id=IMAGE_TOKEN,
                            image_seq_length=4)
    return tf.InternVLForConditionalGeneration(cfg)


def _aya_vision():
    cfg = tf.AyaVisionConfig(vision_config=_vision("siglip_vision_model"),
                             text_config=dict(model_type="cohere2", **_llama_text(head_dim=8)),
                             image_token_index=IMAGE_TOKEN, downsample_factor=2, alignment_intermediate_size=48)
    return tf.AyaVisionForConditionalGeneration(cfg)


def _mistral3():
    cfg = tf.Mistral3Config(vision_config=_vision("pixtral", head_dim=6),
                            text_config=dict(model_type="mistral", **_llama_text()), image_token_index=IMAGE_TOKEN,
                            spatial_merge_size=2)
    return tf.Mistral3ForConditionalGeneration(cfg)


def _llama4():
    cfg = tf.Llama4Config(
        vision_config=_vision(hidden_size=32, intermediate_size=128, vision_output_dim=32, projector_input_dim=32,
                              projector_output_dim=32, pixel_shuffle_ratio=0.5, rope_theta=10000),
        text_config=_llama_text(head_dim=8, intermediate_size_mlp=48, num_local_experts=2, interleave_moe_layer_step=2),
        image_token_index=IMAGE_TOKEN, boi_token_index=START, eoi_token_index=END)
    return tf.Llama4ForConditionalGeneration(cfg)


def _lfm2_vl():
    vision = {k: v for k, v in _vision("siglip2_vision_model").items() if k != "image_size"}
    cfg = tf.Lfm2VlConfig(vision_config=dict(vision, num_patches=16),
                          text_config=dict(model_type="lfm2", **_llama_text(), layer_types=["conv", "full_attention"]),
                          image_token_id=IMAGE_TOKEN, downsample_factor=2, projector_hidden_size=48)
    return tf.Lfm2VlForConditionalGeneration(cfg)


def _blip2():
    cfg = tf.Blip2Config(
        vision_config=_vision(), num_query_tokens=4, image_token_index=IMAGE_TOKEN,
        qformer_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=40,
                            encoder_hidden_size=24),
        text_config=dict(model_type="opt", vocab_size=VOCAB, hidden_size=32, ffn_dim=40, num_hidden_layers=2,
                         num_attention_heads=4, word_embed_proj_dim=32, pad_token_id=0))
    return tf.Blip2ForConditionalGeneration(cfg)


def _florence2():
    cfg = tf.Florence2Config(
        vision_config=dict(depths=[1, 1], embed_dim=[16, 32], num_heads=[2, 4], num_groups=[2, 4], patch_size=[7, 3],
                           patch_stride=[4, 2], patch_padding=[3, 1], patch_prenorm=[False, True], window_size=2,
                           projection_dim=32, max_position_embeddings=8, max_temporal_embeddings=4),
        text_config=dict(model_type="bart", vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                         encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=40, decoder_ffn_dim=40,
                         max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         decoder_start_token_id=2),
        image_token_id=IMAGE_TOKEN)
    return tf.Florence2ForConditionalGeneration(cfg)


def _git():
    cfg = tf.GitConfig(vision_config=_vision(), vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=40, max_position_embeddings=64, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2)
    return tf.GitForCausalLM(cfg)


def _phi4_multimodal():
    cfg = tf.Phi4MultimodalConfig(
        **_llama_text(), bos_token_id=1, eos_token_id=2,
        vision_config=dict(_vision(), crop_size=16, image_token_id=IMAGE_TOKEN),
        audio_config=dict(num_blocks=1, hidden_size=32, num_attention_heads=4, intermediate_size=48,
                          depthwise_separable_out_channel=32, nemo_conv_channels=32, audio_token_id=AUDIO_TOKEN))
    return tf.Phi4MultimodalForCausalLM(cfg)


def _molmo2():
    cfg = tf.Molmo2Config(
        text_config=dict(_llama_text(head_dim=8), additional_vocab_size=8),
        vision_config=dict(_vision(num_key_value_heads=4, head_dim=6), image_size=[16, 16]),
        adapter_config=dict(vision_feature_layer=[-1], hidden_size=24, num_attention_heads=4, num_key_value_heads=4,
                            head_dim=6, intermediate_size=36, text_hidden_size=32),
        image_start_token_id=START, image_end_token_id=END, image_patch_id=IMAGE_TOKEN, low_res_image_start_token_id=88,
        frame_start_token_id=VIDEO_START, frame_end_token_id=VIDEO_END)
    return tf.Molmo2ForConditionalGeneration(cfg)


def _kosmos2():
    cfg = tf.Kosmos2Config(text_config=dict(vocab_size=VOCAB, embed_dim=32, layers=2, attention_heads=4, ffn_dim=40,
                                            max_position_embeddings=64, pad_token_id=0),
                           vision_config=_vision(), latent_query_num=4)
    return tf.Kosmos2ForConditionalGeneration(cfg)


def _pixels(batch: int, g: torch.Generator):
    return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}


def _tiles(n: int):
    return lambda batch, g: {"pixel_values": torch.randn(batch, n, 3, 16, 16, generator=g),
                             "image_sizes": torch.tensor([[16, 16]] * batch)}


def _idefics_pixels(batch, g):
    return {"pixel_values": torch.randn(batch, 1, 3, 16, 16, generator=g),
            "pixel_attention_mask": torch.ones(batch, 1, 16, 16, dtype=torch.bool)}


def _pixtral_pixels(batch, g):
    return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g), "image_sizes": torch.tensor([[16, 16]] * batch)}


def _qwen_pixels(batch, g, video=False):
    """One 16x16 image (or 1-frame video) per sample as 4x4 flattened patches of 3x2x4x4 values."""
    pixels, grid = ("pixel_values_videos", "video_grid_thw") if video else ("pixel_values", "image_grid_thw")
    return {pixels: torch.randn(batch * 16, 96, generator=g), grid: torch.tensor([[1, 4, 4]] * batch)}


def _siglip2_pixels(batch, g):
    return {"pixel_values": torch.randn(batch, 16, 48, generator=g),
            "pixel_attention_mask": torch.ones(batch, 16, dtype=torch.long),
            "spatial_shapes": torch.tensor([[4, 4]] * batch)}


def _phi4_pixels(batch, g):
    """One 16x16 image per sample: its global crop and one 16x16 sub-crop (13 language-model tokens)."""
    return {"image_pixel_values": torch.randn(batch, 2, 3, 16, 16, generator=g),
            "image_attention_mask": torch.ones(batch, 2, 4, 4), "image_sizes": torch.tensor([[16, 16]] * batch)}


_MOLMO2_TOKENS = 8  # pooled image tokens per sample (image_grids [2, 2, 2, 2])


def _molmo2_pixels(batch, g):
    """16 patches of 4x4x3 values per sample, pooled 4 at a time into _MOLMO2_TOKENS tokens."""
    pool = torch.randint(0, 16, (batch, _MOLMO2_TOKENS, 4), generator=g) + (torch.arange(batch) * 16).view(-1, 1, 1)
    return {"pixel_values": torch.randn(batch, 16, 48, generator=g), "image_token_pooling": pool.view(-1, 4),
            "image_grids": torch.tensor([[2, 2, 2, 2]] * batch), "image_num_crops": torch.ones(batch, dtype=torch.long)}


@dataclass(frozen=True)
class Family:
    """A tested architecture: README title, builder, kind ('mm' | 'text' | 'vision'), pixel kwargs (batch, generator),
    whether inputs wrap image tokens in the config's boundary tokens (START ... END), the language-model token kinds
    its config names, whether it takes 1-frame videos as ``_qwen_pixels(video=True)``, and notes for the README."""

    title: str
    build: Callable
    kind: str = "mm"
    pixels: Callable | None = None
    boundary: bool = False
    kinds: tuple[str, ...] = ("image", "text")
    video: bool = False
    text_only: bool = True  # runs without pixels (BLIP-2's forward needs them)
    moe: bool = False
    notes: str = ""
    # the sequence its language model runs: "ids" (image features at their placeholders), "prefix" (image features
    # in front of the input ids: GIT), "encdec" (an encoder over the input ids, a decoder over decoder_input_ids),
    # "position_mask" (image features at the positions of image_embeds_position_mask: Kosmos-2)
    layout: str = "ids"
    image_tokens: int = 0  # language-model image tokens per sample, when get_image_features cannot tell
    audio: bool = False  # has an audio tower (left out, with a warning)
    # statistics vs the stock model's hooks: a profiling forward's activations differ from the stock modules' by
    # float32 rounding, and a deep vision stack ending in an attention-pooling head can amplify it
    stats_tol: tuple[float, float] = (1e-5, 1e-6)  # (rtol, atol)

    def __getitem__(self, i):  # (builder, kind) like the tuples this table replaced
        return (self.build, self.kind)[i]


_ALL_KINDS = ("image", "video", "special", "text")

ARCHS: dict[str, Family] = {
    "llava": Family("LLaVA 1.5", _llava, pixels=_pixels),
    "llava_next": Family("LLaVA-NeXT", _llava_next, pixels=_tiles(2)),
    "llava_onevision": Family("LLaVA-OneVision", _llava_onevision, pixels=_tiles(2), kinds=("image", "video", "text")),
    "vipllava": Family("VipLLaVA", _vipllava, pixels=_pixels, notes="projector (norm + MLP)"),
    "idefics2": Family("Idefics2", _idefics2, pixels=_idefics_pixels),
    "idefics3": Family("Idefics3", _idefics3, pixels=_idefics_pixels),
    "smolvlm": Family("SmolVLM", _smolvlm, pixels=_idefics_pixels),
    "qwen2_vl": Family("Qwen2-VL", _qwen2_vl, pixels=_qwen_pixels, boundary=True, kinds=_ALL_KINDS, video=True),
    "qwen2_5_vl": Family("Qwen2.5-VL", _qwen2_5_vl, pixels=_qwen_pixels, boundary=True, kinds=_ALL_KINDS, video=True),
    "qwen3_vl": Family("Qwen3-VL", _qwen3_vl, pixels=_qwen_pixels, boundary=True, kinds=_ALL_KINDS, video=True,
                       notes="patch mergers (norm + MLP)"),
    "glm4v": Family("GLM-4.1V", _glm4v, pixels=_qwen_pixels, boundary=True, kinds=_ALL_KINDS, video=True,
                    notes="language MLPs (one gate_up Linear), patch merger (Linear, norm, gated MLP)"),
    "paligemma": Family("PaliGemma", _paligemma, pixels=_pixels,
                        notes="none (the projector is one Linear, not an MLP)"),
    "gemma3": Family("Gemma 3", _gemma3, pixels=_pixels, boundary=True, kinds=("image", "special", "text"),
                     notes="none (the projector has no MLP)"),
    "internvl": Family("InternVL", _internvl, pixels=_pixels, notes="projector (norm + MLP)"),
    "aya_vision": Family("Aya Vision", _aya_vision, pixels=_pixels, notes="projector (norm + SwiGLU from one Linear)"),
    "mistral3": Family("Mistral 3", _mistral3, pixels=_pixtral_pixels,
                       notes="projector (norm + patch merger + MLP)"),
    "llama4": Family("Llama 4", _llama4, pixels=_pixels, boundary=True, kinds=("image", "special", "text"), moe=True,
                     notes="vision adapter (a second activation after fc2); experts left out with `moe='skip'`; "
                           "forward checks skipped on transformers 5.24 (upstream bug), run on 5.17"),
    "lfm2_vl": Family("LFM2-VL", _lfm2_vl, pixels=_siglip2_pixels,
                      notes="projector (norm + MLP), language MLPs (w1/w3/w2, no activation module)"),
    "blip2": Family("BLIP-2", _blip2, pixels=_pixels, text_only=False,
                    notes="Q-Former and OPT decoder layers (they hold their MLP Linears); no text-only forward"),
    "florence2": Family("Florence-2", _florence2, pixels=_pixels, layout="encdec",
                        notes="BART encoder and decoder layers (they hold fc1/fc2); the decoder runs "
                              "decoder_input_ids"),
    "git": Family("GIT", _git, pixels=_pixels, layout="prefix", image_tokens=17,  # CLIP: 4x4 patches + class token
                  notes="BERT-style layers; image features put in front of the text"),
    "phi4_multimodal": Family("Phi-4-multimodal", _phi4_multimodal, pixels=_phi4_pixels, image_tokens=13,
                              kinds=("image", "audio", "text"), audio=True, stats_tol=(1e-4, 1e-5),
                              notes="language MLPs (one gate_up Linear), image projection (Linears around "
                                    "F.gelu); audio tower left out"),
    "molmo2": Family("Molmo2", _molmo2, pixels=_molmo2_pixels, boundary=True, image_tokens=_MOLMO2_TOKENS,
                     kinds=("image", "video", "special", "text"),
                     notes="none (image placeholder `image_patch_id`)"),
    "kosmos2": Family("Kosmos-2", _kosmos2, pixels=_pixels, layout="position_mask", image_tokens=4,
                      text_only=False,
                      notes="language layers' `ffn` (norm inside); image positions marked by "
                            "`image_embeds_position_mask`; no text-only forward"),
    "llama": Family("Llama", lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_llama_text())), "text"),
    "mistral": Family("Mistral", lambda: tf.MistralForCausalLM(tf.MistralConfig(**_llama_text())), "text"),
    "qwen2": Family("Qwen2", lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_llama_text())), "text"),
    "clip": Family("CLIP vision", lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(**_clip_vision())), "vision"),
    "siglip": Family("SigLIP vision", lambda: tf.SiglipVisionModel(tf.SiglipVisionConfig(**_clip_vision())), "vision"),
}


def build(name: str, seed: int = 0):
    """Build the tiny model ``name`` (a key of ARCHS) in float32 eval mode."""
    torch.manual_seed(seed)
    model = ARCHS[name].build()
    return model.eval()


def _image_features(model, pixels: dict) -> int:
    """Number of language-model image tokens per sample for one image per sample (as the model computes them)."""
    base = model.model if hasattr(getattr(model, "model", None), "get_image_features") else model
    with torch.no_grad():
        try:
            f = base.get_image_features(**pixels)
        except TypeError:  # Llama 4 wants its feature choice spelled out
            f = base.get_image_features(**pixels, vision_feature_select_strategy="default", vision_feature_layer=-1)
    for attr in ("pooler_output", "last_hidden_state"):
        if getattr(f, attr, None) is not None and not isinstance(f, torch.Tensor):
            f = getattr(f, attr)
            break
    if isinstance(f, (list, tuple)):
        f = torch.cat([x.reshape(-1, x.shape[-1]) for x in f])
    batch = next(iter(pixels.values())).shape[0]
    if "image_grid_thw" in pixels:
        batch = pixels["image_grid_thw"].shape[0]
    return f.reshape(-1, f.shape[-1]).shape[0] // batch


def image_tokens(name: str, model) -> int:
    fam = ARCHS[name]
    if name == "blip2":  # the Q-Former's query tokens
        return model.config.num_query_tokens
    if fam.image_tokens:
        return fam.image_tokens
    return _image_features(model, fam.pixels(1, torch.Generator().manual_seed(0)))


def inputs(name: str, model, batch: int = 2, text_len: int = 7, pad: int = 2, multimodal: bool = True, seed: int = 1,
           video: bool = False):
    """Model kwargs for a tiny model: right-padded text (last sample shorter by ``pad``), with one image per sample
    in front for multimodal models (wrapped in START/END for families with boundary tokens); ``video``: the
    pixels are given as one 1-frame video per sample instead (Qwen2-VL family)."""
    g = torch.Generator().manual_seed(seed)
    fam = ARCHS[name]
    if fam.kind == "vision":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    n_img, extra, placeholder, start, end = 0, {}, IMAGE_TOKEN, START, END
    if fam.kind == "mm" and multimodal:
        n_img = image_tokens(name, model) if fam.layout != "prefix" else 0  # GIT: no placeholders
        extra = _qwen_pixels(batch, g, video=True) if video else fam.pixels(batch, g)
        if video:
            # GLM-4.1V writes a video's frames with the image token, between its video boundary tokens
            placeholder, start, end = ((IMAGE_TOKEN, VIDEO_START, VIDEO_END) if name == "glm4v"
                                       else (VIDEO_TOKEN, START, END))
    ids = torch.randint(3, 80, (batch, n_img + text_len), generator=g)
    ids[:, :n_img] = placeholder
    if n_img and fam.boundary:
        ids = torch.cat([torch.full((batch, 1), start), ids[:, :n_img], torch.full((batch, 1), end), ids[:, n_img:]], 1)
    att = torch.ones_like(ids)
    if pad:
        ids[-1, -pad:] = 0
        att[-1, -pad:] = 0
    if name in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v", "molmo2") and n_img:
        extra["mm_token_type_ids"] = (ids == placeholder).long() * (2 if video else 1)
    if fam.layout == "position_mask" and n_img:  # Kosmos-2: the positions, not the ids, say where images go
        extra["image_embeds_position_mask"] = ids == placeholder
    if fam.layout == "encdec":  # decoder inputs of another length, the last sample padded
        dec = torch.randint(3, 80, (batch, 5), generator=g)
        dec_att = torch.ones_like(dec)
        dec[-1, -1], dec_att[-1, -1] = 0, 0
        extra.update(decoder_input_ids=dec, decoder_attention_mask=dec_att)
    return {"input_ids": ids, "attention_mask": att, **extra}


def upstream_bug(name: str, model) -> str | None:
    """Why the installed transformers cannot run ``name`` at all (a bug there, not here), else None."""
    if name != "llama4":
        return None
    try:
        with torch.no_grad():
            model(**inputs(name, model, multimodal=False))
    except AttributeError as e:  # transformers 5.24: the output dataclass reads a field the language model lacks
        return f"transformers {tf.__version__}: Llama4ForConditionalGeneration.forward raises {e!r}"
    return None


def supported_models_markdown() -> str:
    """The README's "Supported models" table: every family the adapter tests cover."""
    rows = [f"| {fam.title} | `{name}` | {', '.join(fam.kinds)} | {fam.notes or 'none'} |"
            for name, fam in ARCHS.items() if fam.kind == "mm"]
    others = {kind: ", ".join(f"{fam.title} (`{name}`)" for name, fam in ARCHS.items() if fam.kind == kind)
              for kind in ("text", "vision")}
    return ("| family | model type | language-model token kinds | MLPs patched by hooks (MLP parts) |\n"
            "| --- | --- | --- | --- |\n" + "\n".join(rows)
            + f"\n\nText-only LLMs: {others['text']}. Bare vision encoders: {others['vision']}.\n")
