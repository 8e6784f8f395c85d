"""What the command-line programs share: help that shows defaults, and the backend choices."""

from __future__ import annotations

import argparse

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
