"""The one exception type that reaches users as a clean message instead of a traceback."""


class UserError(Exception):
    """Bad input or environment the user can fix: the CLI prints it in one line and exits 2.

    The message should name the problem (file, field, value) and the fix.
    """
