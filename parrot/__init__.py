"""parrot-serve: serve LLM applications with Semantic Variables."""

__version__ = "0.1.0"
