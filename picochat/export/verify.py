"""`picochat export --verify`: load an export in transformers and check it against picochat.

Runs the checkpoint's model both ways on random token ids and compares the logits, and checks that
the exported tokenizer and chat template give picochat's ids on a sample. Meant for real trained
checkpoints (the tests do the same on random tiny models); needs transformers installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .hf import ExportError

SAMPLE_TEXT = "Grüße, 世界! 12345 + 0.5 — it's <|bos|> and <|assistant_end|>\n\n  done\t🙂"
SAMPLE_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 3 * 4?"},
    {"role": "assistant", "content": [{"type": "python", "text": "3 * 4"},
                                      {"type": "python_output", "text": "12"},
                                      {"type": "text", "text": "12."}]},
    {"role": "user", "content": "Thanks! Ünïcödé?"},
]
# float32 on CPU; deep models accumulate rounding differences of order 1e-5 in logits capped at 15
LOGIT_ATOL = 1e-3


@dataclass(frozen=True)
class Verification:
    max_logit_diff: float
    tokens: int


def verify_export(run: str, out: Path | str, stage: str | None = None, step: int | None = None,
                  length: int = 128, seed: int = 0) -> Verification:
    """Raise ExportError naming the first disagreement; return the logit agreement otherwise."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ExportError("--verify needs transformers: pip install 'transformers>=5.24'") from e
    from ..runs import load_model

    model, tok, _ = load_model(run, stage, torch.device("cpu"), step=step)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    T = min(length, model.config.seq_len)
    ids = torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        diff = (hf(input_ids=ids).logits.float() - model(ids)).abs().max().item()
    if not diff <= LOGIT_ATOL:  # also catches NaN
        raise ExportError(f"transformers' logits differ from picochat's by up to {diff:.3g} (> {LOGIT_ATOL})")

    plain = AutoTokenizer.from_pretrained(out, split_special_tokens=True)
    if plain(SAMPLE_TEXT)["input_ids"] != tok.encode(SAMPLE_TEXT):
        raise ExportError("the exported tokenizer encodes the sample text differently from picochat")
    chat_tok = AutoTokenizer.from_pretrained(out)
    ids_chat = chat_tok.apply_chat_template(SAMPLE_CHAT, add_generation_prompt=True, return_dict=False)
    if list(ids_chat) != tok.render_for_completion(SAMPLE_CHAT):
        raise ExportError("the exported chat template renders the sample chat differently from picochat")
    return Verification(diff, ids.numel())
