"""Model runtime shared by the prefill and decode pools.

Layers, from the outside in: `LLM` (offline API) and `LLMEngine` (the step loop) in
`engine.py`; `Scheduler` (continuous batching) over `BlockPool` (paged KV bookkeeping, prefix
cache); `ModelRunner` (device tensors, CUDA graphs) running `CausalLM` with an attention backend.
"""

from tandem.engine.config import EngineConfig, ModelConfig
from tandem.engine.engine import LLM, GenerationOutput, LLMEngine, RequestOutput
from tandem.engine.errors import InvalidRequestError, ModelLoadError, UnsupportedArchitectureError
from tandem.engine.sampling import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "ModelConfig", "SamplingParams", "GenerationOutput",
           "RequestOutput", "InvalidRequestError", "ModelLoadError", "UnsupportedArchitectureError"]
