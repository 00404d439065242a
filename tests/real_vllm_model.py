"""Write a tiny random Llama and a word-level tokenizer with a chat template into a folder.

Runs inside the real-vLLM venv (it needs torch, transformers and tokenizers, which the
gateway's own environment does not have):

    ~/.cache/llm-gateway/vllm-venv/current/bin/python tests/real_vllm_model.py OUT_DIR

No model hub: the weights are random (seeded), the vocabulary is made up here. The
model is only there so that real vLLM runs its real engine (scheduler, KV cache, prefix
caching, KV events, metrics, OpenAI server); what it writes is noise.

Sizes are arguments so a benchmark can ask for a model whose prefill takes measurable
time on a CPU: `--layers 2 --hidden 256` (the default) loads in about a minute.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SPECIALS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
WORDS = (
    "the a an and or but if then else when while of to in on at by for with from as is are was were be "
    "been it this that these those i you he she we they me him her us them my your his its our their "
    "say said something deterministic hello world tell me about cache prefix block token model request "
    "reply answer question story long short fast slow red green blue one two three four five six seven "
    "eight nine ten shared system prompt you are helpful assistant user please write count numbers "
    "words letters gateway replica engine server client test real simulator"
).split()
# Chat template: the roles as special tokens, then the content, one message per line.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def vocabulary(size: int) -> dict[str, int]:
    words = list(dict.fromkeys(SPECIALS + WORDS))
    words += [f"w{i}" for i in range(max(0, size - len(words)))]
    return {w: i for i, w in enumerate(words)}


def write_tokenizer(out: Path, vocab: dict[str, int], max_len: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>",
        model_max_length=max_len, additional_special_tokens=SPECIALS[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def write_model(out: Path, vocab_size: int, layers: int, hidden: int, heads: int, max_len: int, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_len,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    vocab = vocabulary(args.vocab)
    write_tokenizer(args.out, vocab, args.max_len)
    write_model(args.out, len(vocab), args.layers, args.hidden, args.heads, args.max_len, args.seed)
    print(json.dumps({"dir": str(args.out), "vocab": len(vocab), "layers": args.layers, "hidden": args.hidden}))


if __name__ == "__main__":
    main()
