"""Attention over the paged KV cache, behind one interface with two backends.

The model runner describes each step once (`StepMetadata`: which tokens belong to which sequence,
where each new token's K/V goes, which blocks each sequence reads), calls `backend.plan(meta)`,
then the model calls `backend.forward(layer, q, k, v, kv_layer)` for every layer. `torch` is the
portable reference (CPU, and GPUs without flashinfer); `flashinfer` runs paged prefill/decode
kernels on CUDA and supports CUDA graphs for decode.
"""

from tandem.engine.attention.base import AttentionBackend, StepMetadata, write_kv
from tandem.engine.attention.torch_backend import TorchAttention


def create_backend(name: str, device, cfg, block_size: int) -> AttentionBackend:
    if name == "auto":
        name = "flashinfer" if device.type == "cuda" and flashinfer_available() else "torch"
    if name == "torch":
        return TorchAttention(cfg, block_size)
    if name == "flashinfer":
        if device.type != "cuda":
            raise ValueError("the flashinfer attention backend needs a CUDA device")
        from tandem.engine.attention.flashinfer_backend import FlashInferAttention
        return FlashInferAttention(cfg, block_size, device)
    raise ValueError(f"unknown attention backend {name!r}; choose auto, flashinfer or torch")


def flashinfer_available() -> bool:
    try:
        import flashinfer  # noqa: F401
        return True
    except Exception:
        return False


__all__ = ["AttentionBackend", "StepMetadata", "TorchAttention", "create_backend", "write_kv"]
