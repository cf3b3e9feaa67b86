"""KV cache transfer from prefill workers into decode workers' paged KV memory.

The decode worker reserves destination blocks and owns a :class:`KVReceiver` per request; the
prefill worker owns a :class:`KVSender` per request and writes every computed layer's blocks
straight into the decode worker's kv tensor, then finishes with a small payload (e.g. the first
token). One :class:`KVTransferEngine` per process owns the registered kv tensor and the
connections; the control plane carries ``handshake_info()`` bytes between engines and the
request's block ids to the prefill side. See ``base`` for the full sequence, ``nixl_backend``
(one-sided RDMA/NVLink/shared-memory WRITEs) and ``tcp_backend`` (streaming fallback).

    engine = create_engine("nixl", kv, config=TransferConfig(model="llama"))
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .base import (FAILURE_REASONS, KVPoll, KVReceiver, KVSender, KVTransferEngine, PeerHandle,
                   TransferConfig, TransferError)
from .layout import BlockRun, KVLayout, LayoutMismatch, byte_ranges, merge_runs

BACKENDS = ("nixl", "tcp")

__all__ = ["BACKENDS", "FAILURE_REASONS", "BlockRun", "KVLayout", "KVPoll", "KVReceiver",
           "KVSender", "KVTransferEngine", "LayoutMismatch", "PeerHandle", "TransferConfig",
           "TransferError", "byte_ranges", "create_engine", "merge_runs", "nixl_available"]


def create_engine(backend: str, kv: torch.Tensor, *, name: Optional[str] = None,
                  config: Optional[TransferConfig] = None, **backend_kwargs: Any) -> KVTransferEngine:
    """The per-process engine for ``backend`` ("nixl" | "tcp") over the engine's kv tensor.

    backend_kwargs go to the backend: nixl ``nixl_backends=("UCX",)``; tcp ``host``, ``port``,
    ``advertise_host``, ``chunk_bytes``.
    """
    if backend == "nixl":
        from .nixl_backend import NixlEngine
        return NixlEngine(kv, name=name, config=config, **backend_kwargs)
    if backend == "tcp":
        from .tcp_backend import TcpEngine
        return TcpEngine(kv, name=name, config=config, **backend_kwargs)
    raise ValueError(f"unknown kv transfer backend {backend!r}; choose from {BACKENDS}")


def nixl_available() -> Optional[str]:
    """None when nixl imports, else why it does not."""
    try:
        from nixl._api import nixl_agent  # noqa: F401
    except Exception as e:  # ImportError, or a missing shared library
        return f"{type(e).__name__}: {e}"
    return None
