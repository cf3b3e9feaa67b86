"""The cache-aware router: the OpenAI-compatible HTTP API and the gRPC ``tandem.v1.Router``
service in one process, choosing a prefill and a decode replica for every request.

Modules, in the order a request meets them:
  cli              `tandem router`: flags, start-up, drain on SIGTERM
  http_server      aiohttp: /v1/completions, /v1/chat/completions (SSE), /v1/models, /health,
                   /ready, /metrics, /openapi.json (openapi)
  grpc_server      tandem.v1.Router (Generate, ListModels), gRPC health, reflection
  openai_protocol  request bodies -> token ids + SamplingParams (validation, context check)
  frontend         admission queue, placement.choose -> DecodeWorker.Generate, retries, metrics
  openai_format    deltas -> OpenAI bodies / stream chunks / logprobs / usage
  errors           what each failure answers (HTTP status, OpenAI error shape, gRPC code)
  types            the contract with placement (Placement, Decision, Replica)
  placement        the real placement (prefix index, policies, discovery), where installed;
  simple_placement else this fallback (static endpoints, round-robin / least-load)
"""
