"""A vLLM OpenAI-compatible server simulator for tests, demos and benchmarks.

Run it with `python -m vllm_sim --port P --model NAME`; drive it from tests with
`vllm_sim.testing.SimulatorProcess`; predict its output with `vllm_sim.generation`.
"""

from .generation import Generation, embed, generate, render_chat

__all__ = ["Generation", "embed", "generate", "render_chat"]
