"""The one exception type for user mistakes: the CLI prints its message and exits with code 2."""


class UserError(ValueError):
    """Bad input from the user (recipe, file, corpus). The message names the key or file and what to do."""
