"""Byte-level BPE tokenizer: training, encoding, decoding, special tokens and chat rendering.

Training uses HuggingFace `tokenizers` (fast, Rust); encoding uses `tiktoken` built from the learned
merges (faster, multi-threaded batches). Special tokens live *outside* the BPE vocabulary, after it,
and ordinary encoding never looks for them: text containing the literal string "<|bos|>" encodes to
plain byte tokens, so user text can never forge a control token.

Chat rendering turns a conversation into token ids plus a loss mask that is 1 exactly on what the
assistant must learn to produce (its text, its python tool calls, `<|assistant_end|>`) and 0 on
everything given to it (user text, tool outputs, the `<|assistant_start|>` prompt).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from pathlib import Path

from .config import SPECIAL_TOKENS

# GPT-4-style pre-tokenization split, with numbers split into groups of at most two digits
# (better than three for small vocabularies).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
    r"""\s*[\r\n]|\s+(?!\S)|\s+"""
)
RANKS_FILE = "ranks.tiktoken"
META_FILE = "tokenizer.json"


class ConversationError(ValueError):
    """A conversation that cannot be rendered (wrong roles, empty, bad parts)."""


def _byte_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class Tokenizer:
    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN):
        import tiktoken

        if len(mergeable_ranks) < 256:
            raise ValueError("a byte-level vocabulary needs all 256 single bytes")
        self.mergeable_ranks = mergeable_ranks
        self.pattern = pattern
        self.n_bpe = len(mergeable_ranks)
        self.special_ids = {name: self.n_bpe + i for i, name in enumerate(SPECIAL_TOKENS)}
        self._enc = tiktoken.Encoding(name="picochat", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                      special_tokens={})
        self._bytes = [b""] * self.vocab_size
        for tok, rank in mergeable_ranks.items():
            self._bytes[rank] = tok
        for name, i in self.special_ids.items():
            self._bytes[i] = name.encode()

    # -- training ------------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, doc_cap: int = 10_000,
              max_chars: int | None = None, show_progress: bool = False) -> "Tokenizer":
        """Learn a BPE of `vocab_size` tokens in all (specials included) from an iterator of texts."""
        from tokenizers import Regex, models, pre_tokenizers, trainers
        from tokenizers import Tokenizer as HFTokenizer

        n_bpe = vocab_size - len(SPECIAL_TOKENS)
        if n_bpe < 256:
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        trainer = trainers.BpeTrainer(vocab_size=n_bpe, show_progress=show_progress, min_frequency=2,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=[])

        def capped() -> Iterator[str]:
            seen = 0
            for text in texts:
                text = text[:doc_cap]
                yield text
                seen += len(text)
                if max_chars is not None and seen >= max_chars:
                    return

        hf.train_from_iterator(capped(), trainer)
        model = json.loads(hf.to_str())["model"]
        decode_char = {c: b for b, c in _byte_to_unicode().items()}

        def to_bytes(s: str) -> bytes:
            return bytes(decode_char[c] for c in s)

        ranks = {bytes([b]): b for b in range(256)}
        for merge in model["merges"]:
            left, right = merge.split(" ") if isinstance(merge, str) else merge
            tok = to_bytes(left) + to_bytes(right)
            if tok not in ranks:
                ranks[tok] = len(ranks)
            if len(ranks) >= n_bpe:
                break
        return cls(ranks)

    # -- persistence ---------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        from .common import atomic_dir

        with atomic_dir(Path(directory)) as tmp:
            lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in
                     sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])]
            (tmp / RANKS_FILE).write_text("\n".join(lines) + "\n")
            meta = {"pattern": self.pattern, "special_tokens": list(SPECIAL_TOKENS),
                    "vocab_size": self.vocab_size, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: Path) -> "Tokenizer":
        directory = Path(directory)
        ranks_path, meta_path = directory / RANKS_FILE, directory / META_FILE
        if not ranks_path.exists() or not meta_path.exists():
            raise FileNotFoundError(f"no tokenizer in {directory} (run `picochat tokenizer train` first)")
        meta = json.loads(meta_path.read_text())
        if list(meta.get("special_tokens", [])) != list(SPECIAL_TOKENS):
            raise ValueError(f"{meta_path}: special tokens differ from this picochat version's")
        ranks: dict[bytes, int] = {}
        for lineno, line in enumerate(ranks_path.read_text().splitlines(), 1):
            try:
                tok, rank = line.split(" ")
                ranks[base64.b64decode(tok)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{ranks_path}:{lineno}: malformed line {line[:60]!r}") from e
        tokenizer = cls(ranks, meta["pattern"])
        if tokenizer.vocab_size != meta["vocab_size"]:
            raise ValueError(f"{directory}: vocab size {tokenizer.vocab_size} != recorded {meta['vocab_size']}")
        return tokenizer

    # -- encoding ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.n_bpe + len(SPECIAL_TOKENS)

    @property
    def bos_id(self) -> int:
        return self.special_ids["<|bos|>"]

    def special(self, name: str) -> int:
        return self.special_ids[name]

    def encode(self, text: str, prepend_bos: bool = False) -> list[int]:
        ids = self._enc.encode_ordinary(text)
        return [self.bos_id, *ids] if prepend_bos else ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 4, prepend_bos: bool = False) -> list[list[int]]:
        batch = self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)
        if prepend_bos:
            bos = self.bos_id
            for ids in batch:
                ids.insert(0, bos)
        return batch

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        table = self._bytes
        return b"".join(table[i] for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def is_special(self, token_id: int) -> bool:
        return token_id >= self.n_bpe

    @cached_property
    def token_byte_lengths(self) -> list[int]:
        """Bytes per token (0 for specials): the denominator of bits-per-byte."""
        return [0 if i >= self.n_bpe else len(b) for i, b in enumerate(self._bytes)]

    def bytes_per_token(self, texts: Sequence[str]) -> float:
        n_bytes = sum(len(t.encode()) for t in texts)
        n_tokens = sum(len(ids) for ids in self.encode_batch(texts))
        return n_bytes / max(1, n_tokens)

    # -- chat ----------------------------------------------------------------------------------
    def render_conversation(self, conversation: dict | list, max_tokens: int | None = None
                            ) -> tuple[list[int], list[int]]:
        """Token ids and loss mask (1 = the assistant must learn this token) for a whole chat.

        With `max_tokens`, the result is cropped to that many tokens (callers count crops)."""
        messages = _validated_messages(conversation, for_completion=False)
        ids, mask = [self.bos_id], [0]

        def add(tokens: list[int], learn: int) -> None:
            ids.extend(tokens)
            mask.extend([learn] * len(tokens))

        for msg in messages:
            if msg["role"] == "user":
                add([self.special("<|user_start|>")], 0)
                add(self.encode(msg["content"]), 0)
                add([self.special("<|user_end|>")], 0)
            else:
                add([self.special("<|assistant_start|>")], 0)
                for part in _parts(msg["content"]):
                    kind, text = part["type"], part["text"]
                    if kind == "text":
                        add(self.encode(text), 1)
                    elif kind == "python":
                        add([self.special("<|python_start|>")], 1)
                        add(self.encode(text), 1)
                        add([self.special("<|python_end|>")], 1)
                    else:  # python_output: produced by the tool, not by the model
                        add([self.special("<|output_start|>")], 0)
                        add(self.encode(text), 0)
                        add([self.special("<|output_end|>")], 0)
                add([self.special("<|assistant_end|>")], 1)
        if max_tokens is not None:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    def render_for_completion(self, conversation: dict | list) -> list[int]:
        """Ids of a conversation that ends with a user turn, followed by `<|assistant_start|>`."""
        messages = _validated_messages(conversation, for_completion=True)
        ids, _ = self.render_conversation({"messages": messages + [{"role": "assistant", "content": "x"}]})
        # drop the placeholder answer ("x" and <|assistant_end|>) but keep <|assistant_start|>
        n_tail = len(self.encode("x")) + 1
        return ids[:-n_tail]


def _parts(content: str | list) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return content


_PART_TYPES = ("text", "python", "python_output")


def _validated_messages(conversation: dict | list, for_completion: bool) -> list[dict]:
    """Check roles and contents; fold a leading system message into the first user turn."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else conversation
    if not isinstance(messages, list) or not messages:
        raise ConversationError("a conversation needs a non-empty list of messages")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ConversationError(f"message {i} must be a dict with 'role' and 'content'")
    messages = [dict(m) for m in messages]
    if messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ConversationError("a system message must be followed by a user message")
        system = messages.pop(0)
        if not isinstance(system["content"], str):
            raise ConversationError("system content must be a string")
        messages[0]["content"] = f"{system['content']}\n\n{messages[0]['content']}"
    for i, msg in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != expected:
            raise ConversationError(
                f"message {i} has role {msg['role']!r}, expected {expected!r} (user and assistant alternate, "
                "starting with user; a system message may come first)")
        content = msg["content"]
        if expected == "user" and not isinstance(content, str):
            raise ConversationError(f"message {i}: user content must be a string")
        if isinstance(content, list):
            if not content:
                raise ConversationError(f"message {i}: empty list of parts")
            for part in content:
                if not isinstance(part, dict) or part.get("type") not in _PART_TYPES or \
                        not isinstance(part.get("text"), str):
                    raise ConversationError(f"message {i}: each part needs a type in {_PART_TYPES} and a text")
        elif not isinstance(content, str):
            raise ConversationError(f"message {i}: content must be a string or a list of parts")
    last = messages[-1]["role"]
    if for_completion and last != "user":
        raise ConversationError("a conversation to complete must end with a user message")
    if not for_completion and last != "assistant":
        raise ConversationError("a training conversation must end with an assistant message")
    return messages
