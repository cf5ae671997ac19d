"""Error types shared by every layer.

UserError and its subclasses describe something the caller must fix; the message
says what. Everything else is an internal error, logged with context where caught.
"""


class UserError(Exception):
    """Bad input from a caller; the message says what to fix."""


class NotFoundError(UserError):
    """An id that does not name anything this caller may see."""


class ConflictError(UserError):
    """The request clashes with what the server holds (HTTP 409): a name taken, say."""


class ModelNotFoundError(UserError):
    """A model name or path that does not resolve to a loadable model."""


class ContextError(UserError):
    """An unknown, duplicate or otherwise unusable engine context id."""


class SamplingError(UserError):
    """Sampling settings out of range."""


class PromptTooLongError(UserError):
    """A context would grow past the model's maximum length."""


class KVCacheExhaustedError(Exception):
    """A job needs more KV blocks than the whole pool holds; it cannot ever run."""


class EngineUnavailableError(Exception):
    """An engine could not be reached or died during a request; what it held is lost.

    The manager re-runs the affected call on another engine; with none left, the
    call fails with this error (HTTP 503: the client may resubmit later)."""


class LimitExceededError(UserError):
    """A per-tenant or per-session limit was reached (HTTP 429); the message names the limit."""
