"""``text``: character-level language modelling on a corpus that needs no download.

The built-in corpus is the Python standard library's own source, which every Python install
has: the public top-level modules (``*.py`` not starting with ``_``) of
``sysconfig.get_paths()["stdlib"]``, in sorted file-name order, concatenated until
``max_chars`` characters (default 400 000; the last file is cut). The selection depends only on
the Python version. ``path=`` reads the user's own corpus instead (a UTF-8 text file).

The first ``1 - val_fraction`` of the text trains, the rest validates. An example is a window of
``T + 1`` characters: the input is the one-hot code of the first T (x: T, B, vocab), the targets
are the next character at every step (y: B, T; one label per step, so the trainer scores every
step). Training windows start at a random phase and are shuffled per seed; validation windows
tile the validation text in order.
"""
from __future__ import annotations

import math
import sysconfig
from collections import Counter
from pathlib import Path
from typing import Iterator

import torch

from .base import check_batches_args, check_positive_int, check_split

__all__ = ["CharText", "stdlib_corpus"]

#: characters outside the vocabulary (rarer than the ``max_vocab`` most frequent) map to this
UNKNOWN = "\x00"


def stdlib_corpus(max_chars: int = 400_000) -> "tuple[str, list[str]]":
    """The built-in corpus and the file names it was read from (see the module docstring)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, files, n = [], [], 0
    for f in sorted(root.glob("*.py")):
        if f.name.startswith("_"):
            continue
        text = f.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        take = text[:max_chars - n]
        parts.append(take)
        files.append(f.name)
        n += len(take)
        if n >= max_chars:
            break
    if n == 0:
        raise RuntimeError(f"text: found no standard-library source under {str(root)!r}; "
                           "pass path= (--text PATH) to use your own corpus")
    return "".join(parts), files


class CharText:
    """Next-character prediction: x (T, B, vocab) float32 one-hot, y (B, T) int64.

    Args:
        T: characters per example (time steps).
        path: a UTF-8 text file to use instead of the built-in standard-library corpus.
        max_chars: length of the built-in corpus (ignored with ``path``).
        val_fraction: the share at the end of the text that validates, in (0, 1).
        max_vocab: at most this many distinct characters (the most frequent); the others map
            to one unknown symbol.

    Attributes: ``vocab`` (the characters, index = class), ``unigram_bits`` (entropy of the
    character frequencies of the whole corpus, bits per character: what a model that ignores
    context achieves), ``files`` (the built-in corpus's file names, or ``[path]``).
    """

    name = "text"
    #: one target per step: the trainer scores every step (see `sparsebptt.train`)
    sequence_targets = True

    def __init__(self, T: int = 128, *, path: "str | Path | None" = None, max_chars: int = 400_000,
                 val_fraction: float = 0.1, max_vocab: int = 255):
        check_positive_int(self.name, "T", T)
        check_positive_int(self.name, "max_chars", max_chars)
        check_positive_int(self.name, "max_vocab", max_vocab)
        if not 0.0 < float(val_fraction) < 1.0:
            raise ValueError(f"{self.name}: val_fraction must be in (0, 1), got {val_fraction!r}")
        if path is None:
            text, self.files = stdlib_corpus(max_chars)
        else:
            p = Path(path)
            if not p.is_file():
                raise ValueError(f"{self.name}: path {str(p)!r} is not a file; pass a UTF-8 text file")
            text = p.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
            self.files = [str(p)]
        counts = Counter(text)
        keep = sorted(c for c, _ in counts.most_common(max_vocab))
        self.vocab = keep + ([UNKNOWN] if len(counts) > len(keep) and UNKNOWN not in keep else [])
        index = {c: i for i, c in enumerate(self.vocab)}
        unk = index.get(UNKNOWN, 0)
        ids = torch.tensor([index.get(c, unk) for c in text], dtype=torch.int64)
        n_val = int(len(ids) * val_fraction)
        self._ids = {"train": ids[:len(ids) - n_val], "val": ids[len(ids) - n_val:]}
        for split, part in self._ids.items():
            if len(part) < T + 1:
                raise ValueError(f"{self.name}: the {split} split has {len(part)} characters, fewer than "
                                 f"T + 1 = {T + 1}; use a longer text or a smaller T")
        total = len(text)
        self.unigram_bits = -sum(n / total * math.log2(n / total) for n in counts.values())
        self.T = T
        self.path = None if path is None else str(path)
        self.val_fraction = float(val_fraction)
        self.num_chars = total

    @property
    def input_size(self) -> int:
        return len(self.vocab)

    @property
    def num_classes(self) -> int:
        return len(self.vocab)

    def _check_split(self, split: str) -> None:
        check_split(self.name, split)

    def num_examples(self, split: str) -> int:
        """Windows of T + 1 characters that tile the split (one epoch of training)."""
        self._check_split(split)
        return (len(self._ids[split]) - 1) // self.T

    def num_batches(self, split: str, batch_size: int) -> int:
        return -(-self.num_examples(split) // batch_size)

    def decode(self, ids) -> str:
        return "".join(self.vocab[int(i)] for i in ids)

    def batches(self, split: str, batch_size: int, *, seed: int,
                shuffle: "bool | None" = None) -> Iterator["tuple[torch.Tensor, torch.Tensor]"]:
        """Yield ``(x, y)``: x (T, B, vocab) float32 one-hot, y (B, T) int64 next characters.

        ``shuffle`` (default: True for "train") starts the windows at a random phase and
        shuffles them; else they tile the split from its start. ``seed`` fixes both.
        """
        shuffle = check_batches_args(self.name, split, batch_size, seed, shuffle)
        ids, T = self._ids[split], self.T
        n = self.num_examples(split)
        g = torch.Generator().manual_seed(seed)
        if shuffle:
            phase = int(torch.randint(0, len(ids) - n * T, (1,), generator=g))  # [0, leftover]
            starts = phase + T * torch.randperm(n, generator=g)
        else:
            starts = T * torch.arange(n)
        offsets = torch.arange(T + 1)
        for i in range(0, n, batch_size):
            win = ids[starts[i:i + batch_size, None] + offsets]  # [B, T + 1]
            x = torch.nn.functional.one_hot(win[:, :-1].t(), len(self.vocab)).float()  # [T, B, V]
            yield x, win[:, 1:].contiguous()

    def __repr__(self) -> str:
        src = self.path or f"stdlib ({len(self.files)} files)"
        return (f"{type(self).__name__}(T={self.T}, {src}, {self.num_chars} chars, vocab={len(self.vocab)}, "
                f"unigram {self.unigram_bits:.3f} bits/char)")
