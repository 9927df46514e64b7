class CompressError(Exception):
    """A problem loading, calibrating, quantizing or pruning a model, with a message that says what to do."""
