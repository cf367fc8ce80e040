"""The demo's model recipe: a tiny LLaVA trained on the synthetic benchmark under fixed numerics, and its cache.

The trained weights are a function of ``ModelConfig``, the recipe's code and the torch/transformers versions only,
not of the CPU: every world trains in a process started with ``NUMERIC_ENV`` (``run_worlds`` does it), where ATen
runs its baseline x86-64 kernels (not the AVX2 / AVX512 ones chosen at run time), MKL its conditional-numerical-
reproducibility code path, oneDNN and NNPACK are off and one thread reduces in a fixed order.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
import os
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..adapters import find_mlps
from ..schema import MODALITIES
from ..synthetic import SyntheticProfiles, num_image_tokens
from .config import ModelConfig

CACHE_ENV = "MANU_FAST_CACHE"
# bump when the layout of the cache or the numerics change (the recipe's code is hashed into the key by itself);
# 6: training under NUMERIC_ENV (the weights no longer depend on the CPU), training record beside the weights
CACHE_FORMAT = 6
# What a world's process must be started with (the variables are read once, when torch and MKL load), so that
# the same configuration trains the same weights bit for bit on every x86-64 CPU with AVX2 or AVX512:
# - ATEN_CPU_CAPABILITY=default: ATen's kernels compiled for baseline x86-64, not the AVX2 / AVX512 builds picked
#   by the CPU (they round differently: the same seed trained three different models under default, avx2, avx512);
# - MKL_CBWR=COMPATIBLE: MKL's reproducible code path on every Intel and compatible CPU (MKL_ENABLE_INSTRUCTIONS=AVX2
#   vs AVX512 trained different models without it, the same with it);
# - one OpenMP / MKL thread: the reduction order of a sum depends on the thread count.
# oneDNN and NNPACK, which pick kernels by CPU as well, are switched off in fixed_numerics (no variable needed).
NUMERIC_ENV = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1"}
DEMO_THREADS = 1
# parameters left at their random initialisation when ModelConfig.mlp_memory is set (see there)
ATTENTION_AND_EMBEDDINGS = ("self_attn", "language_model.embed_tokens")
TRAINING_RECORD = "manu_fast_training.json"
DEMO_CONFIG = "manu_fast_demo.json"  # ModelConfig of the weights; written last, so its presence means complete


def recipe_version() -> dict:
    """What besides ModelConfig decides the trained weights bit for bit: the source code of the recipe (model
    construction, training loop, benchmark generation), the torch/transformers versions and the fixed numerics."""
    import transformers
    recipe = (ModelConfig, benchmark, build_tiny_llava, train_tiny_llava, fixed_numerics, SyntheticProfiles,
              num_image_tokens)
    code = hashlib.sha256("\n".join(inspect.getsource(obj) for obj in recipe).encode()).hexdigest()[:16]
    return {"recipe_code": code, "torch": torch.__version__, "transformers": transformers.__version__,
            "numeric_env": NUMERIC_ENV, "threads": DEMO_THREADS}


@contextlib.contextmanager
def numeric_env():
    """``NUMERIC_ENV`` in os.environ inside the block (for starting world processes), restored after."""
    before = {k: os.environ.get(k) for k in NUMERIC_ENV}
    os.environ.update(NUMERIC_ENV)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def exec_with_numeric_env() -> None:
    """For scripts that train or load demo worlds in their own process: restart this process (same argv) with
    ``NUMERIC_ENV`` unless it already has it; returns only in a process that has it."""
    if any(os.environ.get(k) != v for k, v in NUMERIC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **NUMERIC_ENV})


@contextlib.contextmanager
def fixed_numerics():
    """The recipe's numerics inside the block: refuses a process not started with NUMERIC_ENV; one thread,
    deterministic algorithms, oneDNN and NNPACK off. The caller's settings are restored after."""
    capability = torch.backends.cpu.get_cpu_capability()
    wrong = {k: os.environ.get(k) for k, v in NUMERIC_ENV.items() if os.environ.get(k) != v}
    if capability != "DEFAULT" or wrong:
        raise RuntimeError(f"a demo world must run in a process started with {NUMERIC_ENV} (run_worlds starts one); "
                           f"this one has ATen capability {capability} and {wrong}")
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.mkldnn.enabled
    torch.set_num_threads(DEMO_THREADS)
    torch.use_deterministic_algorithms(True)
    torch.backends.mkldnn.enabled = False  # not mkldnn.flags(): it also sets TF32 options, with a warning
    try:
        with torch.backends.nnpack.flags(enabled=False):
            yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1], warn_only=before[2])
        torch.backends.mkldnn.enabled = before[3]


