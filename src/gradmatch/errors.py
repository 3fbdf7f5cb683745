"""The one error type for things the user got wrong; the CLI turns it into one line and exit 2."""


class UserError(Exception):
    """Bad input: a wrong path, a mismatched shape, a corrupt file, an invalid setting.

    Raise it where the problem is found, with a message that names the file and the tensor.
    The command line prints ``gradmatch: error: <message>`` on one line and exits with status 2.
    """
