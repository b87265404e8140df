"""A deterministic, resumable stream of training batches over memory-mapped shards.

The stream sees the shards as a list of *windows*: each document is cut at sentence
boundaries into pieces of at most ``window_len`` tokens (a sentence longer than that is cut
mid-sentence). Window ``w`` of the corpus is turned into one blank-infilling sample by the
``SampleBuilder``.

Order and randomness are counter-based, so the whole state of the stream is one integer:

- the stream is an endless sequence of global sample indices ``g = 0, 1, 2, ...``;
- ``g`` falls in epoch ``g // n_windows`` at position ``g % n_windows``;
- each epoch visits the windows in a permutation drawn from ``rng([seed, epoch])``;
- the spans of the sample at (epoch, position) are drawn from ``rng([seed, epoch, position])``.

Nothing is carried from one sample to the next, so the cursor saved in a checkpoint is
``{"consumed": g, "epoch": ..., "position": ..., "seed": ..., "n_windows": ...}`` (plain ints)
and a resumed stream yields exactly what the uninterrupted one would have. A corpus smaller
than one batch simply wraps into the next epoch inside the batch.

Under DDP each optimizer step consumes ``batch_size * world_size`` consecutive global indices;
rank ``r`` takes those with ``g % world_size == r``, so the ranks see disjoint slices and the
union is what one process with the combined batch would have seen.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from glm.errors import InputError, IntegrityError


def _list_column(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, values) of a large_list<int32> column, zero-copy where Arrow allows it."""
    column = table.column(name)
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    offsets = array.offsets.to_numpy()
    values = array.values.to_numpy(zero_copy_only=False)
    return offsets, values


def split_windows(n_tokens: int, sentence_starts: np.ndarray, window_len: int) -> list[tuple]:
    """Cut ``[0, n_tokens)`` into ranges of at most ``window_len`` tokens at sentence starts.

    Greedy: a window grows sentence by sentence while it fits; a single sentence longer than
    ``window_len`` is cut into ``window_len`` pieces. Returns ``[(start, end), ...]`` covering
    every token exactly once, in order.
    """
    bounds = [int(s) for s in sentence_starts if 0 < s < n_tokens] + [n_tokens]
    windows: list[tuple[int, int]] = []
    start = 0
    prev = 0  # last sentence boundary that still fits in the current window
    for b in bounds:
        if b - start <= window_len:
            prev = b
            continue
        if prev > start:  # close the window at the last boundary that fit
            windows.append((start, prev))
            start = prev
        while b - start > window_len:  # the sentence itself is too long: hard cuts
            windows.append((start, start + window_len))
            start += window_len
        prev = b
    if prev > start:
        windows.append((start, prev))
    return windows


class SampleStream:
    """Batches of blank-infilling samples from one split, in a seeded, resumable order.

    ``builder`` is a ``glm.objectives.SampleBuilder``; ``collate`` is ``glm.objectives.collate``
    (passed in so this module does not fix which objective code builds the samples).
    """

    def __init__(
        self,
        tables: list[pa.Table],
        builder,
        collate,
        *,
        batch_size: int,
        seq_len: int,
        window_len: int,
        pad_id: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.builder = builder
        self.collate = collate
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._columns = [
            (_list_column(t, "tokens"), _list_column(t, "sentence_starts")) for t in tables
        ]
        windows = []
        for ti, ((tok_off, _), (sent_off, sent_vals)) in enumerate(self._columns):
            for row in range(len(tok_off) - 1):
                n = int(tok_off[row + 1] - tok_off[row])
                starts = sent_vals[sent_off[row] : sent_off[row + 1]]
                windows.extend((ti, row, s, e) for s, e in split_windows(n, starts, window_len))
        if not windows:
            raise InputError("no training tokens: the train split is empty")
        # (n_windows, 4) int64: table, row, start, end
        self.windows = np.asarray(windows, dtype=np.int64)
        self.consumed = 0
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    @property
    def n_windows(self) -> int:
        return len(self.windows)

    # cursor ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The cursor as plain ints: enough to continue exactly where this stream stands."""
        epoch, position = divmod(self.consumed, self.n_windows)
        return {
            "consumed": self.consumed,
            "epoch": epoch,
            "position": position,
            "seed": self.seed,
            "n_windows": self.n_windows,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved cursor; refuses one saved over different data or seed."""
        for key in ("seed", "n_windows", "world_size"):
            if int(state[key]) != getattr(self, key):
                raise IntegrityError(
                    f"data cursor was saved with {key}={state[key]}, this stream has "
                    f"{key}={getattr(self, key)}: the shards, seed or world size changed"
                )
        self.consumed = int(state["consumed"])

    # samples --------------------------------------------------------------------------------

    def _window_at(self, g: int) -> tuple[int, int, int]:
        """(epoch, position, window index) of global sample index ``g``."""
        epoch, position = divmod(g, self.n_windows)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._perm_epoch = epoch
        return epoch, position, int(self._perm[position])

    def sample(self, g: int):
        """The sample at global index ``g`` (same on every rank and every run)."""
        epoch, position, w = self._window_at(g)
        ti, row, start, end = (int(x) for x in self.windows[w])
        (tok_off, tok_vals), (sent_off, sent_vals) = self._columns[ti]
        doc = tok_vals[tok_off[row] : tok_off[row + 1]]
        starts = sent_vals[sent_off[row] : sent_off[row + 1]]
        tokens = np.asarray(doc[start:end], dtype=np.int64)
        # sentence starts relative to the window; the window always starts a sentence for
        # the builder, even when it was cut mid-sentence
        rel = starts[(starts > start) & (starts < end)] - start
        sentence_starts = np.concatenate([[0], rel]).astype(np.int64)
        rng = np.random.default_rng([self.seed, epoch, position])
        return self.builder.build(tokens, sentence_starts, rng)

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's micro-batch; advances the cursor by ``batch_size * world_size``."""
        base = self.consumed
        indices = [base + j * self.world_size + self.rank for j in range(self.batch_size)]
        samples = [self.sample(g) for g in indices]
        self.consumed = base + self.batch_size * self.world_size
        return self.collate(samples, self.pad_id, self.seq_len)
