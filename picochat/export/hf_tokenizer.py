"""picochat's tokenizer and chat format as Hugging Face files: tokenizer.json, tokenizer_config.json,
special_tokens_map.json and a Jinja chat template.

picochat encodes with tiktoken from a table of byte strings and their ranks. A `tokenizers` BPE
model reproduces that exactly when (a) every way of splitting a token into two tokens is a merge
whose priority is the token's rank, since tiktoken merges any adjacent pair whose concatenation is in
the table, lowest rank first; (b) `ignore_merges` is on, since tiktoken takes a pre-token that is a
whole entry of the table as one token without merging; (c) the pre-tokenizer splits with the same
regex before mapping bytes to the byte-level alphabet. The nine special tokens sit after the BPE
ids, in `SPECIAL_TOKENS` order, as in picochat.

The chat template renders the same text that `Tokenizer.render_conversation` encodes piece by piece,
so `apply_chat_template(..., add_generation_prompt=True)` gives `render_for_completion`'s ids; it
raises where picochat's renderer raises (roles out of order, bad parts). docs/export.md lists the
two cases where one string cannot say what picochat's piecewise encoding says.
"""

from __future__ import annotations

import json

from ..config import SPECIAL_TOKENS
from ..tokenizer import Tokenizer, _byte_to_unicode

BOS, EOS = "<|bos|>", "<|assistant_end|>"

# Jinja, rendered by transformers (and vLLM, TGI, llama.cpp's converter) with `messages` and
# `add_generation_prompt`. Whitespace control (`-`) everywhere: every character it emits is content.
CHAT_TEMPLATE = r"""{#- picochat's chat format (picochat.tokenizer.Tokenizer.render_conversation). -#}
{%- set ns = namespace(system=none, first=0) -%}
{%- if messages[0]['role'] == 'system' -%}
  {%- if messages[0]['content'] is not string -%}{{ raise_exception('system content must be a string') }}{%- endif -%}
  {%- if messages | length < 2 or messages[1]['role'] != 'user' -%}
    {{ raise_exception('a system message must be followed by a user message') }}
  {%- endif -%}
  {%- set ns.system = messages[0]['content'] -%}
  {%- set ns.first = 1 -%}
{%- endif -%}
{{- '<|bos|>' -}}
{%- for message in messages[ns.first:] -%}
  {%- set expected = 'user' if loop.index0 % 2 == 0 else 'assistant' -%}
  {%- if message['role'] != expected -%}
    {{ raise_exception("message " ~ loop.index0 ~ " has role '" ~ message['role'] ~ "', expected '" ~ expected ~ "' (user and assistant alternate, starting with user; a system message may come first)") }}
  {%- endif -%}
  {%- if expected == 'user' -%}
    {%- if message['content'] is not string -%}{{ raise_exception('user content must be a string') }}{%- endif -%}
    {{- '<|user_start|>' -}}
    {%- if loop.first and ns.system is not none -%}{{- ns.system ~ '\n\n' -}}{%- endif -%}
    {{- message['content'] ~ '<|user_end|>' -}}
  {%- else -%}
    {{- '<|assistant_start|>' -}}
    {%- if message['content'] is string -%}
      {{- message['content'] -}}
    {%- elif message['content'] is sequence and message['content'] | length > 0 -%}
      {%- for part in message['content'] -%}
        {%- if part['text'] is not string -%}{{ raise_exception('each part needs a text') }}{%- endif -%}
        {%- if part['type'] == 'text' -%}
          {{- part['text'] -}}
        {%- elif part['type'] == 'python' -%}
          {{- '<|python_start|>' ~ part['text'] ~ '<|python_end|>' -}}
        {%- elif part['type'] == 'python_output' -%}
          {{- '<|output_start|>' ~ part['text'] ~ '<|output_end|>' -}}
        {%- else -%}
          {{ raise_exception("part type must be 'text', 'python' or 'python_output'") }}
        {%- endif -%}
      {%- endfor -%}
    {%- else -%}
      {{ raise_exception('assistant content must be a string or a non-empty list of parts') }}
    {%- endif -%}
    {{- '<|assistant_end|>' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {%- if messages[-1]['role'] != 'user' -%}
    {{ raise_exception('a conversation to complete must end with a user message') }}
  {%- endif -%}
  {{- '<|assistant_start|>' -}}
{%- endif -%}"""


def _bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every split of every token into two tokens, by the rank of the token they make.

    Ties (one token with several splits) go to the split whose left part ranks lowest; tiktoken
    would take the leftmost position instead, which differs only where two splits of one token
    overlap at once, a state byte-pair merging in rank order does not reach in practice."""
    merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def tokenizer_json(tok: Tokenizer) -> str:
    """The `tokenizers` serialisation of picochat's tokenizer (tokenizer.json)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    if sorted(tok.mergeable_ranks.values()) != list(range(tok.n_bpe)):
        raise ValueError("the tokenizer's ranks are not the ids 0..n-1; it cannot be written as a BPE vocabulary")
    to_unicode = _byte_to_unicode()

    def chars(b: bytes) -> str:
        return "".join(to_unicode[x] for x in b)

    vocab = {chars(b): rank for b, rank in tok.mergeable_ranks.items()}
    merges = [(chars(a), chars(b)) for a, b in _bpe_merges(tok.mergeable_ranks)]
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tok.pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in SPECIAL_TOKENS])
    for name in SPECIAL_TOKENS:
        if hf.token_to_id(name) != tok.special(name):
            raise ValueError(f"special token {name} would get id {hf.token_to_id(name)}, not {tok.special(name)}")
    return hf.to_str(pretty=True)


def special_tokens_map() -> dict:
    extra = [name for name in SPECIAL_TOKENS if name not in (BOS, EOS)]
    return {"bos_token": BOS, "eos_token": EOS, "pad_token": BOS, "additional_special_tokens": extra}


def tokenizer_config(model_max_length: int) -> dict:
    """tokenizer_config.json: a plain fast tokenizer (no remote code) with the chat template.

    No BOS is added by `tokenizer(text)`: picochat's `encode` adds none either; the chat template
    writes it. Padding goes left, where batched generation needs it; the pad id is BOS, which the
    attention mask hides."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_tokens_map(),
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }


def write_tokenizer_files(tok: Tokenizer, folder, model_max_length: int) -> list[str]:
    """Write the tokenizer files into `folder`; returns their names."""
    from pathlib import Path

    folder = Path(folder)
    files = {
        "tokenizer.json": tokenizer_json(tok),
        "tokenizer_config.json": json.dumps(tokenizer_config(model_max_length), indent=2, ensure_ascii=False),
        "special_tokens_map.json": json.dumps(special_tokens_map(), indent=2),
    }
    for name, text in files.items():
        (folder / name).write_text(text + "\n", encoding="utf-8")
    return list(files)
