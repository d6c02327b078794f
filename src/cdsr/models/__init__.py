"""Models: one file per model behind the interface of ``cdsr.models.base``; see registry.py."""
