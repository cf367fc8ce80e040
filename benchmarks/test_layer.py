"""Level "layer": one real HF MLP with statistics gathered on its hidden neurons, all peers.

Cases: LLaVA-1.5-7B's language MLP (LlamaMLP 4096/11008, SiLU) and its CLIP ViT-L/14 MLP (1024/4096, quick_gelu);
bf16 on GPU, fp32 and bf16 on CPU. On GPU, Liger-Kernel's SwiGLU MLP (fused activation, no statistics) is
added for the gated MLP when it is importable. The layer is hosted as a one-MLP model so every peer runs
exactly as it would on a whole model (hooks on down_proj/fc2, or manu_fast's Profiler).
"""
from __future__ import annotations

import pytest
import torch

from .harness import measure_peers
from .peers import NUM_KEYS, assert_blocks_close, model_peers, model_peers_checked, tolerances
from .workloads import IMAGE_TOKEN, LLAVA_LM, MLPHost, build_mlp, dtype_name, mlp_batches

CASES = ("llava-lm-mlp", "clip-vit-l-mlp")
DTYPES = (torch.float32, torch.bfloat16)


def liger_swiglu(mlp, device):
    """Liger-Kernel's SwiGLU MLP with ``mlp``'s weights, or None where it is not installed (or not on CUDA)."""
    if device.type != "cuda":
        return None
    try:
        import transformers as tf
        from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    except ImportError:
        return None
    liger = LigerSwiGLUMLP(tf.LlamaConfig(**LLAVA_LM)).to(device, mlp.down_proj.weight.dtype)
    liger.load_state_dict(mlp.state_dict())
    return liger.eval()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("case", CASES)
def test_layer(results, device, sizes, case, dtype):
    if dtype not in sizes.layer_dtypes:
        pytest.skip(f"{dtype_name(dtype)} not benchmarked on {device.type} in this mode")
    tokens = sizes.layer_tokens[case]
    mlp = build_mlp(case, device, dtype)
    host = MLPHost(mlp)
    out_linear = mlp.fc2 if case == "clip-vit-l-mlp" else mlp.down_proj
    neurons, hidden = out_linear.in_features, out_linear.out_features
    batches = mlp_batches(case, tokens, hidden, NUM_KEYS, device, dtype)  # one per data key: 8 token groups
    shapes = f"{NUM_KEYS}x{tokens}x{hidden}->{neurons}"

    fns = {p.name: (lambda p=p: p.run(host, batches)) for p in model_peers(IMAGE_TOKEN)}
    liger = liger_swiglu(mlp, device) if case == "llava-lm-mlp" else None
    if liger is not None:
        def liger_fn():
            with torch.no_grad():
                return [liger(b.kwargs["x"]) for b in batches]
        fns["liger-swiglu"] = liger_fn
    runs, peaks, timings = measure_peers(fns, device, sizes.time_s)
    rtol, active_rtol = tolerances(dtype)
    for name in model_peers_checked(runs):
        assert_blocks_close(runs["fused"].blocks["mlp"], runs[name].blocks["mlp"], rtol, active_rtol,
                            f"{case} {dtype_name(dtype)}: fused vs {name}")
    entries = [{"peer": name, "timing": timings[name], "peak_bytes": peaks[name],
                "held_bytes": 0 if name == "liger-swiglu" else runs[name].held_bytes,
                "note": "fused activation, no statistics" if name == "liger-swiglu" else "",
                "shapes": shapes, "dtype": dtype_name(dtype)} for name in fns]
    results.report("layer", case, f"One MLP layer ({case}), {NUM_KEYS} batches of {tokens} tokens (one per data key, "
                   f"{2 * NUM_KEYS} token groups), statistics of the hidden neurons", entries)
