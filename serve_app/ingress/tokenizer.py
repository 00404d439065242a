"""Prompt -> the token ids a replica will compute, for block keys that match its KV events.

Precise prefix routing compares a request's blocks with the blocks replicas report in
their KV events, so the gateway must tokenise exactly as the replicas do. Without a
tokenizer (`none`) the gateway hashes text blocks instead and learns from its own
placements (the approximate index).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from ..config import Tokenizer


class PromptTokenizer(Protocol):
    def chat(self, messages: Sequence[Any]) -> list[int]: ...

    def completion(self, prompt: str | Sequence[int]) -> list[int]: ...


class SimulatorTokenizer:
    """The simulator's word tokenizer (`vllm_sim/tokenizer.py`: its rule is documented there)."""

    def chat(self, messages: Sequence[Any]) -> list[int]:
        from vllm_sim.tokenizer import prompt_token_ids_for_chat

        return prompt_token_ids_for_chat(messages)

    def completion(self, prompt: str | Sequence[int]) -> list[int]:
        from vllm_sim.tokenizer import prompt_token_ids_for_completion

        return prompt_token_ids_for_completion(prompt)


def build_tokenizer(config: Tokenizer) -> PromptTokenizer | None:
    if config.kind == "vllm_sim":
        return SimulatorTokenizer()
    return None
