"""agentrm: reward models that guide LLM agents at test time."""

__version__ = "0.1.0"
