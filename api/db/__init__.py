"""Loom's persistence layer: SQLAlchemy models, engines and the stores built on them.

Imported by both ``api/`` and ``worker/``; imports nothing else of ours. The schema
is owned by the Alembic migrations in ``migrations/`` (``session.upgrade_to_head``);
nothing here calls ``create_all``.
"""
