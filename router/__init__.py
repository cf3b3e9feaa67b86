"""The cache-aware router: the OpenAI-compatible HTTP API and the gRPC ``tandem.v1.Router``
service in one process, choosing a prefill and a decode replica for every request."""
