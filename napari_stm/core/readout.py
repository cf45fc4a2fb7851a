"""The space-time memory read: every query position attends over every memory position.

Shared by all networks. The affinity matrix of a long memory is never built whole: the dense
read goes through ``scaled_dot_product_attention`` (memory-efficient kernels on CPU and CUDA),
and the top-k read walks the query positions in chunks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

#: affinity elements computed at once by the chunked top-k read (about 64 MB of fp32)
CHUNK_ELEMENTS = 16 * 1024 * 1024


def memory_read(
    mem_keys: Tensor,
    mem_values: Tensor,
    query_key: Tensor,
    top_k: int | None = None,
    scale: float | None = None,
) -> Tensor:
    """Read memory values for every query position.

    mem_keys [Nk, Ck, M], mem_values [N, Cv, M], query_key [1 or Nk, Ck, P] -> [N, Cv, P].
    Nk is 1 (keys shared by all objects) or N (one key set per object). The affinity is the dot
    product times ``scale`` (default 1 / sqrt(Ck)), normalised by a softmax over the M memory
    positions (all of them, or only the ``top_k`` largest per query position).
    """
    nk, ck, m = mem_keys.shape
    n, cv, m2 = mem_values.shape
    if m != m2:
        raise ValueError(f"memory keys cover {m} positions but values cover {m2}")
    if nk not in (1, n):
        raise ValueError(f"{nk} key sets for {n} objects: need 1 or {n}")
    if scale is None:
        scale = 1.0 / math.sqrt(ck)
    p = query_key.shape[-1]
    if query_key.shape[0] != nk:
        query_key = query_key.expand(nk, ck, p)
    if nk == 1 and n > 1:
        # Shared keys: one attention over the objects' values stacked along channels.
        values = mem_values.reshape(1, n * cv, m)
    else:
        values = mem_values
    if top_k is not None and top_k < m:
        out = _topk_read(mem_keys, values, query_key, top_k, scale)
    elif query_key.device.type == "cpu" and values.shape[1] != ck:
        # PyTorch's CPU flash kernel needs keys and values of one width; otherwise SDPA builds
        # the whole [P, M] affinity (7 GB at 1080p). Chunks keep it bounded and are faster.
        out = _chunked_dense_read(mem_keys, values, query_key, scale)
    else:
        out = F.scaled_dot_product_attention(
            query_key.transpose(1, 2),  # [Nk, P, Ck]
            mem_keys.transpose(1, 2),  # [Nk, M, Ck]
            values.transpose(1, 2),  # [Nk, M, Cv']
            scale=scale,
        ).transpose(1, 2)
    return out.reshape(n, cv, p)


def _chunked_dense_read(keys: Tensor, values: Tensor, query: Tensor, scale: float) -> Tensor:
    nk, _, m = keys.shape
    p = query.shape[-1]
    out = values.new_empty(nk, values.shape[1], p)
    step = max(1, CHUNK_ELEMENTS // max(1, nk * m))
    for start in range(0, p, step):
        q = query[:, :, start : start + step]
        weights = torch.softmax(torch.bmm(keys.transpose(1, 2), q) * scale, dim=1)  # [Nk, M, p']
        out[:, :, start : start + q.shape[-1]] = torch.bmm(values, weights)
    return out


def _topk_read(keys: Tensor, values: Tensor, query: Tensor, k: int, scale: float) -> Tensor:
    nk, _, m = keys.shape
    cv = values.shape[1]
    p = query.shape[-1]
    out = values.new_empty(nk, cv, p)
    values_t = values.transpose(1, 2)  # [Nk, M, Cv']: one row per memory position
    # Query-major affinity, so the k best memory rows are gathered instead of multiplying a
    # mostly-zero [M, P] weight matrix (3x faster at 480p with 10 memory frames).
    step = max(1, CHUNK_ELEMENTS // max(1, nk * max(m, k * cv)))
    for start in range(0, p, step):
        q = query[:, :, start : start + step]
        n = q.shape[-1]
        aff = torch.bmm(q.transpose(1, 2), keys) * scale  # [Nk, p', M]
        top_val, top_idx = aff.topk(k, dim=2)  # [Nk, p', k]
        weights = torch.softmax(top_val, dim=2)
        rows = values_t.gather(1, top_idx.reshape(nk, n * k, 1).expand(-1, -1, cv))
        read = (rows.view(nk, n, k, cv) * weights.unsqueeze(-1)).sum(2)  # [Nk, p', Cv']
        out[:, :, start : start + n] = read.transpose(1, 2)
    return out


def soft_aggregate(probs: Tensor, extra_slots: int = 0, eps: float = 1e-7) -> Tensor:
    """Merge independent per-object probabilities [N, H, W] into logits [1 + N + extra, H, W].

    The paper's soft aggregation: background = prod(1 - p_k), objects p_k, clamped to
    [eps, 1 - eps], logit = log(q / (1 - q)). ``extra_slots`` unused object slots of
    probability 0 (the official evaluation keeps 11 slots in all) take part in the softmax.
    """
    n, h, w = probs.shape
    em = probs.new_zeros(1 + n + extra_slots, h, w)
    em[0] = torch.prod(1 - probs, dim=0)
    em[1 : n + 1] = probs
    em = em.clamp(eps, 1 - eps)
    return torch.log(em / (1 - em))
