"""Callbacks that bring a :class:`cliptune.Trial` into other frameworks' training loops.

Each lives in its own module and imports its framework there (an optional extra):
``cliptune.integrations.lightning``, ``cliptune.integrations.transformers``,
``cliptune.integrations.keras``.
"""
