"""The report card from a real (tiny) run: pretraining, `picochat eval base` on a hand-built bundle,
the demo's held-out tasks, then `picochat report`."""

from __future__ import annotations

from test_core_eval import write_bundle

from picochat.cli import main
from picochat.config import DataConfig, TrainConfig
from picochat.runs import RunPaths, read_results


def test_report_card_end_to_end(home, tiny_run, tmp_path, capsys) -> None:
    from picochat.train.cli import pretrain

    pretrain(TrainConfig(run=tiny_run, depth=1, seq_len=64, device_batch_size=4, total_batch_tokens=512,
                         num_steps=4, eval_every=2, sample_every=0, save_every=0, device="cpu"),
             DataConfig(embedded_docs=2000))
    bundle = write_bundle(tmp_path)
    assert main(["eval", "base", "--run", tiny_run, "--bundle", str(bundle), "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| commonsense_qa | multiple_choice | 2 | 4 |" in out and "corrected baselines" in out
    core = read_results(tiny_run)["core_base"]
    assert core["stage"] == "base" and core["baselines"] == "corrected" and len(core["tasks"]) == 3
    assert core["core"] == sum(t["centered"] for t in core["tasks"]) / 3
    assert main(["eval", "--run", tiny_run, "--stage", "base", "--tasks", "identity", "--max-examples", "2",
                 "--max-tokens", "4", "--device", "cpu", "--no-report"]) == 0
    assert main(["eval", "base", "--run", tiny_run, "--bundle", str(tmp_path / "nope")]) == 1

    assert main(["report", "--run", tiny_run]) == 0
    paths = RunPaths.for_run(tiny_run)
    report = paths.report.read_text()
    for heading in ("## System", "## Training", "## CORE (base)", "## Chat evaluation (base): held-out synthetic tasks",
                    "## Totals"):
        assert heading in report, heading
    assert "| base | 4 | d1 × 64 |" in report and "**CORE**" in report and "n/a (CPU run)" in report
    png = paths.root / "loss_base.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG" and "![base loss](loss_base.png)" in report
    assert main(["report", "--run", "no-such-run"]) == 1
