"""The one exception type users see: what went wrong, where, and how to fix it."""

from __future__ import annotations


class TokentuneError(Exception):
    """A user-facing error. `where` names a file/line/field or config key; `fix` says what to do."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        parts = [what]
        if where:
            parts.append(f"  where: {where}")
        if fix:
            parts.append(f"  fix:   {fix}")
        super().__init__("\n".join(parts))


def nearest(word: str, candidates) -> str | None:
    """The closest candidate to `word` (for 'did you mean' hints), or None."""
    import difflib

    match = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.5)
    return match[0] if match else None


def did_you_mean(word: str, candidates) -> str:
    guess = nearest(word, candidates)
    valid = ", ".join(sorted(str(c) for c in candidates)) or "(none registered)"
    return (f"did you mean '{guess}'? " if guess else "") + f"valid: {valid}"
