"""Text sources: where documents come from, as numbered chunks of documents.

Owns `TextSource` and its three kinds (`EmbeddedSource`, `FileSource`, `ShardSource`), the train/val
split rule, `open_source(cfg)` and `iter_texts(cfg, split)`. Tokenizing and packing live in the
loader; downloading lives in `download.py`.

A source is a fixed, ordered list of chunk references per split (computed from metadata only: file
sizes and parquet footers). `iter_chunks` walks that list epoch after epoch with a global chunk index
0, 1, 2, ... so the loader can resume at chunk `k` in O(1): chunk `k` is reference `k % n`.

Chunks by file type:

* `.txt`   - the whole file is one chunk. It is split into documents at blank lines, then
             consecutive paragraphs are grouped back into documents of up to `TXT_DOC_CHARS`
             characters, so a short file is one document and a book becomes many coherent ones.
* `.jsonl` - one object per line with a text field; a chunk is the lines that *start* inside a
             `JSONL_CHUNK_BYTES` byte block of the file, so chunk counts come from the file size alone
             (a chunk can be empty when one line spans several blocks).
* `.parquet` - one chunk per row group, text from a column.

Damaged data: a chunk that cannot be read while training (a file damaged or changed on disk) is
skipped with a warning naming the file and the piece, and read as an empty chunk, so chunk numbering
and with it the loader's resume position stay exact; `strict=True` (`--strict-data`) makes it an
error instead. A shard from the download cache that fails to read is first fetched again. A parquet
file whose metadata cannot be read when the source opens keeps the row-group count it had when last
read (`damage.py`), so a run resumed after the damage numbers its chunks as before; without one it
is an error, as it is with `strict`.

Split rule: the val split is the tail of the chunk list, `max(1, round(n * val_fraction))` chunks;
for shards it is the last shard (nanochat's convention) when there are two or more. When a source has
a single chunk, its documents are split instead (the last `val_fraction` of them are val).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..common import log
from ..config import DataConfig
from .damage import DataReadError, SkipDamaged, known_row_groups, remember_row_groups
from .download import download as download_file, download_shards, shard_dir, shard_name, shard_url, validate_parquet

TXT_DOC_CHARS = 4000
JSONL_CHUNK_BYTES = 1 << 20
EMBEDDED_CHUNK_DOCS = 256
SPLITS = ("train", "val")
SUPPORTED_EXTENSIONS = (".txt", ".jsonl", ".parquet")


@dataclass(frozen=True)
class ChunkRef:
    """Where one chunk lives: a file (or the embedded corpus), a piece of it, and a document slice."""

    path: str  # "" for the embedded corpus
    piece: int  # row group (parquet), byte block (jsonl), 0 (txt), first document (embedded)
    docs: tuple[int | None, int | None] = (None, None)  # slice of the chunk's documents to keep


def describe(ref: ChunkRef) -> str:
    """Where a chunk lives, in words for messages: the file and the piece of it."""
    if not ref.path:
        return f"embedded corpus (documents {ref.docs[0]}-{ref.docs[1]})"
    ext = Path(ref.path).suffix.lower()
    if ext == ".parquet":
        return f"{ref.path} (row group {ref.piece})"
    if ext == ".jsonl":
        return f"{ref.path} (bytes {ref.piece * JSONL_CHUNK_BYTES}-{(ref.piece + 1) * JSONL_CHUNK_BYTES})"
    return ref.path


class TextSource:
    """Base of all sources: subclasses provide `name`, `_refs(split)` and `_read(ref)`."""

    name: str = "source"
    strict: bool = False  # a chunk that cannot be read raises instead of being skipped
    _damage: SkipDamaged | None = None

    def _refs(self, split: str) -> Sequence[ChunkRef]:
        raise NotImplementedError

    def _read(self, ref: ChunkRef) -> list[str]:
        raise NotImplementedError

    def num_chunks(self, split: str) -> int:
        """Chunks in one epoch of `split`."""
        return len(self._checked_refs(split))

    def _checked_refs(self, split: str) -> Sequence[ChunkRef]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: use 'train' or 'val'")
        refs = self._refs(split)
        if not refs:
            raise ValueError(f"{self.name}: the {split} split is empty (give more data)")
        return refs

    def read_chunk(self, split: str, index: int) -> list[str]:
        """The documents of global chunk `index` (epochs repeat the same order)."""
        refs = self._checked_refs(split)
        ref = refs[index % len(refs)]
        try:
            docs = self._read(ref)
        except Exception as e:  # readers raise many types (OSError, ValueError, pyarrow's, ...)
            if self._damage is None:
                self._damage = SkipDamaged(self.name)
            self._damage.strict = self.strict
            return self._damage.damaged(describe(ref), split, index, len(refs), e)
        if self._damage is not None:
            self._damage.read_fine(split)
        lo, hi = ref.docs
        return docs[lo:hi] if (lo, hi) != (None, None) else docs

    def iter_chunks(self, split: str, start: int = 0, epochs: int | None = None
                    ) -> Iterator[tuple[int, list[str]]]:
        """Yield (chunk_index, documents) from chunk `start` on, for `epochs` epochs (None: forever).

        Chunk indices count up across epochs; `start` jumps straight to a chunk without reading the
        ones before it. The order is the same every epoch: shuffling, if any, is the loader's job.
        """
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        n = len(self._checked_refs(split))
        stop = None if epochs is None else epochs * n
        index = start
        while stop is None or index < stop:
            yield index, self.read_chunk(split, index)
            index += 1

    def iter_documents(self, split: str = "train") -> Iterator[str]:
        """One pass over the documents of `split`."""
        for _, docs in self.iter_chunks(split, epochs=1):
            yield from docs


def _split_refs(refs: list[ChunkRef], split: str, val_fraction: float, n_docs_single: int | None = None
                ) -> list[ChunkRef]:
    """The tail of `refs` is val. A lone chunk is split by documents (needs its document count)."""
    if len(refs) >= 2:
        n_val = min(len(refs) - 1, max(1, round(len(refs) * val_fraction)))
        return refs[:-n_val] if split == "train" else refs[-n_val:]
    if not refs:
        return []
    n_docs = n_docs_single or 0
    if n_docs < 2:  # nothing to hold out: train gets it, val is empty (and says so when asked)
        return refs if split == "train" else []
    n_val = min(n_docs - 1, max(1, round(n_docs * val_fraction)))
    (ref,) = refs
    return [ChunkRef(ref.path, ref.piece, (None, -n_val) if split == "train" else (-n_val, None))]


# --------------------------------------------------------------------------------------------------


class EmbeddedSource(TextSource):
    """The offline corpus of `corpus.py`: the last `val_fraction` of the documents are val."""

    def __init__(self, n_docs: int = 20000, seed: int = 1234, val_fraction: float = 0.01,
                 chunk_docs: int = EMBEDDED_CHUNK_DOCS):
        self.name = f"embedded(n={n_docs}, seed={seed})"
        self.n_docs, self.seed, self.chunk_docs = n_docs, seed, chunk_docs
        self.n_val = min(n_docs - 1, max(1, round(n_docs * val_fraction))) if n_docs >= 2 else 0
        self._docs: list[str] | None = None

    def _documents(self) -> list[str]:
        if self._docs is None:  # generated on first read: opening a source stays instant
            from .corpus import generate_documents

            self._docs = generate_documents(self.n_docs, self.seed)
        return self._docs

    def _refs(self, split: str) -> list[ChunkRef]:
        lo, hi = (0, self.n_docs - self.n_val) if split == "train" else (self.n_docs - self.n_val, self.n_docs)
        return [ChunkRef("", i, (i, min(i + self.chunk_docs, hi))) for i in range(lo, hi, self.chunk_docs)]

    def read_chunk(self, split: str, index: int) -> list[str]:
        refs = self._checked_refs(split)
        lo, hi = refs[index % len(refs)].docs
        return self._documents()[lo:hi]


# --------------------------------------------------------------------------------------------------


def expand_paths(patterns: Sequence[str]) -> list[Path]:
    """Files named by paths or globs, sorted and de-duplicated; missing ones are an error."""
    if not patterns:
        raise ValueError("source 'files' needs at least one path or glob (--paths)")
    found: dict[str, Path] = {}
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            matches = [m for m in matches if os.path.isfile(m)]
            if not matches:
                raise FileNotFoundError(f"no files match {pattern!r}")
        else:
            if not os.path.isfile(pattern):
                raise FileNotFoundError(f"no such file: {pattern}")
            matches = [pattern]
        for m in matches:
            found.setdefault(os.path.abspath(m), Path(m))
    paths = [found[k] for k in sorted(found)]
    for p in paths:
        if p.suffix.lower() not in SUPPORTED_EXTENSIONS:
            raise ValueError(f"unsupported file type {p.suffix or '(none)'!r} for {p}: "
                             f"use {', '.join(SUPPORTED_EXTENSIONS)}")
    return paths


def split_txt(text: str, max_chars: int = TXT_DOC_CHARS) -> list[str]:
    """Documents of a .txt file: blank-line paragraphs, regrouped up to `max_chars` characters."""
    paragraphs = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n")]
    docs: list[str] = []
    current: list[str] = []
    size = 0
    for p in paragraphs:
        if not p:
            continue
        if current and size + len(p) + 2 > max_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
        current.append(p)
        size += len(p) + 2
    if current:
        docs.append("\n\n".join(current))
    return docs


class FileSource(TextSource):
    """Local `.txt`, `.jsonl` and `.parquet` files, given by paths or globs."""

    def __init__(self, paths: Sequence[str | Path], text_field: str = "text", val_fraction: float = 0.01,
                 name: str | None = None, strict: bool = False):
        self.strict = strict
        self.paths = expand_paths([str(p) for p in paths])
        self.text_field = text_field
        self.val_fraction = val_fraction
        self.name = name or f"files({len(self.paths)} files)"
        self._all = self._all_refs(self.paths)
        self._split_cache: dict[str, list[ChunkRef]] = {}

    def _all_refs(self, paths: Sequence[Path]) -> list[ChunkRef]:
        refs: list[ChunkRef] = []
        row_groups: dict[Path, int] = {}
        for p in paths:
            ext = p.suffix.lower()
            if ext == ".txt":
                refs.append(ChunkRef(str(p), 0))
            elif ext == ".jsonl":
                size = p.stat().st_size
                refs += [ChunkRef(str(p), b) for b in range(max(1, -(-size // JSONL_CHUNK_BYTES)))]
            else:
                row_groups[p] = self._row_groups(p)
                refs += [ChunkRef(str(p), g) for g in range(row_groups[p])]
        if row_groups:
            remember_row_groups(row_groups)
        return refs

    def _row_groups(self, path: Path) -> int:
        try:
            return _parquet_file(path, self.text_field).num_row_groups
        except DataReadError as e:
            known = None if self.strict else known_row_groups(path)
            if known is None:
                raise
            log.warning(f"{e}; numbering its chunks as when it was last read ({known} row groups): "
                        "they will be skipped as damaged (--strict-data makes this an error)")
            return known

    def _refs(self, split: str) -> list[ChunkRef]:
        if split not in self._split_cache:
            # Counting documents is only needed for a lone chunk (a small single file).
            n_single = len(self._read(self._all[0])) if len(self._all) == 1 else None
            self._split_cache[split] = _split_refs(self._all, split, self.val_fraction, n_single)
        return self._split_cache[split]

    def _read(self, ref: ChunkRef) -> list[str]:
        path = Path(ref.path)
        ext = path.suffix.lower()
        if ext == ".txt":
            return split_txt(path.read_text(encoding="utf-8", errors="replace"))
        if ext == ".jsonl":
            return _read_jsonl_block(path, ref.piece, self.text_field)
        return _read_parquet_group(path, ref.piece, self.text_field)


def _parquet_file(path: Path, column: str):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for damaged files
        raise DataReadError(f"{path}: not a readable parquet file ({e})") from e
    names = pf.schema_arrow.names
    if column not in names:
        raise ValueError(f"{path}: no column {column!r} (columns: {', '.join(names)}); set --text-field")
    return pf


def _read_parquet_group(path: Path, group: int, column: str) -> list[str]:
    table = _parquet_file(path, column).read_row_group(group, columns=[column])
    return [t for t in table.column(0).to_pylist() if t]


def _read_jsonl_block(path: Path, block: int, field: str) -> list[str]:
    """Documents of the lines that start inside byte block `block` of a .jsonl file."""
    lo, hi = block * JSONL_CHUNK_BYTES, (block + 1) * JSONL_CHUNK_BYTES
    docs: list[str] = []
    with open(path, "rb") as f:
        if lo > 0:
            # Finish the line holding byte lo-1: whatever follows starts at or after `lo`.
            f.seek(lo - 1)
            f.readline()
        while True:
            pos = f.tell()
            if pos >= hi:
                break
            raw = f.readline()
            if not raw:
                break
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}:{_line_number(path, pos)}: malformed JSON line ({e})") from e
            if not isinstance(obj, dict) or field not in obj:
                raise ValueError(f"{path}:{_line_number(path, pos)}: no field {field!r} "
                                 f"(set --text-field)")
            text = obj[field]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{_line_number(path, pos)}: field {field!r} is "
                                 f"{type(text).__name__}, not a string")
            if text:
                docs.append(text)
    return docs


def _line_number(path: Path, pos: int) -> int:
    # Only computed for error messages, so reading the prefix again is fine.
    with open(path, "rb") as f:
        return f.read(pos).count(b"\n") + 1


# --------------------------------------------------------------------------------------------------


class ShardSource(FileSource):
    """FineWeb-Edu parquet shards as nanochat uses them: shards 0..num_shards-1, the last one is val.

    Shards are downloaded (resumably, under a lock) when the source is opened; with a single shard,
    its row groups are split by `val_fraction` instead.
    """

    def __init__(self, cfg: DataConfig, download: bool = True):
        self.cfg, self._download = cfg, download
        if cfg.num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {cfg.num_shards}")
        if download:
            paths = download_shards(cfg, range(cfg.num_shards))
        else:
            paths = [shard_dir() / shard_name(i) for i in range(cfg.num_shards)]
            missing = [str(p) for p in paths if not p.exists()]
            if missing:
                raise FileNotFoundError(f"shards not downloaded: {', '.join(missing)} "
                                        f"(run `picochat data download --num-shards {cfg.num_shards}`)")
        super().__init__(paths, text_field=cfg.text_field, val_fraction=cfg.val_fraction, strict=cfg.strict_data,
                         name=f"shards({cfg.num_shards})")
        self._n_last = _parquet_file(Path(paths[-1]), self.text_field).num_row_groups

    def _refs(self, split: str) -> list[ChunkRef]:
        if len(self.paths) < 2:
            return super()._refs(split)
        n_last = self._n_last
        return self._all[:-n_last] if split == "train" else self._all[-n_last:]

    def _read(self, ref: ChunkRef) -> list[str]:
        """A shard that fails to read is fetched again (the downloader checks it, sees the damage and
        downloads it afresh under its lock, so ranks share one transfer), then read once more."""
        try:
            return super()._read(ref)
        except Exception as damage:
            if not self._download:
                raise
            index = int(Path(ref.path).stem.split("_")[-1])
            log.warning(f"{ref.path} cannot be read ({damage}); fetching it again")
            try:
                download_file(shard_url(self.cfg, index), Path(ref.path), validate=validate_parquet, progress=False)
            except Exception as e:
                raise DataReadError(f"{damage}; fetching it again failed: {e}") from e
            return super()._read(ref)


# --------------------------------------------------------------------------------------------------


def open_source(cfg: DataConfig) -> TextSource:
    """The source a DataConfig names (embedded, files or shards)."""
    if cfg.source == "embedded":
        source: TextSource = EmbeddedSource(cfg.embedded_docs, cfg.embedded_seed, cfg.val_fraction)
    elif cfg.source == "files":
        source = FileSource(cfg.paths, cfg.text_field, cfg.val_fraction, strict=cfg.strict_data)
    elif cfg.source == "shards":
        source = ShardSource(cfg)
    else:
        raise ValueError(f"unknown data source {cfg.source!r}: use embedded, files or shards")
    source.strict = cfg.strict_data
    return source


def iter_texts(cfg: DataConfig, split: str = "train") -> Iterator[str]:
    """One pass over the documents of a split (tokenizer training, previews, stats)."""
    yield from open_source(cfg).iter_documents(split)
