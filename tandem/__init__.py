"""Tandem: disaggregated prefill/decode LLM serving.

The distribution maps top-level folders into this namespace (see pyproject.toml):
``engine/`` is :mod:`tandem.engine`, and so on for the other components.
"""

__version__ = "0.1.0"
