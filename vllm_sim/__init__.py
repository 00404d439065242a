"""A vLLM OpenAI-compatible server simulator for tests, demos and benchmarks.

Run it with `python -m vllm_sim --port P --model NAME`; drive it from tests with
`vllm_sim.testing.SimulatorProcess`; predict its output with `vllm_sim.generation`, its
token ids with `vllm_sim.tokenizer` and its KV block hashes with `vllm_sim.hashing`.
"""

from .generation import Generation, embed, generate, render_chat
from .hashing import block_hashes
from .tokenizer import prompt_token_ids_for_chat, prompt_token_ids_for_completion

__all__ = [
    "Generation", "block_hashes", "embed", "generate", "prompt_token_ids_for_chat",
    "prompt_token_ids_for_completion", "render_chat",
]
