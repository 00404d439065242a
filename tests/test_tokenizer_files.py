"""routing.tokenizer.kind huggingface: the model's own tokenizer files, used as vLLM uses them.

The tokenizer here is a real `tokenizers` fast tokenizer (word level, with a BOS post-
processor like Llama's) and a real chat template, written to a directory the way a model
repository ships them; no model hub is reachable from this machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from routers.prefix import token_blocks
from serve_app.config import GatewayConfig
from serve_app.ingress.parsing import parse_request
from serve_app.ingress.tokenizer import HuggingFaceTokenizer

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
WORDS = ["you", "are", "a", "helpful", "assistant", "hello", "there", "how", "do", "i", "say", "hi", "again"]


def write_tokenizer(root: Path, template: str | None = TEMPLATE, separate_template: bool = False) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|system|>": 3, "<|user|>": 4, "<|assistant|>": 5, "<|end|>": 6}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"])  # matched before splitting
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(root / "tokenizer.json"))
    config = {"bos_token": {"content": "<s>", "__type": "AddedToken"}, "eos_token": "</s>", "add_bos_token": True}
    if template is not None and not separate_template:
        config["chat_template"] = template
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    if template is not None and separate_template:
        (root / "chat_template.jinja").write_text(template)
    return root


def ids(root: Path, words: str) -> list[int]:
    vocab = json.loads((root / "tokenizer.json").read_text())["model"]["vocab"]
    return [vocab[w] for w in words.split()]


@pytest.mark.parametrize("separate", [False, True])
def test_chat_is_rendered_with_the_models_template_then_encoded(tmp_path: Path, separate: bool) -> None:
    root = write_tokenizer(tmp_path, separate_template=separate)
    tok = HuggingFaceTokenizer(str(root))
    messages = [{"role": "system", "content": "you are a helpful assistant"},
                {"role": "user", "content": [{"type": "text", "text": "hello there"}, {"type": "text", "text": "how do i say hi"}]}]
    assert tok.render(messages) == (
        "<s><|system|> you are a helpful assistant <|end|> <|user|> hello there\nhow do i say hi <|end|> <|assistant|> "
    )
    # The template's own BOS, and no second one from the tokenizer's post-processor.
    assert tok.chat(messages) == ids(root, "<s> <|system|> you are a helpful assistant <|end|> <|user|> "
                                           "hello there how do i say hi <|end|> <|assistant|>")


def test_completions_get_the_tokenizers_bos_and_token_prompts_pass_through(tmp_path: Path) -> None:
    tok = HuggingFaceTokenizer(str(write_tokenizer(tmp_path)))
    assert tok.completion("say hi again") == ids(tmp_path, "<s> say hi again")
    assert tok.completion([7, 8, 9]) == [7, 8, 9]


def test_requests_are_keyed_by_the_models_tokens(tmp_path: Path) -> None:
    root = write_tokenizer(tmp_path)
    tok = HuggingFaceTokenizer(str(root))
    messages = [{"role": "system", "content": "you are a helpful assistant " * 20}, {"role": "user", "content": "hi"}]
    body = json.dumps({"model": "m", "messages": messages}).encode()
    facts = parse_request("/v1/chat/completions", body, None, tokenizer=tok, block_size=16).facts
    want = tok.chat(messages)
    assert facts.prompt_tokens == len(want)
    assert facts.blocks == tuple(token_blocks(want, 16)) and len(facts.blocks) == len(want) // 16


def test_the_config_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="needs routing.tokenizer.path"):
        GatewayConfig.model_validate({"routing": {"tokenizer": {"kind": "huggingface"}}})
    with pytest.raises(ValidationError, match="has no tokenizer.json"):
        GatewayConfig.model_validate({"routing": {"tokenizer": {"kind": "huggingface", "path": str(tmp_path)}}})
    root = write_tokenizer(tmp_path)
    config = GatewayConfig.model_validate({"routing": {"tokenizer": {"kind": "huggingface", "path": str(root)}}})
    assert config.routing.tokenizer.path == str(root)
