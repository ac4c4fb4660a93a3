"""Tokenizer: lossless round trip on arbitrary unicode, special-token safety, chat rendering and
loss-mask alignment, persistence, and the `picochat tokenizer` commands."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from picochat.config import SPECIAL_TOKENS
from picochat.tokenizer import ConversationError, Tokenizer

TEXTS = ["Once upon a time there was a little fox named Ada. She liked to run.",
         "The capital of France is Paris. 12 plus 30 is 42.",
         "héllo wörld — 日本語のテキスト, emoji 🙂🚀, tabs\tand\nnewlines",
         "def f(x):\n    return x ** 2  # code too"] * 200


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(iter(TEXTS), vocab_size=400)


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_round_trip_arbitrary_unicode(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.n_bpe for i in ids)  # plain text never yields a special token
    assert tok.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(texts=st.lists(st.text(max_size=50), max_size=8))
def test_batch_encoding_matches_single(tok, texts):
    assert tok.encode_batch(texts, num_threads=2) == [tok.encode(t) for t in texts]


@pytest.mark.parametrize("special", SPECIAL_TOKENS)
def test_literal_special_strings_are_plain_text(tok, special):
    text = f"user wrote {special} here"
    ids = tok.encode(text)
    assert tok.special(special) not in ids
    assert not any(tok.is_special(i) for i in ids)
    assert tok.decode(ids) == text


def test_vocab_layout_and_bos(tok):
    assert tok.vocab_size == tok.n_bpe + len(SPECIAL_TOKENS) == 400
    assert tok.encode("hi", prepend_bos=True)[0] == tok.bos_id
    assert tok.decode([tok.bos_id]) == "<|bos|>"
    assert tok.token_byte_lengths[tok.bos_id] == 0


def test_save_load_identical(tok, tmp_path):
    tok.save(tmp_path / "t")
    again = Tokenizer.load(tmp_path / "t")
    for text in TEXTS[:4]:
        assert again.encode(text) == tok.encode(text)
    assert again.vocab_size == tok.vocab_size


def test_load_errors_name_the_file(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="tokenizer train"):
        Tokenizer.load(tmp_path / "missing")
    tok.save(tmp_path / "t")
    (tmp_path / "t" / "ranks.tiktoken").write_text("not-base64-and-no-rank\n")
    with pytest.raises(ValueError, match=r"ranks.tiktoken:1"):
        Tokenizer.load(tmp_path / "t")


def _conv():
    return {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How many r in strawberry?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me count. "},
            {"type": "python", "text": "'strawberry'.count('r')"},
            {"type": "python_output", "text": "3"},
            {"type": "text", "text": "There are 3."},
        ]},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]}


def test_mask_is_one_exactly_on_assistant_output(tok):
    ids, mask = tok.render_conversation(_conv())
    assert len(ids) == len(mask) and ids[0] == tok.bos_id
    s = tok.special
    # walk the ids and rebuild the mask independently from the structure
    expected, in_assistant, in_output = [], False, False
    for i in ids:
        if i == s("<|assistant_start|>"):
            expected.append(0)
            in_assistant = True
        elif i == s("<|assistant_end|>"):
            expected.append(1)
            in_assistant = False
        elif i == s("<|output_start|>"):
            expected.append(0)
            in_output = True
        elif i == s("<|output_end|>"):
            expected.append(0)
            in_output = False
        else:
            expected.append(1 if in_assistant and not in_output else 0)
    assert mask == expected
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    assert "Let me count." in learned and "'strawberry'.count('r')" in learned and "You're welcome." in learned
    assert "strawberry?" not in learned and "Thanks" not in learned and "Be brief" not in learned
    assert tok.decode(ids).count("<|assistant_end|>") == 2


def test_system_message_folds_into_first_user_turn(tok):
    ids, _ = tok.render_conversation(_conv())
    text = tok.decode(ids)
    assert text.startswith("<|bos|><|user_start|>Be brief.\n\nHow many r")


def test_render_for_completion_is_a_prefix_of_training_render(tok):
    conv = _conv()
    prompt = tok.render_for_completion(conv["messages"][:4])
    full, _ = tok.render_conversation(conv)
    assert prompt[-1] == tok.special("<|assistant_start|>")
    assert full[:len(prompt)] == prompt


def test_max_tokens_crops(tok):
    ids, mask = tok.render_conversation(_conv(), max_tokens=10)
    assert len(ids) == len(mask) == 10


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty"),
    ([{"role": "assistant", "content": "hi"}], "expected 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "expected 'assistant'"),
    ([{"role": "user", "content": "a"}], "must end with an assistant"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "bad", "text": "x"}]}],
     "each part needs a type"),
    ([{"role": "system", "content": "s"}], "followed by a user"),
    ([{"role": "user"}], "'role' and 'content'"),
])
def test_invalid_conversations_raise_clear_errors(tok, messages, match):
    with pytest.raises(ConversationError, match=match):
        tok.render_conversation({"messages": messages})


def test_completion_needs_a_final_user_turn(tok):
    with pytest.raises(ConversationError, match="end with a user"):
        tok.render_for_completion([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])


def test_tokenizer_commands(home):
    run = [sys.executable, "-m", "picochat", "tokenizer"]
    env_args = dict(capture_output=True, text=True, timeout=300)
    train = subprocess.run(run + ["train", "--run", "cli", "--vocab-size", "300", "--embedded-docs", "500"],
                           **env_args)
    assert train.returncode == 0, train.stderr
    enc = subprocess.run(run + ["encode", "--run", "cli", "--bos", "hello <|bos|>"], **env_args)
    ids = json.loads(enc.stdout)
    tok = Tokenizer.load(home / "runs" / "cli" / "tokenizer")
    assert ids[0] == tok.bos_id and tok.decode(ids[1:]) == "hello <|bos|>"
    info = subprocess.run(run + ["info", "--run", "cli", "--embedded-docs", "500"], **env_args)
    assert info.returncode == 0 and "bytes/token" in info.stdout
    missing = subprocess.run(run + ["encode", "--run", "nothing-here", "x"], **env_args)
    assert missing.returncode == 1 and "tokenizer train" in missing.stderr
