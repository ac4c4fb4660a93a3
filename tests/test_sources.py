"""Text sources: embedded corpus, local files, chunk iteration, splits and errors."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from picochat.config import DataConfig
from picochat.data import sources
from picochat.data.corpus import FACTS, RELATIONS, fact_qa, fact_statement, generate_documents
from picochat.data.sources import EmbeddedSource, FileSource, iter_texts, open_source, split_txt


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))


# -- embedded corpus ---------------------------------------------------------------------------------


def test_embedded_deterministic_and_seeded():
    a = generate_documents(300, seed=7)
    assert a == generate_documents(300, seed=7)
    assert a != generate_documents(300, seed=8)
    assert generate_documents(100, seed=7) == a[:100]  # a prefix is stable


def test_embedded_variety_and_lengths():
    docs = generate_documents(2000, seed=1)
    assert len(set(docs)) > 1990
    lengths = [len(d.split()) for d in docs]
    assert min(lengths) >= 25 and max(lengths) <= 330
    kinds = Counter("story" if "named" in d else "math" if re.search(r"\d+ (plus|minus|times) \d+ is", d)
                    else "facts" for d in docs)
    assert all(kinds[k] > 150 for k in ("story", "math", "facts")), kinds
    vocab = {w.lower() for d in docs for w in re.findall(r"[A-Za-z]+", d)}
    assert 300 <= len(vocab) <= 2000
    # arithmetic is correct
    for d in docs:
        for a, op, b, c in re.findall(r"(\d+) (plus|minus|times) (\d+) is (\d+)\.", d):
            a, b, c = int(a), int(b), int(c)
            assert c == {"plus": a + b, "minus": a - b, "times": a * b}[op]


def test_facts_as_data_appear_in_corpus():
    assert {f.relation for f in FACTS} == set(RELATIONS)
    q, a = fact_qa(next(f for f in FACTS if f.subject == "France" and f.relation == "capital"))
    assert q == "What is the capital of France?" and "Paris" in a
    for f in FACTS:
        assert f.value in fact_statement(f) and fact_qa(f)[0].endswith("?")
    text = "\n".join(generate_documents(3000, seed=3))
    assert "The capital of Japan is Tokyo." in text or "Tokyo is the capital of Japan." in text


def test_embedded_source_splits_and_chunks():
    src = EmbeddedSource(n_docs=1000, seed=5, val_fraction=0.1, chunk_docs=64)
    train = list(src.iter_documents("train"))
    val = list(src.iter_documents("val"))
    assert len(train) == 900 and len(val) == 100
    assert set(train).isdisjoint(val)
    assert train + val == generate_documents(1000, seed=5)
    assert src.num_chunks("train") == 15  # ceil(900 / 64)


def test_iter_chunks_start_and_epochs():
    src = EmbeddedSource(n_docs=500, seed=2, val_fraction=0.1, chunk_docs=100)
    n = src.num_chunks("train")
    assert n == 5
    two = list(src.iter_chunks("train", epochs=2))
    assert [i for i, _ in two] == list(range(10))
    assert two[0][1] == two[5][1] and two[3][1] == two[8][1]  # same order every epoch
    resumed = list(src.iter_chunks("train", start=7, epochs=2))
    assert resumed == two[7:]
    forever = src.iter_chunks("train")  # epochs=None repeats without end
    got = [next(forever)[0] for _ in range(23)]
    assert got == list(range(23))
    assert list(src.iter_chunks("train", start=12, epochs=2)) == []
    with pytest.raises(ValueError, match="split"):
        list(src.iter_chunks("test"))


def test_open_source_default_and_iter_texts():
    cfg = DataConfig(embedded_docs=200, embedded_seed=9)
    assert isinstance(open_source(cfg), EmbeddedSource)
    texts = list(iter_texts(cfg))
    assert len(texts) == 198 and texts == generate_documents(200, 9)[:198]
    with pytest.raises(ValueError, match=r"source \(--source\) must be one of embedded, files, shards"):
        open_source(DataConfig(source="nope"))  # the config itself refuses it


# -- local files -------------------------------------------------------------------------------------


def _write_parquet(path: Path, texts: list[str], rows_per_group: int, column: str = "text") -> None:
    pq.write_table(pa.table({column: texts, "id": list(range(len(texts)))}), path, row_group_size=rows_per_group)


def test_txt_files_and_globs(tmp_path):
    (tmp_path / "b.txt").write_text("Second file.\n\nIt has two paragraphs.\n")
    (tmp_path / "a.txt").write_text("First file, one paragraph.\n")
    (tmp_path / "c.md").write_text("not matched by the glob")
    src = FileSource([str(tmp_path / "*.txt")], val_fraction=0.5)
    assert [p.name for p in src.paths] == ["a.txt", "b.txt"]  # sorted
    assert list(src.iter_documents("train")) == ["First file, one paragraph."]
    assert list(src.iter_documents("val")) == ["Second file.\n\nIt has two paragraphs."]


def test_split_txt_groups_paragraphs():
    paras = [f"Paragraph {i} " + "word " * 30 for i in range(40)]
    docs = split_txt("\n\n\n".join(paras), max_chars=500)
    assert len(docs) > 5 and all(len(d) <= 500 for d in docs)
    assert "\n\n".join(docs).replace("\n\n", " ").split() == " ".join(paras).split()


def test_jsonl_chunks_by_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "JSONL_CHUNK_BYTES", 256)
    texts = [f"document number {i} " + "x" * (i % 37) for i in range(200)]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"body": t, "n": i}) for i, t in enumerate(texts)) + "\n\n")
    src = FileSource([path], text_field="body", val_fraction=0.1)
    train = list(src.iter_documents("train"))
    val = list(src.iter_documents("val"))
    assert train + val == texts  # every line exactly once, in order, across block boundaries
    assert val and set(train).isdisjoint(val)
    n = src.num_chunks("train")
    chunks = list(src.iter_chunks("train", epochs=1))
    assert list(src.iter_chunks("train", start=n // 2, epochs=1)) == chunks[n // 2:]


def test_parquet_row_groups_and_multi_file(tmp_path):
    _write_parquet(tmp_path / "p0.parquet", [f"a{i}" for i in range(100)], 25)
    _write_parquet(tmp_path / "p1.parquet", [f"b{i}" for i in range(50)], 25)
    src = FileSource([tmp_path / "p1.parquet", str(tmp_path / "p*.parquet")], val_fraction=0.2)
    assert len(src.paths) == 2  # de-duplicated
    assert src.num_chunks("train") == 5 and src.num_chunks("val") == 1
    assert list(src.iter_documents("val")) == [f"b{i}" for i in range(25, 50)]
    assert next(src.iter_chunks("train", start=4))[1] == [f"b{i}" for i in range(25)]


def test_single_chunk_file_splits_documents(tmp_path):
    _write_parquet(tmp_path / "one.parquet", [f"t{i}" for i in range(10)], 100)
    src = FileSource([tmp_path / "one.parquet"], val_fraction=0.2)
    assert list(src.iter_documents("train")) == [f"t{i}" for i in range(8)]
    assert list(src.iter_documents("val")) == ["t8", "t9"]
    (tmp_path / "lone.txt").write_text("only one document")
    lone = FileSource([tmp_path / "lone.txt"])
    assert list(lone.iter_documents("train")) == ["only one document"]
    with pytest.raises(ValueError, match="val split is empty"):
        list(lone.iter_documents("val"))


def test_open_source_files_from_config(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "hello"}\n{"text": "world"}\n{"text": "again"}\n')
    cfg = DataConfig(source="files", paths=[str(tmp_path / "*.jsonl")], val_fraction=0.34)
    assert list(iter_texts(cfg)) == ["hello", "world"]
    assert list(iter_texts(cfg, "val")) == ["again"]


# -- errors ------------------------------------------------------------------------------------------


def test_missing_files_and_bad_extension(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        FileSource([tmp_path / "absent.txt"])
    with pytest.raises(FileNotFoundError, match="no files match"):
        FileSource([str(tmp_path / "*.jsonl")])
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        FileSource([tmp_path / "data.csv"])
    with pytest.raises(ValueError, match="at least one path"):
        FileSource([])


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "fine"}\n{"text": broken\n{"text": "after"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: malformed JSON"):
        list(FileSource([path]).iter_documents("train"))
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: no field 'text'"):
        list(FileSource([path]).iter_documents("train"))
    path.write_text('{"text": 5}\n{"text": "x"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: field 'text' is int"):
        list(FileSource([path]).iter_documents("train"))


def test_parquet_missing_column_and_corrupt(tmp_path):
    _write_parquet(tmp_path / "c.parquet", ["a", "b"], 1, column="content")
    with pytest.raises(ValueError, match="no column 'text'.*content"):
        FileSource([tmp_path / "c.parquet"])
    assert list(FileSource([tmp_path / "c.parquet"], text_field="content").iter_documents("train")) == ["a"]
    (tmp_path / "junk.parquet").write_bytes(b"this is not parquet at all")
    with pytest.raises(ValueError, match="not a readable parquet file"):
        FileSource([tmp_path / "junk.parquet"])


def test_shard_source_uses_last_shard_as_val(tmp_path):
    shard_dir = sources.shard_dir()
    shard_dir.mkdir(parents=True)
    for i in range(3):
        _write_parquet(shard_dir / sources.shard_name(i), [f"s{i}-{j}" for j in range(20)], 10)
    src = sources.ShardSource(DataConfig(source="shards", num_shards=3), download=False)
    assert list(src.iter_documents("val")) == [f"s2-{j}" for j in range(20)]
    assert len(list(src.iter_documents("train"))) == 40
    with pytest.raises(FileNotFoundError, match="picochat data download"):
        sources.ShardSource(DataConfig(source="shards", num_shards=5), download=False)


def test_cli_config_from_args(tmp_path, monkeypatch):
    import argparse

    from picochat.data.cli import add_source_args, data_config_from_args

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.jsonl").write_text('{"body": "x"}\n')
    p = argparse.ArgumentParser()
    add_source_args(p)
    cfg = data_config_from_args(p.parse_args([]))
    assert cfg == DataConfig()
    cfg = data_config_from_args(p.parse_args(["--paths", "a.txt", "b/*.jsonl", "--text-field", "body"]))
    assert cfg.source == "files" and cfg.paths == ["a.txt", "b/*.jsonl"] and cfg.text_field == "body"
    cfg = data_config_from_args(p.parse_args(["--source", "shards", "--num-shards", "4", "--shard-url", "http://x"]))
    assert (cfg.source, cfg.num_shards, cfg.shard_url) == ("shards", 4, "http://x")
    with pytest.raises(ValueError, match="--paths"):
        data_config_from_args(p.parse_args(["--source", "embedded", "--paths", "a.txt"]))
    with pytest.raises(ValueError, match=r"\(--paths\) must be existing files or globs that match files"):
        data_config_from_args(p.parse_args(["--paths", "a.txt", "nope*.txt"]))
