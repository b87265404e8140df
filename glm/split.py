"""The split stage: corpus files -> Arrow files of (doc_id, sentence_index, text) + stats.

Work is cut into chunks so that more cores help on one big file too: a ``.txt`` or
``.jsonl`` file is cut into byte ranges of about ``chunk_bytes`` that end at a line
(``.jsonl``) or blank line (``.txt``) boundary, a parquet file into row groups, and a
``.jsonl.gz`` file is one chunk (gzip cannot be entered mid-stream). Chunks depend on the
files and ``chunk_bytes`` only, never on the number of workers, and each chunk writes its
own ``sentences-NNNNN.arrow``, so the output is byte-identical for any ``workers``.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from glm.atomic import atomic_dir, write_json_atomic
from glm.corpus import (
    CorpusFile,
    ReadOptions,
    check_parquet_columns,
    gzip_documents,
    jsonl_documents,
    parquet_documents,
    resolve_corpus,
    txt_documents,
)
from glm.errors import InputError, IntegrityError
from glm.faults import fault_point
from glm.sentences import MAX_SENTENCE_CHARS, split_sentences

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SENTENCE_SCHEMA = pa.schema(
    [("doc_id", pa.string()), ("sentence_index", pa.int32()), ("text", pa.string())]
)
_BATCH_ROWS = 32768
_SCAN_BLOCK = 1 << 16
_TXT_BOUNDARY = re.compile(rb"\n[ \t\r]*\n")


@dataclass
class SplitConfig(ReadOptions):
    """Settings of the split stage (reading options are inherited from ``ReadOptions``)."""

    # worker processes; 0 means one per CPU core
    workers: int = 0
    # target bytes per chunk of a big file: the unit of parallel work (and of output files)
    chunk_bytes: int = 1 << 20
    # no sentence is longer than this (longer ones are cut at whitespace or hard)
    max_sentence_chars: int = MAX_SENTENCE_CHARS

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.workers < 0:
            raise InputError(f"workers must be >= 0, not {self.workers}")
        if self.chunk_bytes < 4096:
            raise InputError(f"chunk_bytes must be >= 4096, not {self.chunk_bytes}")
        if self.max_sentence_chars < 16:
            raise InputError(f"max_sentence_chars must be >= 16, not {self.max_sentence_chars}")


@dataclass(frozen=True)
class Chunk:
    """A unit of work: a byte range (txt, jsonl), row groups (parquet) or a whole gzip file."""

    file: CorpusFile
    start: int
    end: int
    # index of the chunk's first document (txt), line (jsonl) or row (parquet)
    first_index: int = 0


def _boundaries(path: Path, size: int, chunk_bytes: int, pattern: re.Pattern) -> list[int]:
    """Cut offsets of about ``chunk_bytes`` each, just after a match of ``pattern``'s "\\n"."""
    cuts = [0]
    with open(path, "rb") as f:
        while cuts[-1] + chunk_bytes < size:
            base = cuts[-1] + chunk_bytes
            f.seek(base)
            window = b""
            cut = size
            while True:
                block = f.read(_SCAN_BLOCK)
                if not block:
                    break
                window += block
                m = pattern.search(window)
                if m:
                    cut = base + m.start() + 1
                    break
                # keep a tail so a boundary straddling two blocks is still found
                keep = window[-4096:]
                base += len(window) - len(keep)
                window = keep
            if cut >= size:
                break
            cuts.append(cut)
    cuts.append(size)
    return cuts


def _count_newlines(path: Path, cuts: list[int]) -> list[int]:
    """Number of lines before each cut offset (one sequential pass)."""
    counts = []
    seen = 0
    pos = 0
    with open(path, "rb") as f:
        for cut in cuts:
            while pos < cut:
                block = f.read(min(1 << 20, cut - pos))
                seen += block.count(b"\n")
                pos += len(block)
            counts.append(seen)
    return counts


