class EngineError(Exception):
    """A problem with an artifact or a generation request, with a message that says what to do."""
