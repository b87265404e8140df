"""Model, objective and training configuration: validated dataclasses and named presets.

Every field carries a one-line reason. ``get_preset(name)`` returns the model, objective and
training settings that belong together; callers override single fields with
``dataclasses.replace``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {msg}")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the GLM transformer."""

    vocab_size: int = 8000  # set from the trained tokenizer; tied input/output embedding rows
    n_layer: int = 6  # transformer blocks
    n_head: int = 8  # attention heads; d_model must divide evenly
    d_model: int = 512  # residual stream width; the MLP is 4x this
    max_seq_len: int = 256  # rows of the absolute position table: Part A + Part B length
    max_block_len: int = 256  # rows of the block position table: longest span + 1 (<sop>)
    dropout: float = 0.0  # off by default: small data, short runs, exact-resume tests

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len", "max_block_len"):
            _check(getattr(self, name) > 0, name, "must be positive")
        _check(self.d_model % self.n_head == 0, "d_model", "must be divisible by n_head")
        _check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


@dataclass(frozen=True)
class ObjectiveConfig:
    """How blank-infilling samples are drawn (see glm/objectives.py).

    Per-sample mixing: each document window independently picks token-level [MASK],
    sentence-level [sMASK] or document-level [gMASK] with these probabilities.
    """

    p_mask: float = 0.4  # token-level spans: the Base/Large objective, short-range infilling
    p_smask: float = 0.2  # whole sentences: longer, coherent spans
    p_gmask: float = 0.4  # one long suffix: left-to-right generation, puts loss on most tokens
    mask_ratio: float = 0.15  # token/sentence objectives cover at least this share of tokens
    poisson_lambda: float = 3.0  # mean [MASK] span length, as in the paper
    max_span_len: int = 39  # [MASK] span lengths are clipped to 1..this, as in the reference
    gmask_min: float = 0.5  # [gMASK] suffix length is uniform in [gmask_min, gmask_max] of text
    gmask_max: float = 1.0

    def __post_init__(self) -> None:
        probs = (self.p_mask, self.p_smask, self.p_gmask)
        _check(all(p >= 0 for p in probs), "p_mask", "objective probabilities must be >= 0")
        _check(abs(sum(probs) - 1.0) < 1e-6, "p_mask", "p_mask + p_smask + p_gmask must be 1")
        _check(0.0 < self.mask_ratio < 1.0, "mask_ratio", "must be in (0, 1)")
        _check(self.poisson_lambda > 0, "poisson_lambda", "must be positive")
        _check(self.max_span_len >= 1, "max_span_len", "must be >= 1")
        _check(
            0.0 < self.gmask_min <= self.gmask_max <= 1.0, "gmask_min", "need 0 < min <= max <= 1"
        )


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and checkpointing. The budget is a step count, so outputs depend on inputs."""

    max_steps: int = 1000  # the budget; a time budget is converted to steps before training
    batch_size: int = 16  # sequences per micro-batch (per rank under DDP)
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256  # Part A + Part B tokens per sample (<= model.max_seq_len)
    lr: float = 6e-4  # peak learning rate after warmup
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup_frac: float = 0.05  # share of max_steps spent in linear warmup (GLM: 5%)
    weight_decay: float = 0.1  # AdamW decay on matrices only; none on norms/biases/embeddings
    beta1: float = 0.9
    beta2: float = 0.98  # GLM's Base/Large setting
    eps: float = 1e-6
    grad_clip: float = 1.0  # global grad-norm clip
    seed: int = 1234  # seeds init, data order and span sampling
    log_every: int = 10  # steps between log lines
    ckpt_every: int = 100  # steps between checkpoints (also on SIGTERM and at the end)
    keep_last: int = 2  # checkpoints kept on disk
    compile: bool = False  # torch.compile the model (no gain on CPU)

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "seq_len", "log_every"):
            _check(getattr(self, name) > 0, name, "must be positive")
        _check(self.ckpt_every > 0, "ckpt_every", "must be positive")
        _check(self.keep_last >= 1, "keep_last", "must be >= 1")
        _check(self.lr > 0, "lr", "must be positive")
        _check(0.0 <= self.warmup_frac < 1.0, "warmup_frac", "must be in [0, 1)")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "must be in [0, 1]")
        _check(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")


@dataclass(frozen=True)
class Preset:
    """A named bundle: model shape, objective mix and a default step budget."""

    name: str
    model: ModelConfig
    train: TrainConfig
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)

    @classmethod
    def from_dict(cls, data: dict) -> Preset:
        """Rebuild a preset from ``to_dict()`` output (tasks and subprocesses pass JSON)."""
        return cls(
            data["name"],
            from_dict(ModelConfig, data["model"]),
            from_dict(TrainConfig, data["train"]),
            from_dict(ObjectiveConfig, data["objective"]),
        )

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "model": asdict(self.model),
            "train": asdict(self.train),
            "objective": asdict(self.objective),
        }


PRESETS: dict[str, Preset] = {
    # CI: trains its default budget in well under a minute on 2 cores.
    "tiny": Preset(
        "tiny",
        ModelConfig(n_layer=2, n_head=2, d_model=64, max_seq_len=128, max_block_len=128),
        TrainConfig(max_steps=40, batch_size=8, seq_len=128, lr=3e-3, log_every=10, ckpt_every=20),
    ),
    # The CPU demo: ~23 M parameters with an 8k vocabulary.
    "small": Preset(
        "small",
        ModelConfig(n_layer=6, n_head=8, d_model=512, max_seq_len=256, max_block_len=256),
        TrainConfig(max_steps=300, batch_size=8, seq_len=256, lr=1e-3, ckpt_every=100),
    ),
    # GLM-Base dimensions (12 layers, 768 hidden, 12 heads); for a GPU.
    "base": Preset(
        "base",
        ModelConfig(n_layer=12, n_head=12, d_model=768, max_seq_len=1024, max_block_len=1024),
        TrainConfig(max_steps=20000, batch_size=32, seq_len=512, lr=4e-4, ckpt_every=1000),
    ),
}


def get_preset(name: str) -> Preset:
    """Look a preset up by name; the error lists the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}"
        ) from None


# what a config file value may be for each annotation the config dataclasses use
_ACCEPTS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _type_error(annotation: str, value) -> str | None:
    """Why ``value`` does not fit ``annotation`` ("int", "float", "int | None", ...)."""
    names = [a.strip() for a in annotation.split("|")]
    if value is None and "None" in names:
        return None
    for name in names:
        accepts = _ACCEPTS.get(name)
        if accepts is None:
            return None  # not a simple type: the dataclass checks it
        if isinstance(value, accepts) and (name == "bool" or not isinstance(value, bool)):
            return None
    return f"expected {annotation.replace(' | None', ' or null')}, got {value!r}"


def from_dict(cls, data: dict):
    """Build a config dataclass from a dict, rejecting unknown keys and wrong types by name."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        names, choices = ", ".join(unknown), ", ".join(sorted(known))
        raise ValueError(f"{cls.__name__}: {names}: unknown setting; known: {choices}")
    for name, value in data.items():
        problem = _type_error(str(known[name].type), value)
        if problem:
            raise ValueError(f"{cls.__name__}: {name}: {problem}")
    return cls(**data)