def plan_chunks(files: list[CorpusFile], cfg: SplitConfig) -> list[Chunk]:
    """Cut the corpus into chunks (txt first indices are fixed later by ``_count_txt``)."""
    chunks: list[Chunk] = []
    for file in files:
        if file.kind == "jsonl":
            cuts = _boundaries(file.path, file.size, cfg.chunk_bytes, re.compile(rb"\n"))
            lines = _count_newlines(file.path, cuts)
            chunks += [Chunk(file, a, b, n) for a, b, n in zip(cuts, cuts[1:], lines, strict=False)]
        elif file.kind == "txt":
            cuts = _boundaries(file.path, file.size, cfg.chunk_bytes, _TXT_BOUNDARY)
            chunks += [Chunk(file, a, b) for a, b in zip(cuts, cuts[1:], strict=False)]
        elif file.kind == "jsonl.gz":
            chunks.append(Chunk(file, 0, file.size))
        else:
            check_parquet_columns(file, cfg)
            meta = pq.ParquetFile(file.path).metadata
            row = 0
            group_start = 0
            group_bytes = 0
            for rg in range(meta.num_row_groups):
                group_bytes += meta.row_group(rg).total_byte_size
                if group_bytes >= cfg.chunk_bytes or rg == meta.num_row_groups - 1:
                    chunks.append(Chunk(file, group_start, rg + 1, row))
                    for r in range(group_start, rg + 1):
                        row += meta.row_group(r).num_rows
                    group_start, group_bytes = rg + 1, 0
    return chunks


def _count_txt(task: tuple[Chunk, SplitConfig]) -> int:
    chunk, cfg = task
    return sum(1 for _ in txt_documents(chunk.file, chunk.start, chunk.end, cfg, Counter()))


def _chunk_documents(chunk: Chunk, cfg: SplitConfig, counts: Counter) -> Iterator[tuple[str, str]]:
    file = chunk.file
    if file.kind == "txt":
        docs = txt_documents(file, chunk.start, chunk.end, cfg, counts)
        for index, text in enumerate(docs, start=chunk.first_index):
            yield f"{file.rel}#{index}", text
        return
    if file.kind == "jsonl":
        docs = jsonl_documents(file, chunk.start, chunk.end, chunk.first_index, cfg, counts)
    elif file.kind == "jsonl.gz":
        docs = gzip_documents(file, cfg, counts)
    else:
        rows = range(chunk.start, chunk.end)
        docs = parquet_documents(file, rows, chunk.first_index, cfg, counts)
    for doc in docs:
        yield doc.doc_id, doc.text


def _split_chunk(task: tuple[Chunk, SplitConfig, str, int]) -> dict:
    """Split one chunk into sentences and write its Arrow file; return its counts."""
    chunk, cfg, out_path, number = task
    counts: Counter = Counter()
    ids: list[str] = []
    indices: list[int] = []
    texts: list[str] = []
    writer = None

    def flush() -> None:
        nonlocal writer
        if writer is None:
            writer = ipc.new_file(out_path, SENTENCE_SCHEMA)
        batch = pa.record_batch(
            [pa.array(ids, pa.string()), pa.array(indices, pa.int32()), pa.array(texts)],
            schema=SENTENCE_SCHEMA,
        )
        writer.write_batch(batch)
        ids.clear()
        indices.clear()
        texts.clear()

    for doc_id, text in _chunk_documents(chunk, cfg, counts):
        sentences = split_sentences(text, cfg.max_sentence_chars, counts)
        counts["documents"] += 1
        counts["sentences"] += len(sentences)
        counts["text_bytes"] += len(text.encode("utf-8"))
        ids.extend([doc_id] * len(sentences))
        indices.extend(range(len(sentences)))
        texts.extend(sentences)
        if len(texts) >= _BATCH_ROWS:
            flush()
    if texts:
        flush()
    if writer is not None:
        writer.close()
    fault_point("split", number, Path(out_path).parent)
    return dict(counts)


