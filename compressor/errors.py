"""What the command line reports as one line instead of a traceback.

Every error a user can fix (a recipe key, a model folder, calibration text, an export setting, a step
refusing a model) derives from ``UserError``; its message is one line naming the file, the step and
the key at fault. This module imports nothing, so the command line can catch these errors without
loading the toolkit."""


class UserError(ValueError):
    """A mistake in the user's input; the message says where, in one line."""


class StepError(UserError):
    """A recipe step refused the model or its settings (``recipe.yaml: steps[0].rtn: ...``)."""
