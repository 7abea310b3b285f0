"""33 — Fused attention: softmax(Q·Kᵀ)·V on tiles, one program instance per block of query rows.

What this shows, in order:

1. a kernel that fuses three steps without writing anything in between: the
   scores ``Q·Kᵀ`` of a block of query rows against a block of keys
   (``kl.dot`` with a transposed tile), their row softmax, and the product
   with the values, accumulated over key blocks;
2. the *online* softmax: a running row max ``m`` and row sum ``total`` rescale the
   accumulator whenever a later key block raises the max, so the whole score
   row never has to be held at once (the idea behind FlashAttention);
3. masks on two axes: ragged query blocks (rows past ``S``) are neither read
   nor written, and keys past ``S`` get a score of ``-inf`` so they weigh 0;
4. the kernel batches: every PE runs its query blocks as one vectorized run
   of the body (``kl.kernel_cache_info(torch).batched`` counts PE shares run
   that way), with the device time of one-by-one execution.

Checked against numpy on the ``tiny`` and ``default`` presets.

Run: ``python examples/33_attention.py [preset ...]`` (default: tiny, then default; exits non-zero on a wrong
result).
"""

from __future__ import annotations

import math
import sys

import numpy as np

import kbus
import kbus.lang as kl


@kbus.kernel
def attention(q_ptr, k_ptr, v_ptr, o_ptr, S, scale, D: kl.constexpr, BM: kl.constexpr, BN: kl.constexpr):
    rows = kl.program_id(0) * BM + kl.arange(0, BM)
    dims = kl.arange(0, D)
    row_ok = rows[:, None] < S
    q = kl.load(q_ptr + rows[:, None] * D + dims[None, :], mask=row_ok, other=0.0)
    m = kl.full((BM,), -np.inf, kl.float32)  # running row max of the scores
    total = kl.zeros((BM,), kl.float32)  # running row sum of exp(score - m)
    acc = kl.zeros((BM, D), kl.float32)
    for start in range(0, S, BN):
        keys = start + kl.arange(0, BN)
        key_ok = keys[:, None] < S
        k = kl.load(k_ptr + keys[:, None] * D + dims[None, :], mask=key_ok, other=0.0)
        v = kl.load(v_ptr + keys[:, None] * D + dims[None, :], mask=key_ok, other=0.0)
        s = kl.where(keys[None, :] < S, kl.dot(q, k.T) * scale, -np.inf)
        m_new = kl.maximum(m, kl.max(s, axis=1))
        alpha = kl.exp(m - m_new)  # how much the old accumulator shrinks under the new max
        p = kl.exp(s - m_new[:, None])
        total = total * alpha + kl.sum(p, axis=1)
        acc = kl.dot(p, v, acc * alpha[:, None])
        m = m_new
    kl.store(o_ptr + rows[:, None] * D + dims[None, :], acc / total[:, None], mask=row_ok)


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    s = (q.astype(np.float64) @ k.T.astype(np.float64)) / math.sqrt(q.shape[1])
    p = np.exp(s - s.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)) @ v.astype(np.float64)


async def run(preset: str) -> None:
    async with kbus.open_device(preset) as torch:
        S, D, BM, BN = 1000, 64, 16, 128  # S is not a multiple of either block
        rng = np.random.default_rng(33)
        qh, kh, vh = (rng.standard_normal((S, D)).astype(np.float32) for _ in range(3))
        q = torch.tensor(qh)  # query rows sharded over the PEs
        k, v = torch.tensor(kh, policy=kbus.Replicate()), torch.tensor(vh, policy=kbus.Replicate())
        out = torch.empty(S, D, dtype=np.float32)
        for t in (q, k, v, out):
            await t
        res = await attention[(kl.cdiv(S, BM),)](
            q, k, v, out, S, 1 / math.sqrt(D), D=D, BM=BM, BN=BN, placement="owner"
        )
        got = await out.numpy()
        expect = reference(qh, kh, vh)
        if not np.allclose(got, expect, rtol=1e-4, atol=1e-5):
            sys.exit(f"{preset}: attention mismatch, max abs error {np.abs(got - expect).max():.3g}")
        info = kl.kernel_cache_info(torch)
        print(
            f"{preset:>8}: softmax(QKᵀ/√{D})·V for S={S}: {res.instances} query blocks on {res.active_pes} PEs, "
            f"{kbus.format_time(res.duration_ps)} of device time, {info.batched} PE share(s) batched, checked"
        )


PRESETS = ("tiny", "default")


async def main() -> None:
    for preset in sys.argv[1:] or PRESETS:
        await run(preset)


if __name__ == "__main__":
    kbus.run(main)
