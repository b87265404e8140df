"""The shard stage: sentences + tokenizer -> memory-mappable Arrow IPC token shards.

One row per document: ``doc_id: string``, ``tokens: large_list<int32>``,
``sentence_starts: large_list<int32>`` (token offset of each sentence; the first is 0) and
``text_bytes: int64`` (UTF-8 bytes of the document, for bits per byte). 64-bit list offsets
keep a shard past 2 GB safe. Files are uncompressed so a reader maps them without copying.

A document goes to validation when ``int(sha256(doc_id), 16) % val_modulus == 0``: the
split of a document never changes when the corpus grows. Every shard is written to a temp
file and renamed, inside a stage directory that itself only appears, with
``manifest.json``, once everything is written.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from glm.atomic import atomic_dir, write_json_atomic
from glm.digest import sha256_file
from glm.errors import InputError, IntegrityError
from glm.split import sentence_batches
from glm.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "val")
SHARD_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("tokens", pa.large_list(pa.int32())),
        ("sentence_starts", pa.large_list(pa.int32())),
        ("text_bytes", pa.int64()),
    ]
)


@dataclass
class ShardConfig:
    """Settings of the shard stage."""

    # a shard is closed once it holds at least this many tokens (16 MB of int32 ids)
    shard_tokens: int = 4_000_000
    # a document is in validation when hash(doc_id) % val_modulus == 0 (20: about 5%)
    val_modulus: int = 20
    # encode threads; 0 means one per CPU core
    num_threads: int = 0

    def __post_init__(self) -> None:
        if self.shard_tokens < 1:
            raise InputError(f"shard_tokens must be >= 1, not {self.shard_tokens}")
        if self.val_modulus < 2:
            raise InputError(f"val_modulus must be >= 2, not {self.val_modulus}")
        if self.num_threads < 0:
            raise InputError(f"num_threads must be >= 0, not {self.num_threads}")


@dataclass(frozen=True)
class Document:
    """One document of a shard; the arrays are views into the memory-mapped file."""

    doc_id: str
    tokens: np.ndarray
    sentence_starts: np.ndarray
    text_bytes: int


def is_validation(doc_id: str, val_modulus: int = 20) -> bool:
    """Whether a document belongs to the validation split (stable as the corpus grows)."""
    return int(hashlib.sha256(doc_id.encode()).hexdigest(), 16) % val_modulus == 0


class _ShardWriter:
    """Collects documents of one split and writes a shard whenever the token budget is met."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.dir = out_dir / split
        self.split = split
        self.shard_tokens = shard_tokens
        self.entries: list[dict] = []
        self.documents = 0
        self.sentences = 0
        self._reset()

    def _reset(self) -> None:
        self.ids: list[str] = []
        self.tokens: list[np.ndarray] = []
        self.starts: list[np.ndarray] = []
        self.text_bytes: list[int] = []
        self.n_tokens = 0

    def add(self, doc_id: str, tokens: np.ndarray, starts: np.ndarray, text_bytes: int) -> None:
        self.ids.append(doc_id)
        self.tokens.append(tokens)
        self.starts.append(starts)
        self.text_bytes.append(text_bytes)
        self.n_tokens += len(tokens)
        self.documents += 1
        self.sentences += len(starts)
        if self.n_tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.ids:
            return
        table = pa.Table.from_arrays(
            [
                pa.array(self.ids, pa.string()),
                _large_list(self.tokens),
                _large_list(self.starts),
                pa.array(self.text_bytes, pa.int64()),
            ],
            schema=SHARD_SCHEMA,
        )
        name = f"shard-{len(self.entries):05d}.arrow"
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / name
        tmp = self.dir / f".{name}.tmp"
        with open(tmp, "wb") as f:
            with ipc.new_file(f, SHARD_SCHEMA) as writer:
                writer.write_table(table)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        self.entries.append(
            {
                "split": self.split,
                "path": f"{self.split}/{name}",
                "rows": len(self.ids),
                "tokens": self.n_tokens,
                "bytes": final.stat().st_size,
                "text_bytes": sum(self.text_bytes),
                "sha256": sha256_file(final),
            }
        )
        self._reset()


def _large_list(parts: list[np.ndarray]) -> pa.LargeListArray:
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    values = np.concatenate(parts).astype(np.int32, copy=False)
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))


