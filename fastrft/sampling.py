"""Rollout sampling that does not depend on the number of ranks (or on the batch a prompt is in).

Gumbel-max: a token drawn as argmax(log_softmax(logits / T) + g), g ~ Gumbel(0, 1) i.i.d. per
vocabulary entry, is a sample of softmax(logits / T). Here g is not drawn from a stateful
generator but computed from a counter: a splitmix64 hash of (seed, step, global prompt index,
sample index j in the group, token position, vocabulary id), turned into a uniform u in (0, 1)
and g = -log(-log u). Every completion's noise is then fixed by what it is, not by where it is
computed: one process and N ranks sampling the same step draw the same completions (up to the
float rounding of the logits in different batch shapes, which can only matter at exact ties).

`KeyedSampler` is a transformers `LogitsProcessor`: it applies the temperature, top-k and top-p
and adds the noise, and `generate` then runs greedy (argmax). The hash runs on the logits'
device in int64 (wrapping multiplication; logical shifts by masking).
"""

from __future__ import annotations

import torch

_M64 = (1 << 64) - 1


def _s64(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    c &= _M64
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MUL1, _MUL2 = _s64(0x9E3779B97F4A7C15), _s64(0xBF58476D1CE4E5B9), _s64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finalizer of int64 tensor `x` (bits as uint64), elementwise."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MUL1
    z = (z ^ _shr(z, 27)) * _MUL2
    return z ^ _shr(z, 31)


def key(*parts) -> torch.Tensor:
    """Chains int64 tensors / ints through splitmix64 (broadcasting): a counter-based key."""
    h = None
    for p in parts:
        p = torch.as_tensor(p, dtype=torch.int64)
        h = splitmix64(p if h is None else h ^ p)
    return h


def uniform(h: torch.Tensor) -> torch.Tensor:
    """The top 53 bits of hash `h` as a float64 uniform in (0, 1) (never 0 or 1)."""
    return (_shr(h, 11).double() + 0.5) / float(1 << 53)


def gumbel_noise(seed: int, step: int, prompt_ids: torch.Tensor, sample_ids: torch.Tensor, position: int,
                 vocab: int, device=None) -> torch.Tensor:
    """Gumbel(0, 1) noise [B, V] for rows (global prompt index, sample index) at token `position`."""
    row = key(seed, step, prompt_ids.to(device), sample_ids.to(device), position)  # [B]
    h = splitmix64(row[:, None] ^ torch.arange(vocab, device=device, dtype=torch.int64)[None])  # [B, V]
    return -torch.log(-torch.log(uniform(h)))


class KeyedSampler:
    """A `LogitsProcessor` for `generate` on P prompts x G samples (rows prompt-major, as the
    shared-prefill rollout lays them out): temperature, top-k, top-p, then counter-based Gumbel
    noise keyed by (seed, step, prompt_offset + prompt, sample, position); greedy decoding on the
    result samples. `prompt_len`: the padded prompt length (positions count from there)."""

    def __init__(self, *, seed: int, step: int, prompt_offset: int, num_generations: int, prompt_len: int,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
        self.seed, self.step, self.offset, self.g = int(seed), int(step), int(prompt_offset), int(num_generations)
        self.prompt_len, self.temperature, self.top_k, self.top_p = prompt_len, temperature, top_k, top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        B, V = scores.shape
        rows = torch.arange(B)
        s = scores.float() / self.temperature
        if self.top_k and self.top_k < V:
            kth = s.topk(self.top_k, dim=-1).values[:, -1:]
            s = s.masked_fill(s < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_s, order = s.sort(dim=-1, descending=True)
            probs = sorted_s.softmax(-1)
            drop = probs.cumsum(-1) - probs > self.top_p  # keep the smallest prefix reaching top_p
            s = s.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        logp = s.log_softmax(-1).double()
        noise = gumbel_noise(self.seed, self.step, self.offset + rows // self.g, rows % self.g,
                             input_ids.shape[1] - self.prompt_len, V, device=scores.device)
        return logp + noise  # float64: greedy decoding takes its argmax
