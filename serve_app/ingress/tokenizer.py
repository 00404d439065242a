"""Prompt -> the token ids a replica will compute, for block keys that match its KV events.

Precise prefix routing compares a request's blocks with the blocks replicas report in
their KV events, so the gateway must tokenise exactly as the replicas do. Without a
tokenizer (`none`) the gateway hashes text blocks instead and learns from its own
placements (the approximate index).

`huggingface` reads the model's own tokenizer files, the ones vLLM loads: the fast
tokenizer (`tokenizer.json`) and the chat template (`tokenizer_config.json`'s
`chat_template`, or `chat_template.jinja`). Chat prompts are rendered with the template
as vLLM does by default (`add_generation_prompt`, text parts of a message joined by
newlines, no special tokens added on top of the template's), then encoded; completion
prompts are encoded with the tokenizer's special tokens (BOS), and token-id prompts are
taken as they are. Needs the `tokenizer` extra (`tokenizers`, `jinja2`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
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


class TokenizerFilesError(ValueError):
    """The tokenizer files cannot be used (missing, unreadable, no chat template)."""


def _special(value: Any) -> str:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken map."""
    if isinstance(value, dict):
        return str(value.get("content") or "")
    return value if isinstance(value, str) else ""


def _text_parts(content: Any) -> Any:
    """vLLM's default for text models: a message's text parts joined by newlines."""
    if isinstance(content, list):
        return "\n".join(
            str(part.get("text", "")) for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return content


class HuggingFaceTokenizer:
    """The model's tokenizer.json and chat template, used as vLLM uses them."""

    def __init__(self, path: str) -> None:
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
            from tokenizers import Tokenizer as FastTokenizer
        except ImportError as exc:
            raise TokenizerFilesError(
                "routing.tokenizer.kind 'huggingface' needs the tokenizer extra: pip install 'llm-gateway[tokenizer]'"
            ) from exc
        root = Path(path)
        if not (root / "tokenizer.json").is_file():
            raise TokenizerFilesError(
                f"routing.tokenizer.path {path!r} has no tokenizer.json (give the model's directory, as vLLM loads it)"
            )
        self._fast = FastTokenizer.from_file(str(root / "tokenizer.json"))
        config: dict[str, Any] = {}
        if (root / "tokenizer_config.json").is_file():
            config = json.loads((root / "tokenizer_config.json").read_text())
        template = config.get("chat_template")
        if (root / "chat_template.jinja").is_file():
            template = (root / "chat_template.jinja").read_text()
        if isinstance(template, list):  # named templates: the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        self._special = {name: _special(config.get(name)) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
        self._template = None
        if isinstance(template, str) and template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(template)

    def render(self, messages: Sequence[Any]) -> str:
        if self._template is None:
            raise TokenizerFilesError("the tokenizer has no chat template")
        msgs = [{**m, "content": _text_parts(m.get("content"))} if isinstance(m, dict) else m for m in messages]
        return self._template.render(messages=msgs, add_generation_prompt=True, **self._special)

    def chat(self, messages: Sequence[Any]) -> list[int]:
        return self._fast.encode(self.render(messages), add_special_tokens=False).ids

    def completion(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self._fast.encode(prompt, add_special_tokens=True).ids
        return list(prompt)


def _raise(message: str) -> None:
    raise TokenizerFilesError(message)


def build_tokenizer(config: Tokenizer) -> PromptTokenizer | None:
    if config.kind == "vllm_sim":
        return SimulatorTokenizer()
    if config.kind == "huggingface":
        assert config.path is not None  # validated by the config
        return HuggingFaceTokenizer(config.path)
    return None
