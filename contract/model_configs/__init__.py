"""The published `config.json` files `contract/published_models.py` lists, kept as data (nothing to import)."""