def write_shards(
    sentences_dir: str | Path, tokenizer_dir: str | Path, out_dir: str | Path, cfg: ShardConfig
) -> dict:
    """Tokenize the split stage's sentences and write train/val shards + manifest.json (last).

    Returns the manifest.
    """
    t0 = time.perf_counter()
    tok = Tokenizer.load(tokenizer_dir)
    threads = cfg.num_threads or os.cpu_count() or 1
    with atomic_dir(out_dir) as tmp:
        writers = {s: _ShardWriter(tmp, s, cfg.shard_tokens) for s in SPLITS}
        # a document may straddle record batches: its pieces wait here until it ends
        pending_id: str | None = None
        pending_tokens: list[np.ndarray] = []
        pending_lengths: list[np.ndarray] = []
        pending_bytes = 0

        def finish() -> None:
            lengths = np.concatenate(pending_lengths)
            starts = np.zeros(len(lengths), dtype=np.int32)
            np.cumsum(lengths[:-1], out=starts[1:])
            split = "val" if is_validation(pending_id, cfg.val_modulus) else "train"
            writers[split].add(pending_id, np.concatenate(pending_tokens), starts, pending_bytes)

        for batch in sentence_batches(sentences_dir):
            texts = batch.column("text").to_pylist()
            ids = tok.sp.encode(texts, num_threads=threads)
            lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            flat = np.fromiter(
                itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum())
            )
            offsets = np.zeros(len(ids) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            text_bytes = pc.binary_length(batch.column("text")).to_numpy()
            sentence_index = batch.column("sentence_index").to_numpy()
            doc_ids = batch.column("doc_id")
            # rows where a new document begins, plus the end of the batch
            bounds = np.flatnonzero(sentence_index == 0).tolist()
            if not bounds or bounds[0] != 0:
                if pending_id is None:
                    raise IntegrityError(f"{sentences_dir}: sentences do not start a document")
                bounds = [0, *bounds]
                continuing = True
            else:
                continuing = False
            bounds.append(len(ids))
            for k, (a, b) in enumerate(itertools.pairwise(bounds)):
                if not (k == 0 and continuing):
                    if pending_id is not None:
                        finish()
                    pending_id = doc_ids[a].as_py()
                    pending_tokens, pending_lengths, pending_bytes = [], [], 0
                pending_tokens.append(flat[offsets[a] : offsets[b]])
                pending_lengths.append(lengths[a:b])
                pending_bytes += int(text_bytes[a:b].sum())
        if pending_id is not None:
            finish()
        for w in writers.values():
            w.flush()

        entries = writers["train"].entries + writers["val"].entries
        stats = {
            s: {
                "documents": w.documents,
                "sentences": w.sentences,
                "tokens": sum(e["tokens"] for e in w.entries),
                "text_bytes": sum(e["text_bytes"] for e in w.entries),
                "shards": len(w.entries),
            }
            for s, w in writers.items()
        }
        if stats["train"]["documents"] == 0:
            raise InputError(
                "no training documents: every document fell into validation", sentences_dir
            )
        manifest = {
            "format_version": FORMAT_VERSION,
            "tokenizer_sha256": tok.sha256,
            "vocab_size": tok.vocab_size,
            "shards": entries,
            "stats": stats,
            "config": {k: v for k, v in asdict(cfg).items() if k != "num_threads"},
        }
        write_json_atomic(tmp / "manifest.json", manifest)
    dt = time.perf_counter() - t0
    text_mb = (stats["train"]["text_bytes"] + stats["val"]["text_bytes"]) / 1e6
    log.info(
        "sharded %d train / %d val docs, %d / %d tokens, into %d shards in %.1f s (%.1f MB/s)",
        stats["train"]["documents"],
        stats["val"]["documents"],
        stats["train"]["tokens"],
        stats["val"]["tokens"],
        len(entries),
        dt,
        text_mb / max(dt, 1e-9),
    )
    return manifest


class ShardReader:
    """Reads a shard stage through its manifest: memory-mapped tables, documents, checks."""

    def __init__(self, manifest_path: str | Path):
        self.path = Path(manifest_path)
        if not self.path.is_file():
            raise IntegrityError(f"{self.path}: manifest missing; the shard stage did not finish")
        self.root = self.path.parent
        self.manifest = json.loads(self.path.read_text())
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise IntegrityError(
                f"{self.path}: format_version {version}, this code reads {FORMAT_VERSION}"
            )

    def shards(self, split: str | None = None) -> list[dict]:
        """Manifest entries of ``split`` (all when None)."""
        return [e for e in self.manifest["shards"] if split is None or e["split"] == split]

    def tables(self, split: str) -> list[pa.Table]:
        """The shards of ``split`` as memory-mapped tables (no copy of the token data)."""
        tables = []
        for entry in self.shards(split):
            path = self.root / entry["path"]
            if not path.is_file():
                raise IntegrityError(f"{path}: shard missing")
            try:
                tables.append(ipc.open_file(pa.memory_map(str(path))).read_all())
            except pa.ArrowInvalid as e:
                raise IntegrityError(f"{path}: unreadable shard ({e})") from None
        return tables

    def documents(self, split: str) -> Iterator[Document]:
        """Every document of ``split``, in shard order, as zero-copy numpy views."""
        for table in self.tables(split):
            for batch in table.to_batches():
                ids = batch.column("doc_id").to_pylist()
                tok_col, st_col = batch.column("tokens"), batch.column("sentence_starts")
                tok_off, tok_val = tok_col.offsets.to_numpy(), tok_col.values.to_numpy()
                st_off, st_val = st_col.offsets.to_numpy(), st_col.values.to_numpy()
                text_bytes = batch.column("text_bytes").to_numpy()
                for i, doc_id in enumerate(ids):
                    yield Document(
                        doc_id,
                        tok_val[tok_off[i] : tok_off[i + 1]],
                        st_val[st_off[i] : st_off[i + 1]],
                        int(text_bytes[i]),
                    )

    def verify(self, split: str | None = None) -> list[str]:
        """Check every shard's presence, size and sha256; one problem line per bad file."""
        problems = []
        for entry in self.shards(split):
            path = self.root / entry["path"]
            if not path.is_file():
                problems.append(f"{path}: missing")
                continue
            size = path.stat().st_size
            if size != entry["bytes"]:
                what = "truncated" if size < entry["bytes"] else "size mismatch"
                problems.append(f"{path}: {what} ({size} bytes, manifest says {entry['bytes']})")
                continue
            digest = sha256_file(path)
            if digest != entry["sha256"]:
                problems.append(
                    f"{path}: checksum mismatch (sha256 {digest[:12]}, "
                    f"manifest says {entry['sha256'][:12]})"
                )
        return problems

    def verify_or_raise(self, split: str | None = None) -> None:
        """Raise ``IntegrityError`` naming every bad shard file, if any."""
        problems = self.verify(split)
        if problems:
            raise IntegrityError("; ".join(problems))
