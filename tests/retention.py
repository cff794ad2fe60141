"""The backup host's retention as docs/backups.md states it: the oracle both the agent and integration tests check
the receiver against."""

from __future__ import annotations

import time


def expected_kept(arrivals: dict[str, float], recent: int, daily: int) -> set[str]:
    """The newest `recent` by arrival (the receiver's clock), plus the first to arrive on each of the newest `daily`
    UTC days of arrival. Names choose nothing."""
    newest_first = sorted(arrivals, key=lambda n: arrivals[n], reverse=True)
    first_of_day: dict[str, str] = {}
    for name in reversed(newest_first):
        first_of_day.setdefault(time.strftime("%Y%m%d", time.gmtime(arrivals[name])), name)
    days = sorted(first_of_day, reverse=True)[:daily]
    return set(newest_first[:recent]) | {first_of_day[d] for d in days}
