"""Validation errors as one line that names the file, the field and what is wrong.

A misspelt key gets a did-you-mean hint from the keys the (nested) model accepts, so that a
typo never silently falls back to a default.
"""

from __future__ import annotations

from pydantic import BaseModel, ValidationError


def _known_aliases(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The keys a model (or nested model at ``loc``) accepts, for did-you-mean hints."""
    current: type[BaseModel] | None = model
    for part in loc[:-1]:
        if current is None or not isinstance(part, str):
            return []
        field = next(
            (f for n, f in current.model_fields.items() if part in (n, f.alias)), None
        )
        ann = field.annotation if field else None
        current = None
        for cand in getattr(ann, "__args__", (ann,)):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                current = cand
    if current is None:
        return []
    return [f.alias or n for n, f in current.model_fields.items()]


def describe_validation_error(
    exc: ValidationError, *, source: str, model: type[BaseModel]
) -> str:
    """One line naming the file, the field and what is wrong with it."""
    errors = exc.errors()
    # A misspelt key is both unknown and (for a required field) missing; naming the unknown
    # key with a did-you-mean tells the user what to fix.
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(err["loc"])
    field = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        import difflib  # only on the way to an error message

        hint = difflib.get_close_matches(str(loc[-1]), _known_aliases(model, loc), n=1)
        suffix = f"; did you mean '{hint[0]}'?" if hint else ""
        return f"{source}: unknown field '{field}'{suffix}"
    if err["type"] == "missing":
        return f"{source}: missing required field '{field}'"
    return f"{source}: field '{field}': {err['msg']}"
