"""What is benchmarked, per mode and device: shapes, token counts, the LLaVA model and the lone-MLP host.

Quick mode (default) is sized for CI: the whole suite in < 3 minutes on 2 CPU cores. Full mode
(MANU_FAST_BENCH_MODE=full) uses the real LLaVA-1.5-7B widths everywhere and GPU-sized token counts.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import transformers as tf
from torch import nn

from manu_fast.adapters import MODEL_TABLE, ModelSpec, register_model

from .peers import NUM_KEYS, Batch

IMAGE_TOKEN = 32000  # LLaVA-1.5's <image> id
VOCAB = 32064
LLAVA_LM = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
CLIP_VIT_L = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, image_size=336, patch_size=14)
# The CPU quick-mode model: the same architecture with every width divided by 8 and a 112 px image (64 patches).
REDUCED_LM = dict(hidden_size=512, intermediate_size=1376, num_attention_heads=4, num_key_value_heads=4)
REDUCED_VIT = dict(hidden_size=128, intermediate_size=512, num_attention_heads=2, image_size=112, patch_size=14)


@dataclass(frozen=True)
class ModelCase:
    lm: dict
    vit: dict
    text_layers: int
    vision_layers: int
    batch: int
    text_tokens: int
    batches_per_pass: int

    @property
    def label(self) -> str:
        widths = "7B widths" if self.lm == LLAVA_LM else "widths/8"
        return f"llava {widths} L{self.text_layers}+V{self.vision_layers}"

    @property
    def image_tokens(self) -> int:
        return (self.vit["image_size"] // self.vit["patch_size"]) ** 2


@dataclass(frozen=True)
class Sizes:
    op_shapes: tuple[tuple[int, int, torch.dtype], ...]  # (tokens, neurons, dtype)
    layer_tokens: dict                                   # MLP case name -> tokens per batch (one batch per data key)
    layer_dtypes: tuple[torch.dtype, ...]
    model: ModelCase                                     # the memory level's model (hooks-store must fit)
    model_dtypes: tuple[torch.dtype, ...]
    memory_passes: tuple[int, ...]                       # batches per profiling pass, growing
    masked_tokens: int
    masked_dtypes: tuple[torch.dtype, ...]
    prune_fractions: tuple[float, ...] = (0.0, 0.02, 0.10, 0.50)
    time_s: float = 1.0                                   # max measuring time per peer and case
    timed_model: ModelCase | None = None                  # the model level's model, when not ``model``
    op_groups: tuple[int, ...] = (2, 8)                   # token groups of the op level's accumulators


def sizes(mode: str, device: torch.device) -> Sizes:
    fp32, bf16 = torch.float32, torch.bfloat16
    if device.type == "cuda":
        # full mode times the whole LLaVA-1.5-7B-width model at full depth (32 + 24 layers), 32 batches of 8 samples
        # per profile() call over the 4 data keys (8 token groups); memory keeps the 4 + 4 layer model, where
        # hooks-store can hold a few batches before running out.
        full = ModelCase(LLAVA_LM, CLIP_VIT_L, text_layers=32, vision_layers=24, batch=8, text_tokens=64,
                         batches_per_pass=32)
        return Sizes(op_shapes=((4096, 11008, fp32), (4096, 11008, bf16), (16384, 11008, bf16)),
                     layer_tokens={"llava-lm-mlp": 8192, "clip-vit-l-mlp": 577 * 16},
                     layer_dtypes=(bf16,),
                     model=ModelCase(LLAVA_LM, CLIP_VIT_L, text_layers=4, vision_layers=4, batch=8, text_tokens=64,
                                     batches_per_pass=4),
                     model_dtypes=(bf16,), memory_passes=(4, 16), masked_tokens=8192, masked_dtypes=(bf16,),
                     prune_fractions=(0.0, 0.02, 0.10, 0.30, 0.50),
                     time_s=2.0 if mode == "full" else 1.0, timed_model=full if mode == "full" else None)
    if mode == "full":
        return Sizes(op_shapes=((4096, 11008, fp32), (4096, 11008, bf16)),
                     layer_tokens={"llava-lm-mlp": 512, "clip-vit-l-mlp": 1154},
                     layer_dtypes=(fp32, bf16),
                     model=ModelCase(LLAVA_LM, CLIP_VIT_L, text_layers=2, vision_layers=2, batch=1, text_tokens=64,
                                     batches_per_pass=NUM_KEYS),
                     model_dtypes=(fp32, bf16), memory_passes=(NUM_KEYS, 2 * NUM_KEYS), masked_tokens=512,
                     masked_dtypes=(fp32, bf16),
                     time_s=4.0)
    return Sizes(op_shapes=((4096, 11008, fp32), (4096, 11008, bf16), (512, 11008, bf16)),
                 layer_tokens={"llava-lm-mlp": 32, "clip-vit-l-mlp": 128},
                 layer_dtypes=(fp32, bf16),
                 model=ModelCase(REDUCED_LM, REDUCED_VIT, text_layers=2, vision_layers=2, batch=2, text_tokens=64,
                                 batches_per_pass=NUM_KEYS),
                 model_dtypes=(fp32,), memory_passes=(NUM_KEYS, 2 * NUM_KEYS), masked_tokens=32, masked_dtypes=(bf16,),
                 time_s=0.5, op_groups=(8,))


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


# ---------------------------------------------------------------- whole model

def build_llava(case: ModelCase, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """LlavaForConditionalGeneration with ``case``'s widths and layer counts, random weights, built on ``device``."""
    torch.manual_seed(seed)
    cfg = tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(num_hidden_layers=case.vision_layers, projection_dim=768, **case.vit),
        text_config=tf.LlamaConfig(vocab_size=VOCAB, num_hidden_layers=case.text_layers, max_position_embeddings=4096,
                                   pad_token_id=0, **case.lm),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu")
    with torch.device(device):
        model = tf.LlavaForConditionalGeneration(cfg)
    return model.to(dtype).eval()


