"""The error type for bad user input: its message is one line naming the problem and the fix."""


class UserInputError(ValueError):
    """Raised for input a user can fix; the CLI prints it without a traceback."""
