"""Small helpers the CLI, the registry, the runner, the model loaders and the benchmarks share. A leaf: it imports nothing of
ours, so any module may import it without making an import cycle."""

from __future__ import annotations

import difflib
import hashlib
import re
from typing import Iterable


def parse_int_list(text: str, option: str) -> list[int]:
    """'1k,2k,4096' -> [1024, 2048, 4096]."""
    values = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(\d+)([kK]?)", part)
        if not match:
            raise ValueError(f"{option} '{text}': '{part}' is not a whole number (e.g. 1024 or 4k)")
        values.append(int(match.group(1)) * (1024 if match.group(2) else 1))
    if not values:
        raise ValueError(f"{option} is empty; give comma-separated numbers such as 1024,2048")
    return values


def did_you_mean(name: str, choices: Iterable[str], cutoff: float = 0.5) -> str:
    """" Did you mean 'X'?" for the choice nearest `name` (case ignored), or "" when none is near enough. Long lists
    (lm-eval's thousands of tasks) want a higher cutoff, or every name finds some weak match."""
    by_lower = {choice.lower(): choice for choice in choices}
    if name.lower() in by_lower and by_lower[name.lower()] != name:
        return f" Did you mean '{by_lower[name.lower()]}'?"
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=cutoff)
    return f" Did you mean '{by_lower[close[0]]}'?" if close else ""


def request_seed(run_seed: int, sample_id: str) -> int:
    """A sample's sampling seed: fixed by the run seed and the sample id, whatever the order or batch (the runner
    and the lm-eval bridge give the same sample the same seed)."""
    return int(hashlib.sha256(f"{run_seed}:{sample_id}".encode()).hexdigest()[:12], 16)
