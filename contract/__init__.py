"""What the API and the workers agree on, importable by both and free of torch (see ../shared/DESIGN.md).

`jobs` (typed job payloads and results, `ClaimedJob`), `broker` (queue and channel names, event messages),
`catalogue` (the base models), `settings` (every `LOOM_*` setting), `checkpoint_store` / `checkpoint_s3`
(where checkpoint files live).
"""