def llava_batches(case: ModelCase, count: int, device: torch.device, dtype: torch.dtype, seed: int = 1) -> list[Batch]:
    """``count`` batches of ``case.batch`` samples: one image (its tokens first) + text, the last sample right-padded;
    batch i belongs to data key i % NUM_KEYS."""
    g = torch.Generator().manual_seed(seed)
    out = []
    size = case.vit["image_size"]
    for i in range(count):
        ids = torch.randint(3, IMAGE_TOKEN, (case.batch, case.image_tokens + case.text_tokens), generator=g)
        ids[:, :case.image_tokens] = IMAGE_TOKEN
        att = torch.ones_like(ids)
        pad = case.text_tokens // 4
        ids[-1, -pad:], att[-1, -pad:] = 0, 0
        pixels = torch.randn(case.batch, 3, size, size, generator=g)
        ids, att = ids.to(device), att.to(device)
        kwargs = {"input_ids": ids, "attention_mask": att, "pixel_values": pixels.to(device, dtype)}
        out.append(Batch(kwargs, ids, att, extra={"use_cache": False, "logits_to_keep": 1}, key=i % NUM_KEYS))
    return out


# ---------------------------------------------------------------- one MLP layer

MLP_HOST_TYPE = "manu_fast_bench_mlp"


class MLPHost(nn.Module):
    """A lone HF MLP as a model manu_fast can patch and profile: ``forward(x) = mlp(x)``, its tokens are language
    tokens whose image/text kind comes from the batch's ``input_ids`` (image token id ``IMAGE_TOKEN``), which the
    forward takes and ignores like a model's layout arguments."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        if MLP_HOST_TYPE not in MODEL_TABLE:
            register_model(MLP_HOST_TYPE, ModelSpec((("language", ""),)))
        self.config = SimpleNamespace(model_type=MLP_HOST_TYPE, image_token_id=IMAGE_TOKEN)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, input_ids=None, attention_mask=None) -> torch.Tensor:
        return self.mlp(x)


def build_mlp(case: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """The real HF MLP module of LLaVA-1.5-7B's language model (LlamaMLP 4096/11008, SiLU) or of its CLIP ViT-L/14
    vision tower (CLIPMLP 1024/4096, quick_gelu), random weights."""
    from transformers.models.clip.modeling_clip import CLIPMLP
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(seed)
    with torch.device(device):
        if case == "llava-lm-mlp":
            mlp = LlamaMLP(tf.LlamaConfig(**LLAVA_LM))
        elif case == "clip-vit-l-mlp":
            mlp = CLIPMLP(tf.CLIPVisionConfig(**CLIP_VIT_L, hidden_act="quick_gelu"))
        else:
            raise ValueError(f"unknown MLP case {case!r}")
    return mlp.to(dtype).eval()


def mlp_batches(case: str, tokens: int, hidden: int, count: int, device: torch.device, dtype: torch.dtype,
                seed: int = 1) -> list[Batch]:
    """Token batches for a lone MLP, batch i of data key i % NUM_KEYS. Language MLP: like a LLaVA sequence (the
    first ~75 % image tokens, then text, the last 1/16 padding). Vision MLP: all image tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        x = torch.randn(tokens, hidden, generator=g).to(device, dtype)
        ids = torch.full((tokens,), 5, dtype=torch.long)
        att = torch.ones(tokens, dtype=torch.long)
        if case == "llava-lm-mlp":
            ids[: tokens * 3 // 4] = IMAGE_TOKEN
            att[tokens - tokens // 16:] = 0
        else:
            ids[:] = IMAGE_TOKEN
        ids, att = ids.to(device), att.to(device)
        out.append(Batch({"x": x, "input_ids": ids, "attention_mask": att}, ids, att, key=i % NUM_KEYS))
    return out
