"""Sort: ``sort 5,2,9:`` is answered ``2,5,9`` (ascending); the whole list must be right.

Problems, splits, answer reading and rewards are shared with ``reverse`` (``tasks/lists.py``).
"""

from __future__ import annotations

from rlbench.registry import TASKS
from tasks.lists import ListTask, Values


@TASKS.register("sort")
class Sort(ListTask):
    """Sort a short list of integers ascending (sort 5,2,9: -> 2,5,9); exact or dense reward."""

    verb = "sort"
    alphabet = "0123456789,-: sort"

    @staticmethod
    def transform(values: Values) -> Values:
        return tuple(sorted(values))
