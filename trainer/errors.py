"""The one exception type that means "the user can fix this": the CLI turns it into exit code 2."""


class UserError(Exception):
    """A problem with the user's input (config, path, data) described in one line with its fix."""
