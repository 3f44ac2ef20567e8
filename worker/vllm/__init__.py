"""Sampling through a vLLM server: `server` runs it, `client` talks to it, `adapters` registers LoRA adapters with
it, `engine` turns sample jobs into its requests (`VllmSamplingEngine`, chosen by `LOOM_SAMPLER_BACKEND=vllm`).

Nothing here imports vllm or torch: vLLM runs in its own virtual environment as a child process, reached over HTTP.
"""
