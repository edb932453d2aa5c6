"""Prefix trie over token sequences: the closed answer sets of VQA, NLI and classification.

Used both by decoding (allowed next tokens) and by the data pipeline (per-position masks for trie-constrained
training), so it depends on neither the model nor the data code.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

import torch


class _AnswerTokenizer(Protocol):
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...


class Trie:
    """Prefix tree over token sequences that constrains decoding to a closed answer set.

    BiomedGPT inserts ``[bos] + BPE(" " + answer) + [eos]`` for every answer; prefixes passed to
    :meth:`next_tokens` therefore start with bos as well.
    """

    def __init__(self, eos_id: int = 2, bos_id: int = 0, sequences: Iterable[Sequence[int]] = ()) -> None:
        self.eos_id = int(eos_id)
        self.bos_id = int(bos_id)
        self._root: dict[int, dict] = {}
        self._sequences: list[tuple[int, ...]] = []
        self._seen: set[tuple[int, ...]] = set()
        for sequence in sequences:
            self.insert(sequence)

    @classmethod
    def from_answers(cls, answers: Iterable[str], tokenizer: _AnswerTokenizer) -> Trie:
        """Trie of ``[bos] + tokenizer.encode(" " + answer) + [eos]`` for each answer (the original's layout)."""
        trie = cls(eos_id=tokenizer.eos_id, bos_id=tokenizer.bos_id)
        for answer in answers:
            trie.insert([tokenizer.bos_id, *tokenizer.encode(" " + answer), tokenizer.eos_id])
        return trie

    def insert(self, sequence: Sequence[int]) -> None:
        key = tuple(int(token) for token in sequence)
        if not key:
            raise ValueError("cannot insert an empty sequence into a Trie")
        node = self._root
        for token in key:
            node = node.setdefault(token, {})
        if key not in self._seen:
            self._seen.add(key)
            self._sequences.append(key)

    def next_tokens(self, prefix: Sequence[int]) -> list[int]:
        """Tokens allowed after ``prefix``; ``[eos]`` once the prefix has left the trie (as the original), ``[]``
        after a complete sequence's last token."""
        node = self._root
        for token in prefix:
            child = node.get(int(token))
            if child is None:
                return [self.eos_id]
            node = child
        return list(node)

    def constraint_mask(
        self, prefixes: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Bool ``[len(prefixes), vocab_size]``: row i is True at the tokens allowed after ``prefixes[i]``."""
        rows: list[int] = []
        cols: list[int] = []
        for row, prefix in enumerate(prefixes):
            allowed = self.next_tokens(prefix)
            rows.extend([row] * len(allowed))
            cols.extend(allowed)
        mask = torch.zeros(len(prefixes), vocab_size, dtype=torch.bool, device=device)
        if rows:
            if max(cols) >= vocab_size:
                raise ValueError(f"trie holds token id {max(cols)} >= vocab_size={vocab_size}")
            mask[torch.tensor(rows, device=device), torch.tensor(cols, device=device)] = True
        return mask

    def teacher_forcing_mask(
        self,
        target: Sequence[int],
        vocab_size: int,
        answer_start: int = 0,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Bool ``[len(target), vocab_size]`` trie mask for a teacher-forced target (training or scoring).

        ``target`` is what the decoder predicts, e.g. ``question + answer + [eos]``; the answer starts at
        ``answer_start``. Row t (t >= answer_start) allows the tokens that may follow
        ``[bos] + target[answer_start:t]``; rows before the answer are all True (unconstrained; the original leaves
        them all False, which only works because their loss is ignored).
        """
        target = [int(token) for token in target]
        if not 0 <= answer_start <= len(target):
            raise ValueError(f"answer_start={answer_start} outside a target of length {len(target)}")
        answer = target[answer_start:]
        prefixes = [[self.bos_id, *answer[:t]] for t in range(len(answer))]
        mask = torch.ones(len(target), vocab_size, dtype=torch.bool, device=device)
        mask[answer_start:] = self.constraint_mask(prefixes, vocab_size, device)
        return mask

    def __contains__(self, sequence: object) -> bool:
        if not isinstance(sequence, Sequence | torch.Tensor):
            return False
        return tuple(int(token) for token in sequence) in self._seen  # type: ignore[union-attr]

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        return iter(self._sequences)

    def __len__(self) -> int:
        return len(self._sequences)

    def __repr__(self) -> str:
        return f"Trie({len(self)} sequences, bos={self.bos_id}, eos={self.eos_id})"