def _mp_context() -> multiprocessing.context.BaseContext:
    """Fork when this process runs a single thread (instant, nothing re-imported); spawn
    otherwise, since a forked child could inherit a lock another thread holds (Prefect's
    engine runs threads)."""
    if threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _ignore_ctrl_c() -> None:
    """Pool workers leave Ctrl-C to the parent, which stops the pool (no worker tracebacks)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _pool_map(fn, tasks: list, workers: int) -> list:
    """``map`` in order, in a process pool when there is more than one task and worker."""
    if workers <= 1 or len(tasks) <= 1:
        return [fn(t) for t in tasks]
    with _mp_context().Pool(min(workers, len(tasks)), _ignore_ctrl_c) as pool:
        return pool.map(fn, tasks, chunksize=1)


def no_text_error(n_files: int, where) -> InputError:
    return InputError(
        f"corpus has no text: {n_files} file(s), every document empty or whitespace", where
    )


def split_corpus(specs: list[str], out_dir: str | Path, cfg: SplitConfig) -> dict:
    """Read the corpus, split every document into sentences, write Arrow files + stats.json.

    Raises ``InputError`` for bad input (before any output appears) and when the corpus has
    no text at all. Returns the stats written to ``stats.json``.
    """
    t0 = time.perf_counter()
    files = resolve_corpus([str(s) for s in specs])
    workers = cfg.workers or os.cpu_count() or 1
    chunks = plan_chunks(files, cfg)

    # txt document indices continue across the chunks of one file: count documents first
    multi = {c.file.path for c in chunks if c.file.kind == "txt" and c.start > 0}
    counted = [c for c in chunks if c.file.path in multi]
    if counted:
        tasks = [(c, cfg) for c in counted]
        n_docs = dict(zip(counted, _pool_map(_count_txt, tasks, workers), strict=True))
        running: dict[Path, int] = {}
        for i, c in enumerate(chunks):
            if c in n_docs:
                first = running.get(c.file.path, 0)
                running[c.file.path] = first + n_docs[c]
                chunks[i] = Chunk(c.file, c.start, c.end, first)

    with atomic_dir(out_dir) as tmp:
        names = [f"sentences-{i:05d}.arrow" for i in range(len(chunks))]
        tasks = [(c, cfg, str(tmp / names[i]), i + 1) for i, c in enumerate(chunks)]
        results = _pool_map(_split_chunk, tasks, workers)
        total: Counter = Counter()
        for r in results:
            total.update(r)
        if total["documents"] == 0:
            where = files[0].path if len(files) == 1 else ", ".join(str(s) for s in specs)
            raise no_text_error(len(files), where)
        outputs = [n for n in names if (tmp / n).exists()]
        stats = {
            "format_version": FORMAT_VERSION,
            "files": len(files),
            "chunks": len(chunks),
            "input_bytes": sum(f.size for f in files),
            "documents": total.pop("documents"),
            "sentences": total.pop("sentences"),
            "text_bytes": total.pop("text_bytes"),
            "skipped": {k: v for k, v in sorted(total.items()) if k.startswith("skipped_")},
            "normalisation": {
                k: v for k, v in sorted(total.items()) if not k.startswith("skipped_")
            },
            "outputs": outputs,
            # workers change the speed, never the output, so they are not recorded
            "config": {k: v for k, v in asdict(cfg).items() if k != "workers"},
        }
        write_json_atomic(tmp / "stats.json", stats)
    dt = time.perf_counter() - t0
    log.info(
        "split %d docs into %d sentences from %d files (%.1f MB) in %.1f s, %.1f MB/s, %d workers",
        stats["documents"],
        stats["sentences"],
        stats["files"],
        stats["input_bytes"] / 1e6,
        dt,
        stats["input_bytes"] / 1e6 / max(dt, 1e-9),
        workers,
    )
    return stats


def sentence_batches(sentences_dir: str | Path) -> Iterator[pa.RecordBatch]:
    """Stream the record batches of a finished split stage, in document order.

    Raises ``IntegrityError`` when the directory has no ``stats.json`` (an incomplete stage)
    or a listed file is missing.
    """
    sentences_dir = Path(sentences_dir)
    stats_path = sentences_dir / "stats.json"
    if not stats_path.is_file():
        raise IntegrityError(f"{stats_path}: missing; the split stage did not finish")
    stats = json.loads(stats_path.read_text())
    for name in stats["outputs"]:
        path = sentences_dir / name
        if not path.is_file():
            raise IntegrityError(f"{path}: missing sentence file listed in stats.json")
        with pa.memory_map(str(path)) as source:
            reader = ipc.open_file(source)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
