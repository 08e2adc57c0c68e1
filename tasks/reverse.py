"""Reverse: ``reverse 5,2,9:`` is answered ``9,2,5``; the whole list must be right.

Problems, splits, answer reading and rewards are shared with ``sort`` (``tasks/lists.py``).
"""

from __future__ import annotations

from rlbench.registry import TASKS
from tasks.lists import ListTask, Values


@TASKS.register("reverse")
class Reverse(ListTask):
    """Reverse a short list of integers (reverse 5,2,9: -> 9,2,5); exact or dense reward."""

    verb = "reverse"
    alphabet = "0123456789,-: revs"

    @staticmethod
    def transform(values: Values) -> Values:
        return values[::-1]
