"""The one exception type the CLI turns into a single clear line and a non-zero exit."""


class UserError(Exception):
    """A mistake the user can fix: bad file, unknown key, impossible option."""


def first_line(e: BaseException, limit: int = 1000) -> str:
    """The first non-empty line of e's message (its type's name if it has none), whole: a reason
    is not cut mid-sentence. Only a runaway line, such as a file's content echoed back, is
    shortened, at a word boundary and marked with an ellipsis."""
    line = next((l.strip() for l in str(e).splitlines() if l.strip()), type(e).__name__)
    if len(line) <= limit:
        return line
    return line[:limit].rsplit(" ", 1)[0] + " …"
