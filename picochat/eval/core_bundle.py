"""The DCLM eval bundle as nanochat uses it for CORE: where it comes from and what it says.

Layout (a folder, or a zip holding one, possibly nested one level, e.g. `eval_bundle/`):
    core.yaml            `icl_tasks:` a list of {label, dataset_uri, num_fewshot, icl_task_type,
                         continuation_delimiter (default " ")}
    eval_data/<uri>      one JSON object per line; by task type:
                           multiple_choice   {"query", "choices": [...], "gold": int}
                           schema            {"context_options": [...], "continuation", "gold": int}
                           language_modeling {"context", "continuation"}
    eval_meta_data.csv   columns "Eval Task" and "Random baseline" (percent)

Source: a URL (downloaded once with picochat's resumable, verified downloader into
`$PICOCHAT_HOME/downloads/`, then unpacked there) or a local folder or zip.

Random baselines: the bundle nanochat ships carries DCLM's original `eval_meta_data.csv`, in which
several baselines were set wrongly (DCLM issue mlfoundations/dclm#114, reported by nanochat's author;
nanochat issue karpathy/nanochat#321). DCLM corrected the file in commit 6204236 ("fix averaging and
add documentation", 2025-09-05; unchanged at 2967b44, the revision nanochat#321 points to).
`CORRECTED_BASELINES` holds the corrected values of the CORE tasks that changed; by default they
replace the bundle's, and `baselines="bundle"` keeps the bundle's own file (to reproduce numbers
published with it, e.g. nanochat's). Result files record which was used.
"""

from __future__ import annotations

import csv
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

# The nanochat eval bundle (DCLM's CORE tasks). Any mirror with the same layout works.
DEFAULT_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")

# Percent. Old value in the comments; from mlfoundations/dclm eval/eval_meta_data.csv at 6204236.
CORRECTED_BASELINES: dict[str, float] = {
    "commonsense_qa": 40.3,  # was 20
    "bigbench_language_identification": 25.0,  # was 9.1
    "agi_eval_lsat_ar": 25.0,  # was 20
    # DCLM tasks outside CORE that changed in the same commit
    "siqa": 50.0, "bigbench_novel_concepts": 25.0, "bigbench_conceptual_combinations": 33.0,
    "bigbench_elementary_math_qa": 25.0, "bigbench_logical_deduction": 25.0, "logi_qa": 25.0,
    "agi_eval_lsat_rc": 25.0, "agi_eval_lsat_lr": 25.0, "bigbench_understanding_fables": 25.0,
}
BASELINE_SOURCES = ("corrected", "bundle")


@dataclass(frozen=True)
class CoreTask:
    label: str
    task_type: str  # one of TASK_TYPES
    dataset: Path
    num_fewshot: int
    delimiter: str
    baseline: float  # random baseline as a fraction in [0, 1)


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _bundle_root(folder: Path) -> Path:
    """The folder holding core.yaml: `folder` itself or one of its subfolders."""
    if (folder / "core.yaml").exists():
        return folder
    found = sorted(folder.glob("*/core.yaml"))
    if not found:
        raise FileNotFoundError(f"no core.yaml in {folder} (expected the DCLM eval bundle layout)")
    return found[0].parent


def _unpack(archive: Path, dest: Path) -> Path:
    """Extract `archive` into `dest` once (atomically: a temp folder renamed into place)."""
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
        try:
            with zipfile.ZipFile(archive) as z:
                for name in z.namelist():  # refuse paths that would land outside the folder
                    if name.startswith("/") or ".." in Path(name).parts:
                        raise ValueError(f"{archive}: unsafe path {name!r} in the zip")
                z.extractall(tmp)
            tmp.rename(dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _bundle_root(dest)


def _check_zip(path: Path) -> None:
    with zipfile.ZipFile(path) as z:
        bad = z.testzip()
        if bad is not None:
            raise ValueError(f"corrupt member {bad}")


def open_bundle(source: str | Path | None = None) -> Path:
    """The bundle's root folder, downloading and unpacking it first if needed."""
    from ..common import downloads_dir

    source = str(source or DEFAULT_BUNDLE_URL)
    if is_url(source):
        from ..data.download import download

        name = Path(source.split("?")[0]).name or "eval_bundle.zip"
        archive = download(source, downloads_dir() / "eval" / name, validate=_check_zip)
        return _unpack(archive, downloads_dir() / "eval" / (Path(name).stem + ".d"))
    path = Path(source).expanduser()
    if path.is_dir():
        return _bundle_root(path)
    if path.is_file() and zipfile.is_zipfile(path):
        import hashlib

        tag = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode()).hexdigest()
        return _unpack(path, downloads_dir() / "eval" / f"{path.stem}.{tag[:12]}.d")
    raise FileNotFoundError(f"eval bundle not found: {source} (a URL, a folder or a .zip)")


def read_baselines(root: Path, source: str = "corrected") -> dict[str, float]:
    """Random baselines in percent by task label (see the module docstring for `source`)."""
    if source not in BASELINE_SOURCES:
        raise ValueError(f"baselines must be one of {BASELINE_SOURCES}, got {source!r}")
    out: dict[str, float] = {}
    meta = root / "eval_meta_data.csv"
    if meta.exists():
        with open(meta, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                label, value = row.get("Eval Task"), row.get("Random baseline")
                if label and value not in (None, ""):
                    out[label.strip()] = float(value)
    if source == "corrected":
        out.update(CORRECTED_BASELINES)
    return out


def load_tasks(root: Path, baselines: str = "corrected") -> list[CoreTask]:
    """The bundle's CORE tasks of the three supported types, in core.yaml order."""
    import yaml

    config = yaml.safe_load((root / "core.yaml").read_text(encoding="utf-8")) or {}
    table = read_baselines(root, baselines)
    tasks = []
    for entry in config.get("icl_tasks", []):
        label, kind = entry["label"], entry["icl_task_type"]
        if kind not in TASK_TYPES:
            raise ValueError(f"core.yaml task {label!r}: type {kind!r} is not one of {TASK_TYPES}")
        shots = entry.get("num_fewshot", 0)
        shots = int(shots[0] if isinstance(shots, list) else shots)
        if label not in table:
            raise ValueError(f"no random baseline for task {label!r} in eval_meta_data.csv")
        tasks.append(CoreTask(label, kind, root / "eval_data" / entry["dataset_uri"], shots,
                              entry.get("continuation_delimiter", " "), table[label] / 100.0))
    if not tasks:
        raise ValueError(f"{root / 'core.yaml'} lists no icl_tasks")
    return tasks


def read_items(task: CoreTask) -> list[dict]:
    import json

    if not task.dataset.exists():
        raise FileNotFoundError(f"{task.label}: data file {task.dataset} is missing from the bundle")
    with open(task.dataset, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
