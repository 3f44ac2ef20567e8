"""Base model families Loom can serve, and how their weights and tokenizers are found on local disk."""
