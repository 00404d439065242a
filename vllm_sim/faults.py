"""Fault knobs: misbehaviour that tests switch on at start (CLI) or at runtime (/sim/faults)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Literal

MidStreamAction = Literal["kill", "die", "error"]

_COUNT_KNOBS = ("die_mid_stream_after", "kill_process_mid_stream_after", "error_mid_stream_after")
_BOOL_KNOBS = ("hang", "unhealthy")


@dataclass(slots=True)
class Faults:
    """Current fault settings; the defaults mean "behave like a healthy vLLM"."""

    # Reset the TCP connection (RST, no [DONE]) after N content chunks.
    die_mid_stream_after: int | None = None
    # os._exit(1) after N content chunks: a crash.
    kill_process_mid_stream_after: int | None = None
    # Accept /v1/* requests and never answer.
    hang: bool = False
    # Answer /v1/* with this status and vLLM's error body.
    error_status: int | None = None
    # /health answers 503 and /v1/* answer 500 (a dead engine).
    unhealthy: bool = False
    # Seconds /metrics waits before answering.
    metrics_delay: float = 0.0
    # Send `data: {"error": ...}` then `[DONE]` after N content chunks.
    error_mid_stream_after: int | None = None
    # Answer 500 to completions/chat whose prompt contains this text: a request that
    # breaks any engine (the failure follows the request, not the replica).
    error_status_for_prompts_containing: str | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, f.default)

    def update(self, patch: Mapping[str, object]) -> None:
        """Merge `patch` into the settings; null/false resets a knob.

        Validates everything before changing anything, so a bad patch changes nothing.
        Raises ValueError with a message fit for a 400 answer.
        """
        if not isinstance(patch, Mapping):
            raise ValueError("fault settings must be a JSON object")
        defaults = {f.name: f.default for f in fields(self)}
        changes: dict[str, object] = {}
        for key, value in patch.items():
            if key not in defaults:
                raise ValueError(f"unknown fault knob {key!r}; known: {sorted(defaults)}")
            if value is None or value is False:
                changes[key] = defaults[key]
            elif key in _BOOL_KNOBS:
                if value is not True:
                    raise ValueError(f"{key} must be a boolean")
                changes[key] = True
            elif key in _COUNT_KNOBS:
                if not _is_int(value) or value < 0:  # type: ignore[operator]
                    raise ValueError(f"{key} must be a non-negative integer or null")
                changes[key] = value
            elif key == "error_status":
                if not _is_int(value) or not 400 <= value <= 599:  # type: ignore[operator]
                    raise ValueError("error_status must be an integer HTTP status in 400..599")
                changes[key] = value
            elif key == "error_status_for_prompts_containing":
                if not isinstance(value, str) or not value:
                    raise ValueError("error_status_for_prompts_containing must be a non-empty string or null")
                changes[key] = value
            elif key == "metrics_delay":
                if not isinstance(value, (int, float)) or value is True or value < 0:
                    raise ValueError("metrics_delay must be a non-negative number of seconds")
                changes[key] = float(value)
        for key, value in changes.items():
            setattr(self, key, value)

    def mid_stream_action(self) -> tuple[int, MidStreamAction] | None:
        """The first mid-stream fault to fire: (content chunks before it, action)."""
        candidates: list[tuple[int, int, MidStreamAction]] = []
        if self.kill_process_mid_stream_after is not None:
            candidates.append((self.kill_process_mid_stream_after, 0, "kill"))
        if self.die_mid_stream_after is not None:
            candidates.append((self.die_mid_stream_after, 1, "die"))
        if self.error_mid_stream_after is not None:
            candidates.append((self.error_mid_stream_after, 2, "error"))
        if not candidates:
            return None
        after, _, action = min(candidates)
        return after, action


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
