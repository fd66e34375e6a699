"""Front doors over a Runtime: the stdio protocol, the OpenAI-style HTTP server, Ray Serve, /metrics."""
