"""`picochat export`: write a trained model in another ecosystem's format.

Formats: `hf`, a Hugging Face transformers folder (hf.py: weights and config; hf_tokenizer.py:
tokenizer and chat template) that loads with `AutoModelForCausalLM` / `AutoTokenizer` without
picochat installed; verify.py checks an export against picochat (`--verify`). See docs/export.md.
"""

from __future__ import annotations

import argparse

FORMATS = ("hf",)


def register(sub: argparse._SubParsersAction) -> None:
    from ..options import add_run_arg
    from ..runs import STAGES

    p = sub.add_parser("export", help="write a trained model as a Hugging Face transformers folder",
                       description="Export the run's latest checkpoint (default: the last stage trained) "
                                   "to a folder that transformers loads without picochat.")
    add_run_arg(p)
    p.add_argument("--stage", choices=list(STAGES), default=None,
                   help="which stage's checkpoint (default: rl, else sft, mid, base: the last one trained)")
    p.add_argument("--step", type=int, default=None, help="a specific checkpoint step (default: the latest)")
    p.add_argument("--format", choices=FORMATS, default="hf", help="output format (default: hf)")
    p.add_argument("--out", required=True, help="output folder (created; must be empty unless --force)")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty folder, replacing the export's files there")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="weight precision of the export (default: float32, as the checkpoint stores them)")
    p.add_argument("--verify", action="store_true",
                   help="then load the export in transformers and check logits, tokenizer and chat template "
                        "against picochat (needs transformers; a float32 export)")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from .hf import export_hf

    if args.verify and args.dtype != "float32":
        raise ValueError("--verify compares float32 logits; export with --dtype float32 to verify")
    result = export_hf(args.run, args.out, stage=args.stage, step=args.step, force=args.force, dtype=args.dtype)
    step = f" step {result.step}" if result.step is not None else ""
    print(f"exported run {args.run!r} stage {result.stage}{step} ({result.checkpoint}) to {result.out}: "
          f"{', '.join(result.files)}")
    if args.verify:
        from .verify import verify_export

        check = verify_export(args.run, result.out, stage=result.stage, step=result.step)
        print(f"verified: transformers' logits match picochat's on {check.tokens} random tokens (largest "
              f"difference {check.max_logit_diff:.2g}); tokenizer and chat template give picochat's ids")
    return 0
