"""What the command-line programs share: help that shows defaults, the backend choices, and the types of
the library-model options (``--exits``, ``--model-kwargs``)."""

from __future__ import annotations

import argparse
import json

from .. import BACKENDS


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written (it holds example commands), and "(default: ...)" after each option's help,
    except flags and options whose default None the help explains."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


BACKEND_CHOICES = ("auto", *BACKENDS)
"""``--backend`` values: "auto" or a registered backend."""


def comma_separated(text: str) -> list[str]:
    """``--exits a,b,c`` -> ["a", "b", "c"]."""
    return [name.strip() for name in text.split(",")]


def json_object(text: str) -> dict:
    """``--model-kwargs '{"key": value}'`` -> a dict; an argparse error for anything else."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error}): {text!r}") from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object of keyword arguments, got {text!r}")
    return value
