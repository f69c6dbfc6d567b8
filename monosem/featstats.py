"""Streaming per-feature statistics for `monosem analyze`, in memory bounded by n_features x samples.

A SampleTable keeps, per group (a feature, or a feature x activation interval), the `size` candidates
with the highest score seen so far, each with its context window (tokens and the feature's activation
on every token of the window). Score = activation gives the top-k contexts; score = a uniform random
key gives a uniform sample without replacement (the interval samples, the fired-on token sample).
Only new winners have their window gathered, so a batch costs O(candidates), not O(table).

    top = SampleTable(n_features, size=10, before=12, after=4)
    top.offer(group, score, value, row, feature, tokens, f)   # tokens [B, T], f [B*T, n_features]
    top.values, top.tokens, top.acts                          # [G, S], [G, S, W], [G, S, W]
"""
from __future__ import annotations

import torch

EMPTY_TOKEN = -1  # window positions outside the context, and empty slots


class SampleTable:
    """Per-group best-`size` candidates by score; each keeps value, global token index and window."""

    def __init__(self, n_groups: int, size: int, before: int, after: int):
        self.n_groups, self.size, self.before, self.after = n_groups, size, before, after
        W = before + 1 + after
        self.score = torch.full((n_groups, size), float("-inf"))               # [G, S]
        self.values = torch.zeros(n_groups, size)                              # [G, S] activation
        self.index = torch.full((n_groups, size), -1, dtype=torch.int64)       # [G, S] seq * T + pos
        self.tokens = torch.full((n_groups, size, W), EMPTY_TOKEN, dtype=torch.int32)  # [G, S, W]
        self.acts = torch.zeros(n_groups, size, W, dtype=torch.float16)        # [G, S, W]

    def filled(self) -> torch.Tensor:
        """[G, S] bool: slots holding a sample."""
        return self.index >= 0

    def windows(self, row: torch.Tensor, feature: torch.Tensor, tokens: torch.Tensor,
                f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Context windows around flat batch rows: tokens int32 [n, W], acts of `feature` f16 [n, W]."""
        B, T = tokens.shape
        b, t = row // T, row % T                                               # [n]
        tt = t[:, None] + torch.arange(-self.before, self.after + 1)           # [n, W]
        inside = (tt >= 0) & (tt < T)
        tt = tt.clamp(0, T - 1)
        tok = tokens[b[:, None], tt].to(torch.int32).masked_fill(~inside, EMPTY_TOKEN)
        acts = f[b[:, None] * T + tt, feature[:, None]].masked_fill(~inside, 0.0)
        return tok, acts.to(torch.float16)

    @torch.no_grad()
    def offer(self, group: torch.Tensor, score: torch.Tensor, value: torch.Tensor, row: torch.Tensor,
              feature: torch.Tensor, tokens: torch.Tensor, f: torch.Tensor, seq0: int) -> None:
        """Candidates [n] (group, score >= 0, activation value, flat row b*T+t of the batch, feature);
        tokens [B, T] of the batch, f [B*T, n_features] its activations, seq0 the batch's first
        context number (global token index = (seq0 + b) * T + t)."""
        if len(group) == 0:
            return
        S, T = self.size, tokens.shape[1]
        # best S per group inside the batch: sort by score (descending), then stably by group. Scores are
        # >= 0 (activations, uniform keys), so their float32 bits are order-preserving int32 keys, and
        # int32 keys take torch's radix sort (several times faster than a float or int64 sort)
        order = torch.argsort(-score.float().contiguous().view(torch.int32), stable=True)
        order = order[torch.argsort(group[order].to(torch.int32), stable=True)]
        g = group[order]
        rank = torch.arange(len(g)) - torch.searchsorted(g, g)                 # rank inside its group
        keep = rank < S
        order, g, rank = order[keep], g[keep], rank[keep]
        touched, g_row = torch.unique_consecutive(g, return_inverse=True)      # [u], [m] (g is sorted)
        u = len(touched)
        cand_score = torch.full((u, S), float("-inf"))
        cand_score[g_row, rank] = score[order].float()
        cand_ix = torch.full((u, S), -1, dtype=torch.int64)
        cand_ix[g_row, rank] = order
        both = torch.cat([self.score[touched], cand_score], dim=1)             # [u, 2S]
        best_score, pick = both.topk(S, dim=1)                                 # [u, S]
        is_new = pick >= S
        old_col = pick.clamp(max=S - 1)
        new_ix = cand_ix.gather(1, (pick - S).clamp(min=0))                    # [u, S]
        fresh = is_new & (new_ix >= 0)
        values = self.values[touched].gather(1, old_col)
        index = self.index[touched].gather(1, old_col)
        W = self.tokens.shape[2]
        tok = self.tokens[touched].gather(1, old_col[..., None].expand(-1, -1, W))
        acts = self.acts[touched].gather(1, old_col[..., None].expand(-1, -1, W))
        empty = is_new & ~fresh                                                # an empty slot won
        index[empty], values[empty], tok[empty], acts[empty] = -1, 0.0, EMPTY_TOKEN, 0.0
        ci = new_ix[fresh]                                                     # candidates that won
        values[fresh] = value[ci].float()
        index[fresh] = (seq0 + row[ci] // T) * T + row[ci] % T
        tok[fresh], acts[fresh] = self.windows(row[ci], feature[ci], tokens, f)
        self.score[touched], self.values[touched], self.index[touched] = best_score, values, index
        self.tokens[touched], self.acts[touched] = tok, acts

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}_{k}": getattr(self, k) for k in ("values", "index", "tokens", "acts")}


class Pass1:
    """Density, max and mean activation, the top-k contexts and a uniform sample of fired-on tokens."""

    def __init__(self, n_features: int, top_k: int, before: int, after: int, token_sample: int,
                 seed: int):
        F = n_features
        self.fires = torch.zeros(F, dtype=torch.int64)
        self.max = torch.zeros(F)
        self.sum = torch.zeros(F, dtype=torch.float64)
        self.top = SampleTable(F, top_k, before, after)
        self.fired_on = SampleTable(F, token_sample, 0, 0)  # window of 1: the token itself
        self.gen = torch.Generator().manual_seed(seed)

    def update(self, tokens: torch.Tensor, f: torch.Tensor, seq0: int) -> None:
        """tokens int64 [B, T], f [B*T, n_features] (float32). Everything comes from the active entries
        (one pass over f to find them): no reduction over the dense [B*T, n_features] f."""
        F = f.shape[1]
        for rows, feats in nonzeros(f):
            a = f[rows, feats]                                                 # [nnz]
            self.fires += torch.bincount(feats, minlength=F)
            self.max.scatter_reduce_(0, feats, a, "amax")
            self.sum.index_add_(0, feats, a.double())
            self.top.offer(feats, a, a, rows, feats, tokens, f, seq0)
            key = torch.rand(len(rows), generator=self.gen)
            self.fired_on.offer(feats, key, a, rows, feats, tokens, f, seq0)

    def candidates(self) -> torch.Tensor:
        """[F, C] int64 token ids a feature may fire on most: its top-context and sampled tokens."""
        centre = self.top.tokens[:, :, self.top.before].long()                 # [F, k]
        return torch.cat([centre, self.fired_on.tokens[:, :, 0].long()], dim=1)


class Pass2:
    """With the max known: interval samples, and exact fire counts of the candidate tokens."""

    def __init__(self, p1: Pass1, n_intervals: int, per_interval: int, seed: int):
        F = p1.max.shape[0]
        self.n_intervals, self.max = n_intervals, p1.max.clamp_min(1e-30)
        self.intervals = SampleTable(F * n_intervals, per_interval, p1.top.before, p1.top.after)
        self.cand = p1.candidates()                                            # [F, C]
        self.cand_fires = torch.zeros(self.cand.shape, dtype=torch.int64)
        self.gen = torch.Generator().manual_seed(seed + 1)

    def update(self, tokens: torch.Tensor, f: torch.Tensor, seq0: int) -> None:
        flat_tokens = tokens.reshape(-1)
        for rows, feats in nonzeros(f):
            a = f[rows, feats]
            interval = (a / self.max[feats] * self.n_intervals).long().clamp(0, self.n_intervals - 1)
            key = torch.rand(len(rows), generator=self.gen)
            self.intervals.offer(feats * self.n_intervals + interval, key, a, rows, feats,
                                 tokens, f, seq0)
            hit = self.cand[feats] == flat_tokens[rows][:, None]               # [nnz, C]
            self.cand_fires.index_add_(0, feats, hit.long())

    def top_token(self, fires: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(token id [F] it fires on most among the candidates (-1: none), its share of the fires [F])."""
        counts, col = self.cand_fires.max(dim=1)
        token = self.cand.gather(1, col[:, None])[:, 0]
        token = torch.where(counts > 0, token, torch.full_like(token, EMPTY_TOKEN))
        return token, counts.double() / fires.clamp_min(1).double()


def nonzeros(f: torch.Tensor, chunk: int = 1 << 21):
    """(rows, features) of the non-zero entries of f [N, F], in chunks of at most `chunk` entries."""
    rows, feats = f.nonzero(as_tuple=True)
    for lo in range(0, len(rows), chunk):
        yield rows[lo:lo + chunk], feats[lo:lo + chunk]
