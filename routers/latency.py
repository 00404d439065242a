"""What a replica's time to first token is made of, with rates learned from what the gateway sees.

    ttft(replica) ~= queue wait + base + uncached prompt tokens x prefill seconds per token

- prefill rate and base: a decayed least-squares fit of observed TTFT on the uncached
  tokens predicted for it, over requests that did not queue (so the wait term is ~0);
- queue wait: requests beyond the replica's running slots wait for a slot to free,
  about one mean service time per round of ``slots`` requests ahead;
- mean service time: a decayed mean of observed request durations.

Everything arrives as numbers through ``observe_*``; nothing here reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass

# Until the gateway has seen traffic: a GPU-class prefill (20k tokens/s), a short
# base, and a service time that makes one queued round cost about a second.
DEFAULT_PREFILL_S_PER_TOKEN = 5e-5
DEFAULT_BASE_S = 0.02
DEFAULT_SERVICE_S = 1.0
DECAY = 0.98  # per observation: the fit follows the last ~50 requests
MIN_SPREAD_TOKENS = 64.0  # below this spread of x the slope is not identifiable


@dataclass(slots=True)
class LatencyModel:
    """Learned rates for one model's replicas (all replicas of a model share an engine config)."""

    prefill_s_per_token: float = DEFAULT_PREFILL_S_PER_TOKEN
    base_s: float = DEFAULT_BASE_S
    service_s: float = DEFAULT_SERVICE_S
    samples: int = 0
    # Decayed sums for the fit ttft = base + rate * x.
    _w: float = 0.0
    _x: float = 0.0
    _y: float = 0.0
    _xx: float = 0.0
    _xy: float = 0.0
    _durations: int = 0

    def prefill_s(self, uncached_tokens: float) -> float:
        return self.base_s + self.prefill_s_per_token * max(0.0, uncached_tokens)

    def wait_s(self, load: float, slots: int) -> float:
        """Expected queueing for one more request on a replica with ``load`` open and ``slots`` running slots."""
        ahead = load + 1 - slots
        if ahead <= 0:
            return 0.0
        return ahead * self.service_s / max(1, slots)

    def observe_ttft(self, uncached_tokens: float, ttft_s: float) -> None:
        """One request that did not queue: its predicted uncached tokens and its measured TTFT."""
        if ttft_s < 0 or uncached_tokens < 0:
            return
        d = DECAY
        self._w = self._w * d + 1.0
        self._x = self._x * d + uncached_tokens
        self._y = self._y * d + ttft_s
        self._xx = self._xx * d + uncached_tokens * uncached_tokens
        self._xy = self._xy * d + uncached_tokens * ttft_s
        self.samples += 1
        mean_x = self._x / self._w
        mean_y = self._y / self._w
        var_x = self._xx / self._w - mean_x * mean_x
        if var_x > MIN_SPREAD_TOKENS * MIN_SPREAD_TOKENS:
            cov = self._xy / self._w - mean_x * mean_y
            self.prefill_s_per_token = max(0.0, cov / var_x)
        self.base_s = max(0.0, mean_y - self.prefill_s_per_token * mean_x)

    def observe_duration(self, duration_s: float) -> None:
        """One finished request: its time from arrival to its last byte."""
        if duration_s < 0:
            return
        self._durations += 1
        weight = max(1.0 - DECAY, 1.0 / self._durations)  # plain mean at first, then decayed
        self.service_s += weight * (duration_s - self.service_s)
