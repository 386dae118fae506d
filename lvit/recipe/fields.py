"""Typed recipe fields: lvit's sections built from raw YAML with every type checked, and the `training:` section
checked against `trl.SFTConfig`."""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import types
import typing
from typing import Any, Literal

from lvit.errors import LvitError

# Keys of `training:` that lvit sets itself; a recipe naming them would be silently overridden.
_RESERVED_TRAINING_KEYS = {
    "max_length": "use data.max_length (image tokens included) instead",
    "remove_unused_columns": "lvit's collator needs the raw columns",
    "dataset_kwargs": "lvit prepares the dataset itself",
    "packing": "lvit packs image data itself: use data.packing (on by default) and data.max_tokens_per_row",
    "padding_free": "lvit's packed batches are padding-free: use data.packing (on by default)",
    "assistant_only_loss": "lvit's templates already mask everything but the assistant turns",
    "completion_only_loss": "lvit's templates already mask everything but the assistant turns",
}


# ---------------------------------------------------------------------------------------------
# validation helpers


def build_section(cls, raw: Any, source: str, prefix: str):
    where = prefix.rstrip(".") or "the recipe"
    if not isinstance(raw, dict):
        raise LvitError(f"{source}: {where} must be a mapping, got {type(raw).__name__}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    _reject_unknown(raw, fields, source, prefix)
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise LvitError(f"{source}: missing required key '{key}'.")
            continue
        value = raw[name]
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build_section(hint, value, source, key + ".")
        elif (item := _section_list(hint)) is not None and value is not None:
            if not isinstance(value, list) or not value:
                raise LvitError(f"{source}: '{key}' should be a list of mappings, got {value!r}.")
            kwargs[name] = [build_section(item, v, source, f"{key}[{i}].") for i, v in enumerate(value)]
        else:
            kwargs[name] = _coerce(value, hint, key, source)
    return cls(**kwargs)


def _section_list(hint: Any):
    """The section class of a `list[Section]` (or `list[Section] | None`) hint, else None."""
    for member in typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,):
        if typing.get_origin(member) is list:
            (item,) = typing.get_args(member) or (None,)
            if dataclasses.is_dataclass(item):
                return item
    return None


def _reject_unknown(raw: dict, known, source: str, prefix: str) -> None:
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            where = prefix.rstrip(".") or "the top level"
            raise LvitError(
                f"{source}: unknown key '{prefix}{key}'.{hint} Keys allowed at {where}: {', '.join(sorted(known))}."
            )


@functools.cache
def _sft_fields() -> dict[str, Any]:
    from trl import SFTConfig  # heavy import, only when a recipe is validated

    hints = typing.get_type_hints(SFTConfig)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(SFTConfig) if f.init}


def validate_training(training: dict, source: str) -> dict:
    fields = _sft_fields()
    for key, why in _RESERVED_TRAINING_KEYS.items():
        if key in training:
            raise LvitError(f"{source}: training.{key} is set by lvit ({why}); remove it from the recipe.")
    _reject_unknown(training, fields, source, "training.")
    return {key: _coerce(value, fields[key], f"training.{key}", source) for key, value in training.items()}


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    ok, out = _match(value, hint)
    if not ok:
        raise LvitError(f"{source}: '{key}' should be {_describe(hint)}, got {value!r} ({type(value).__name__}).")
    return out


def _match(value: Any, hint: Any) -> tuple[bool, Any]:
    if hint is Any or hint is typing.Any:
        return True, value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        # Try the non-str members first so that "1e-3" becomes a float where a float is allowed.
        members = sorted(typing.get_args(hint), key=lambda h: h is str)
        for member in members:
            ok, out = _match(value, member)
            if ok:
                return True, out
        return False, None
    if origin is Literal:
        return (value in typing.get_args(hint)), value
    if hint is type(None):
        return value is None, None
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-5" (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, None
        return False, None
    if hint is str:
        return isinstance(value, str), value
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        values = {m.value for m in hint}
        return (value in values or isinstance(value, hint)), value
    if origin in (dict, typing.Dict) or hint is dict:  # noqa: UP006
        return isinstance(value, dict), value
    if origin in (list, typing.List) or hint is list:  # noqa: UP006
        return isinstance(value, list), value
    return True, value  # a type this checker does not know: SFTConfig validates it when built


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in hint)
    return getattr(hint, "__name__", str(hint))
