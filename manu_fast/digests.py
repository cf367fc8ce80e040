"""What identifies a profiling run beyond the model's layout: a digest of its weights and of its batches' token ids.

A checkpoint stores both (``manu_fast.profiler.save_checkpoint``) and a distributed merge compares the weights
digest of every rank, so that a resume or merge with other weights of the same architecture, another dtype, or
other / re-batched data is refused instead of mixing two runs' statistics.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

WEIGHT_SAMPLES = 8192  # elements sampled from each parameter


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter's name, dtype and shape and the bytes of WEIGHT_SAMPLES of its elements, taken
    at a stride that is never a multiple of the row length (so every row and many columns are sampled).

    Cheap on any size: one small gather per parameter and one device->host copy per device (docs/ROBUSTNESS.md gives
    its cost). Parameters on the 'meta' device (offloaded by accelerate) enter by name, dtype and shape only."""
    h = hashlib.sha256()
    samples: dict[torch.device, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        h.update(f"{name}:{p.dtype}:{tuple(p.shape)}\0".encode())
        if p.device.type == "meta" or p.numel() == 0:
            continue
        flat = p.detach().reshape(-1)
        stride = max(1, flat.numel() // WEIGHT_SAMPLES)
        if p.dim() > 1 and stride > 1 and stride % p.shape[-1] == 0:
            stride += 1
        samples.setdefault(p.device, []).append(flat[::stride][:WEIGHT_SAMPLES].contiguous().view(torch.uint8))
    for device in sorted(samples, key=str):
        h.update(torch.cat(samples[device]).cpu().numpy().tobytes())
    return h.hexdigest()


class BatchDigests:
    """A running SHA-256 of the token ids and shapes of the batches of each data key, in order.

    ``add`` costs two small reductions on the batch's device and no host sync; the values reach the host only
    when ``digest`` is asked (at a checkpoint), in one copy per device."""

    def __init__(self):
        self._hash: dict[str, "hashlib._Hash"] = {}
        self._pending: dict[str, list[tuple[str, torch.Tensor | None]]] = {}
        self._weights: dict[tuple[int, torch.device], torch.Tensor] = {}

    def _weights_for(self, n: int, device: torch.device) -> torch.Tensor:
        if (n, device) not in self._weights:  # position weights and pseudo-random weights, both below 2**20
            pos = torch.arange(1, n + 1, dtype=torch.int64, device=device)
            self._weights[(n, device)] = torch.stack([pos % (2**20), (pos * 2654435761) % (2**20 - 3) + 1])
        return self._weights[(n, device)]

    def add(self, key: str, batch: dict) -> None:
        ids = batch.get("input_ids")
        shapes = {k: tuple(v.shape) for k, v in sorted(batch.items()) if isinstance(v, torch.Tensor)}
        value = None
        if isinstance(ids, torch.Tensor) and ids.numel():
            flat = ids.reshape(-1).to(torch.int64)
            value = (self._weights_for(flat.numel(), flat.device) * flat).sum(1)
        self._pending.setdefault(key, []).append((repr(shapes), value))

    def digest(self, key: str) -> str:
        """The digest of every batch of ``key`` added so far (hex)."""
        h = self._hash.setdefault(key, hashlib.sha256())
        pending = self._pending.pop(key, [])
        values = [v for _, v in pending if v is not None]
        host = iter(torch.stack([v.to(values[0].device) for v in values]).cpu().tolist() if values else [])
        for shapes, value in pending:
            h.update(shapes.encode())
            if value is not None:
                h.update(repr(next(host)).encode())
        return h.copy().hexdigest()

    def digests(self) -> dict[str, str]:
        return {key: self.digest(key) for key in sorted({*self._hash, *self._pending})}
