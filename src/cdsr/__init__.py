"""cdsr: cross-domain sequential recommendation, from raw Amazon-style files to served models."""

from cdsr import env as _env  # noqa: F401  (offline/quiet settings before any tool is imported)

__version__ = "0.1.0"