def benchmark(cfg: ModelConfig) -> SyntheticProfiles:
    return SyntheticProfiles(num_people=cfg.num_people, num_attributes=cfg.num_attributes,
                             values_per_attribute=cfg.values_per_attribute, image_size=cfg.image_size, seed=cfg.seed)


def build_tiny_llava(cfg: ModelConfig, data: SyntheticProfiles):
    """A randomly initialised LlavaForConditionalGeneration of the sizes in ``cfg`` (seeded)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_intermediate,
                              num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.heads,
                              image_size=cfg.image_size, patch_size=cfg.patch_size, projection_dim=cfg.vision_hidden)
    text = LlamaConfig(vocab_size=data.vocab_size, hidden_size=cfg.text_hidden, hidden_act=cfg.text_act,
                       intermediate_size=cfg.text_intermediate, num_hidden_layers=cfg.text_layers,
                       num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads, max_position_embeddings=64,
                       use_cache=False, tie_word_embeddings=False, pad_token_id=data.pad_id,
                       bos_token_id=data.bos_id, eos_token_id=None)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=data.image_id,
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", tie_word_embeddings=False)
    torch.manual_seed(cfg.seed)
    return LlavaForConditionalGeneration(config)


def train_tiny_llava(model, data: SyntheticProfiles, cfg: ModelConfig, progress: bool = True) -> float:
    """AdamW with warm-up and cosine decay on every person's questions in both modalities (all phrasings,
    fresh image noise each step); the loss is the cross-entropy of the answer token. Returns the final training
    loss: the mean per-modality loss over the last tenth of the steps."""
    image_tokens = num_image_tokens(model.config)
    questions = data.questions(range(data.num_people), range(data.num_templates))
    gen = torch.Generator().manual_seed(cfg.seed)
    trained = [p for n, p in model.named_parameters()
               if not (cfg.mlp_memory and any(part in n for part in ATTENTION_AND_EMBEDDINGS))]
    opt = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=0.0)
    warmup = max(1, cfg.train_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / cfg.train_steps)))
    hooks = [getattr(info.module, info.linears[-1]).register_forward_pre_hook(
             lambda lin, args: (torch.nn.functional.dropout(args[0], cfg.mlp_dropout, lin.training),))
             for info in find_mlps(model) if info.tower != "projector" and cfg.mlp_dropout > 0]
    model.train()
    losses = []
    bar = tqdm(range(cfg.train_steps), desc="train tiny LLaVA", disable=not progress)
    for _ in bar:
        loss = 0.0
        for modality in MODALITIES:
            pick = torch.randint(0, len(questions), (cfg.batch_size,), generator=gen).tolist()
            batch = data.batch([questions[i] for i in pick], modality, image_tokens, generator=gen)
            logits = model(**batch.inputs).logits
            rows = torch.arange(logits.shape[0])
            loss = loss + torch.nn.functional.cross_entropy(logits[rows, batch.answer_position], batch.target_ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item() / len(MODALITIES))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    for hook in hooks:
        hook.remove()
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return sum(tail) / len(tail)


def weights_digest(model) -> str:
    """SHA-256 of every parameter and buffer (name, dtype, shape, bytes) in name order: equal digests are
    bit-identical models, so two machines can check they trained the same one."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "manu_fast"))


def load_or_train(cfg: ModelConfig, cache_dir: Path | None = None, progress: bool = True):
    """(model, benchmark, training): the cached trained model for ``cfg``, training and caching it if absent;
    ``training`` is {"final_loss", "trained_now"}. Must run inside ``fixed_numerics``."""
    from transformers import LlavaForConditionalGeneration

    data = benchmark(cfg)
    path = Path(cache_dir or default_cache_dir()) / cfg.key()
    if (path / DEMO_CONFIG).exists():
        record = json.loads((path / TRAINING_RECORD).read_text())
        return LlavaForConditionalGeneration.from_pretrained(path).eval(), data, {**record, "trained_now": False}
    model = build_tiny_llava(cfg, data)
    record = {"final_loss": train_tiny_llava(model, data, cfg, progress)}
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    (path / TRAINING_RECORD).write_text(json.dumps(record))
    (path / DEMO_CONFIG).write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    return model, data, {**record, "trained_now": True}
