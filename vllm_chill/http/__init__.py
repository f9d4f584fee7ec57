"""The HTTP mechanics under the middleware: ASGI helpers, OpenAI-shaped errors, finding the
model in a request body, and the streaming upstream client. Internal: the public seam is
`vllm_chill.UpstreamTransport`."""
