"""llmkiln runtime: load a compiled artifact and generate, stream, score or serve. Never imports torch."""
from .errors import EngineError

__all__ = ["Engine", "EngineError"]


def __getattr__(name):
    if name == "Engine":
        from .engine import Engine

        return Engine
    raise AttributeError(name)
