"""OpenAI-compatible API: protocol (shapes), service (model resolution, payloads, responses), router (HTTP)."""
