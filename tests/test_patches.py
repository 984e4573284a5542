"""The table of replaced names (libremote/client/patches.py) against the installed torch.

On a new torch these show at once what moved: a name that is gone, an object of another kind, a
parameter that the replacement does not take; and a replacement somewhere the table does not say.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

import libremote  # noqa: F401  (activates: installs the table)
from libremote.client import patches

_P = inspect.Parameter
_POSITIONAL = (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD)
_BY_NAME = (_P.POSITIONAL_OR_KEYWORD, _P.KEYWORD_ONLY)

#: Where no replacement may hide that the table does not list.
SCANNED = {"torch": torch, "torch.cuda": torch.cuda, "torch.accelerator": torch.accelerator,
           "torch.Tensor": torch.Tensor, "torch.nn.Module": torch.nn.Module,
           "torch.serialization": torch.serialization}


def _installed() -> list[patches.Patch]:
    return [patch for patch in patches.TABLE if patches.applies(patch)]


def _kind(value: Any) -> str:
    if isinstance(value, type):
        return "class"
    if inspect.isroutine(value):
        return "function"
    return "object"


def _signature(value: Any, follow_wrapped: bool = True) -> inspect.Signature | None:
    try:
        return inspect.signature(value, follow_wrapped=follow_wrapped)
    except (TypeError, ValueError):  # a C function or type: its kind is what can be checked
        return None


def _what_the_replacement_lacks(original: Any, replacement: Any) -> list[str]:
    """How a call that ``original`` takes could fail on ``replacement``: a parameter it does not
    take (by position where the original's callers must pass it so, by name where they may), or
    one it requires that the original's callers may leave out."""
    theirs = _signature(original)
    if theirs is None:
        return []
    ours = _signature(replacement, follow_wrapped=False)  # (functools.wraps copies the original's)
    if ours is None:
        return ["the replacement's parameters cannot be read"]
    our_params = list(ours.parameters.values())
    our_positional = [p for p in our_params if p.kind in _POSITIONAL]
    our_names = {p.name for p in our_params if p.kind in _BY_NAME}
    any_positional = any(p.kind is _P.VAR_POSITIONAL for p in our_params)
    any_keyword = any(p.kind is _P.VAR_KEYWORD for p in our_params)
    lacks = []
    their_positional = [p for p in theirs.parameters.values() if p.kind in _POSITIONAL]
    for index, param in enumerate(their_positional):
        must_be_positional = param.kind is _P.POSITIONAL_ONLY or param.default is _P.empty
        if must_be_positional and not (index < len(our_positional) or any_positional):
            lacks.append(f"`{param.name}` at position {index}")
    for param in theirs.parameters.values():
        if param.kind in _BY_NAME and param.name not in our_names and not any_keyword:
            lacks.append(f"`{param.name}=` by name")
        elif param.kind is _P.VAR_POSITIONAL and not any_positional:
            lacks.append(f"`*{param.name}`")
        elif param.kind is _P.VAR_KEYWORD and not any_keyword:
            lacks.append(f"`**{param.name}`")
    their_required = {p.name for p in theirs.parameters.values() if p.default is _P.empty}
    for index, param in enumerate(our_params):
        if param.default is not _P.empty or param.kind in (_P.VAR_POSITIONAL, _P.VAR_KEYWORD):
            continue
        if param.kind in _POSITIONAL:
            required_there = index < len(their_positional) and their_positional[index].default is _P.empty
        else:
            required_there = param.name in their_required
        if not required_there:
            lacks.append(f"leaves out `{param.name}`, which the replacement requires")
    return lacks


def test_every_original_is_in_this_torch_as_its_replacement_expects():
    originals = patches.originals()
    moved = []
    for patch in _installed():
        where = f"{patch.name} (checked on torch {patch.checked}; this is {torch.__version__})"
        if patch.name not in originals:
            moved.append(f"{where}: not in this torch")
            continue
        original = originals[patch.name]
        if _kind(original) != _kind(patch.replacement):
            moved.append(f"{where}: a {_kind(original)} here, replaced by a {_kind(patch.replacement)}")
            continue
        moved += [f"{where}: a call may pass {lack}" if not lack.startswith("leaves") else f"{where}: a call {lack}"
                  for lack in _what_the_replacement_lacks(original, patch.replacement)]
    assert not moved, "torch's originals differ from what the replacements expect:\n" + "\n".join(moved)


def test_after_import_every_name_is_its_replacement():
    not_replaced = []
    for patch in _installed():
        owner, attribute = patches.owner_of(patch.name)
        if getattr(owner, attribute, None) is not patch.replacement:
            not_replaced.append(f"{patch.name} is {getattr(owner, attribute, None)!r}")
    assert not not_replaced, "\n".join(not_replaced)


def test_the_table_has_one_row_per_name_and_says_why():
    names = [patch.name for patch in patches.TABLE]
    assert len(names) == len(set(names)), sorted(name for name in names if names.count(name) > 1)
    for patch in patches.TABLE:
        assert patch.why and "\n" not in patch.why, patch.name
        assert patch.checked, patch.name


def test_nothing_is_replaced_that_the_table_does_not_list():
    listed = {patch.name for patch in _installed()} | set(patches.ADDED_BY_TORCH)
    unlisted = []
    for owner_name, owner in SCANNED.items():
        for attribute, value in list(vars(owner).items()):
            module = getattr(value, "__module__", None)
            if isinstance(module, str) and module.startswith("libremote"):
                name = f"{owner_name}.{attribute}"
                if name not in listed:
                    unlisted.append(f"{name} ({module})")
    assert not unlisted, "replaced, but not in libremote/client/patches.py:\n" + "\n".join(sorted(unlisted))
