"""The one exception type for mistakes a user can fix."""


class CharLSTMError(Exception):
    """A problem with the user's input, files or settings.

    Its message is a single line that says what is wrong and what to do; the CLI prints it
    as ``error: <message>`` and exits with status 2, without a traceback.
    """
