"""The one exception type the project raises for bad input and runtime failures."""


class NTransformerError(Exception):
    """Raised for every user-facing failure; the message is one line naming the problem."""


class ModelFileError(NTransformerError):
    """The model file is missing, unreadable, malformed, or describes an unsupported model."""


class InputError(NTransformerError):
    """An argument or option has a value that makes no sense (prompt too long, bad budget, ...)."""


def one_line(e: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message` (cut at `limit` characters), for warnings that name
    why a fallback was taken."""
    text = str(e)
    return f"{type(e).__name__}: {text.splitlines()[0][:limit] if text.strip() else ''}"
