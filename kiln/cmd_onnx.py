"""Commands of this stage (filled in by its package)."""
COMMANDS: list = []
