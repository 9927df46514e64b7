class ExportError(Exception):
    """A problem building, validating or compiling an artifact, with a message that says what to do."""
