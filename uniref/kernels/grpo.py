"""Triton kernels for the MSGRPO (Flow-GRPO) math: group advantages and the clipped policy loss.

At training sizes (24 samples x 4096 tokens x 64 channels) the loss is bound by launches and host work,
not bandwidth (`docs/gpu_anchors.md`), so everything per sample happens on the device:

* `flow_grpo_loss_forward`: ONE kernel (plus the 4-byte zero fill of its ticket counter). A (split, N)
  grid of programs each reduces a chunk of one sample (sum of (x_next - mean)^2 and of
  (mean - mean_ref)^2, fp32 accumulation), writes its two partial sums and takes a ticket from a global
  counter; the program holding the last ticket reads all partials in a fixed order (deterministic, no
  float atomics), does the per-sample scalar math (log-prob, ratio, clipped objective, KL, gradient
  coefficients) and the mean over samples. No host sync.
* `flow_grpo_loss_backward`: ONE kernel writing d loss / d mean = g * (c0 (x_next - mean) + c1 (mean -
  mean_ref)) in a single pass, with the per-sample c0, c1 the forward left behind and g read from the
  device (the incoming gradient is never copied to the host).
* `group_advantages`: ONE kernel. Each program owns a block of rows and compares their group ids with
  every row of the batch (all sources at once), so group ids need no host-side `unique`.

The launchers take CPU tensors too when TRITON_INTERPRET=1 (how the tests run them without a GPU).
Kernels load any float dtype and compute in fp32.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

_LOG_SQRT_2PI = tl.constexpr(0.9189385332046727)  # log(sqrt(2 pi))

# Elements per program and loop iteration on a GPU: 16 bytes per thread per load at fp32 with 8 warps.
_GPU_BLOCK = 2048
_GPU_WARPS = 8
# Programs per SM the loss grid aims at: enough loads in flight to saturate HBM.
_PROGRAMS_PER_SM = 4
# Register budget of the final program's (samples x partials) tile.
_FINAL_TILE = 4096


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _loss_grid(n: int, d: int, device: torch.device, block: int | None, split: int | None):
    """(block, chunk, split): each of the split programs of a sample reduces `chunk` elements (a multiple
    of `block`); split is the least number of such chunks covering d."""
    if block is None:
        block = _GPU_BLOCK if device.type == "cuda" else 128
    if split is None:
        target = _PROGRAMS_PER_SM * _num_sms(device.index) if device.type == "cuda" else n
        split = max(1, -(-target // n))
    chunk = -(-d // split)
    chunk = -(-chunk // block) * block
    return block, chunk, -(-d // chunk)


def _rows(x: Tensor, n: int) -> Tensor:
    """(N, ...) -> an (N, D) view with unit stride along D (copying only when no such view exists)."""
    rows = x.reshape(n, -1)
    return rows if rows.stride(1) == 1 or rows.shape[1] == 1 else rows.contiguous()


# ---- loss forward -----------------------------------------------------------------------------------


@triton.jit
def _loss_fwd_kernel(
    x_ptr, mu_ptr, ref_ptr, stride_x, stride_mu, stride_ref,
    old_ptr, adv_ptr, std_ptr, kl_std_ptr,
    partial_ptr, ticket_ptr,
    loss_ptr, logp_ptr, ratio_ptr, kl_ptr, clip_frac_ptr, coef_ptr,
    N, D, CHUNK, SPLIT, clip_range, beta,
    HAS_REF: tl.constexpr, GAUSSIAN: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_s = tl.program_id(0)
    n = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    x_row = x_ptr + n.to(tl.int64) * stride_x
    mu_row = mu_ptr + n.to(tl.int64) * stride_mu
    ref_row = ref_ptr + n.to(tl.int64) * stride_ref
    acc_sq = tl.zeros([BLOCK], dtype=tl.float32)
    acc_kl = tl.zeros([BLOCK], dtype=tl.float32)
    base = pid_s * CHUNK
    for start in range(0, CHUNK, BLOCK):
        idx = base + start + offs
        mask = idx < D
        x = tl.load(x_row + idx, mask=mask, other=0.0).to(tl.float32)
        mu = tl.load(mu_row + idx, mask=mask, other=0.0).to(tl.float32)
        diff = x - mu
        acc_sq += diff * diff
        if HAS_REF:
            ref = tl.load(ref_row + idx, mask=mask, other=0.0).to(tl.float32)
            dev = mu - ref
            acc_kl += dev * dev
    # partials: [0, N*SPLIT) squared distances to the step mean, [N*SPLIT, 2*N*SPLIT) to the reference.
    tl.store(partial_ptr + n * SPLIT + pid_s, tl.sum(acc_sq, axis=0))
    tl.store(partial_ptr + N * SPLIT + n * SPLIT + pid_s, tl.sum(acc_kl, axis=0))
    # Every thread's store must be ordered before the ticket (which one thread takes, with release
    # semantics): the barrier makes the program's stores happen-before that thread's atomic.
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    if ticket == N * SPLIT - 1:
        _loss_finish(
            partial_ptr, old_ptr, adv_ptr, std_ptr, kl_std_ptr,
            loss_ptr, logp_ptr, ratio_ptr, kl_ptr, clip_frac_ptr, coef_ptr,
            N, D, SPLIT, clip_range, beta, HAS_REF, GAUSSIAN, BLOCK_SPLIT, BLOCK_N,
        )  # fmt: skip


@triton.jit
def _loss_finish(
    partial_ptr, old_ptr, adv_ptr, std_ptr, kl_std_ptr,
    loss_ptr, logp_ptr, ratio_ptr, kl_ptr, clip_frac_ptr, coef_ptr,
    N, D, SPLIT, clip_range, beta,
    HAS_REF: tl.constexpr, GAUSSIAN: tl.constexpr, BLOCK_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The per-sample scalar math and the mean over samples, run by the program that finished last."""
    cols = tl.arange(0, BLOCK_SPLIT)
    col_mask = cols < SPLIT
    # `* 1.0`, not `.to(tl.float32)`: Triton turns integer arguments equal to 1 into constexprs.
    d = D * 1.0
    policy_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    kl_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    clipped_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        tile = rows[:, None] * SPLIT + cols[None, :]
        tile_mask = row_mask[:, None] & col_mask[None, :]
        # volatile: read past L1, which is not coherent with the other programs' stores.
        sq = tl.sum(tl.load(partial_ptr + tile, mask=tile_mask, other=0.0, volatile=True), axis=1)
        old = tl.load(old_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        adv = tl.load(adv_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        std = tl.load(std_ptr + rows, mask=row_mask, other=1.0).to(tl.float32)
        if GAUSSIAN:
            logp = -(sq / d) / (2.0 * std * std) - tl.log(std) - _LOG_SQRT_2PI
            dlogp = 1.0 / (std * std * d)
        else:
            logp = -(sq / d)
            dlogp = tl.full([BLOCK_N], 2.0, tl.float32) / d
        # step_std <= 0 (or NaN) is invalid input; CUDA inputs are not checked on the host (that would
        # need a sync), so such a sample's log-prob, and with it the loss, becomes NaN instead.
        logp = tl.where(std > 0.0, logp, float("nan"))
        ratio = tl.exp(logp - old)
        clamped = tl.minimum(tl.maximum(ratio, 1.0 - clip_range), 1.0 + clip_range)
        unclipped_term = -adv * ratio
        clipped_term = -adv * clamped
        policy = tl.where(unclipped_term < clipped_term, clipped_term, unclipped_term)
        # d policy / d ratio is -A unless the clipped term is the strictly larger one (see
        # grpo_reference.flow_grpo_loss_grad_coef); `<` is False for NaN, which then reaches the grad.
        coef_pg = tl.where(unclipped_term < clipped_term, 0.0, -adv * ratio * dlogp / N)
        if HAS_REF:
            kl_std = tl.load(kl_std_ptr + rows, mask=row_mask, other=1.0).to(tl.float32)
            dev = tl.sum(tl.load(partial_ptr + N * SPLIT + tile, mask=tile_mask, other=0.0, volatile=True), axis=1)
            kl = (dev / d) / (2.0 * kl_std * kl_std)
            coef_kl = beta / (N * d * kl_std * kl_std)
        else:
            kl = tl.zeros([BLOCK_N], dtype=tl.float32)
            coef_kl = tl.zeros([BLOCK_N], dtype=tl.float32)
        tl.store(logp_ptr + rows, logp, mask=row_mask)
        tl.store(ratio_ptr + rows, ratio, mask=row_mask)
        tl.store(kl_ptr + rows, kl, mask=row_mask)
        tl.store(coef_ptr + 2 * rows, coef_pg, mask=row_mask)
        tl.store(coef_ptr + 2 * rows + 1, coef_kl, mask=row_mask)
        policy_acc += tl.where(row_mask, policy, 0.0)
        kl_acc += tl.where(row_mask, kl, 0.0)
        clipped_acc += tl.where(row_mask & (tl.abs(ratio - 1.0) > clip_range), 1.0, 0.0)
    n_f = N * 1.0
    tl.store(loss_ptr, (tl.sum(policy_acc, axis=0) + beta * tl.sum(kl_acc, axis=0)) / n_f)
    tl.store(clip_frac_ptr, tl.sum(clipped_acc, axis=0) / n_f)


def flow_grpo_loss_forward(
    x_next: Tensor,
    mean: Tensor,
    mean_ref: Tensor | None,
    old_log_prob: Tensor,
    advantages: Tensor,
    step_std: Tensor,
    kl_std: Tensor,
    clip_range: float,
    beta: float,
    gaussian: bool,
    *,
    block: int | None = None,
    split: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Launches the fused forward; the `uniref::flow_grpo_loss` op on CUDA (see csrc/ops.cpp).

    Args:
        x_next, mean, mean_ref: (N, ...) with the same shape, fp32/bf16/fp16 (dtypes may differ).
        old_log_prob, advantages, step_std, kl_std: (N,) float.
        clip_range, beta, gaussian: as in `uniref.flow_grpo_loss` (gaussian = kind "sde").
        block, split: elements per loop iteration and programs per sample; None = tuned for the device
            (tests pass small values to exercise chunk edges under the interpreter).

    Returns:
        loss (), log_prob, ratio, kl (N,), clip_fraction () and grad_coef (N, 2), all float32.
    """
    n = mean.shape[0]
    xr, mr = _rows(x_next, n), _rows(mean, n)
    rr = _rows(mean_ref, n) if mean_ref is not None else mr  # never read without HAS_REF
    d = mr.shape[1]
    block, chunk, split = _loss_grid(n, d, mean.device, block, split)
    block_split = triton.next_power_of_2(split)
    block_n = max(1, min(triton.next_power_of_2(n), _FINAL_TILE // block_split))
    f32 = dict(dtype=torch.float32, device=mean.device)
    partials = torch.empty(2 * n * split, **f32)
    ticket = torch.zeros(1, dtype=torch.int32, device=mean.device)
    loss, clip_fraction = torch.empty((), **f32), torch.empty((), **f32)
    log_prob, ratio, kl = (torch.empty(n, **f32) for _ in range(3))
    grad_coef = torch.empty(n, 2, **f32)
    _loss_fwd_kernel[(split, n)](
        xr, mr, rr, xr.stride(0), mr.stride(0), rr.stride(0),
        old_log_prob.contiguous(), advantages.contiguous(), step_std.contiguous(), kl_std.contiguous(),
        partials, ticket,
        loss, log_prob, ratio, kl, clip_fraction, grad_coef,
        n, d, chunk, split, float(clip_range), float(beta),
        HAS_REF=mean_ref is not None, GAUSSIAN=bool(gaussian),
        BLOCK=block, BLOCK_SPLIT=block_split, BLOCK_N=block_n, num_warps=_GPU_WARPS,
    )  # fmt: skip
    return loss, log_prob, ratio, kl, clip_fraction, grad_coef


# ---- loss backward ----------------------------------------------------------------------------------


@triton.jit
def _loss_bwd_kernel(
    grad_loss_ptr, x_ptr, mu_ptr, ref_ptr, grad_ptr, stride_x, stride_mu, stride_ref, coef_ptr,
    D, CHUNK, HAS_REF: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid_s = tl.program_id(0)
    n = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    g = tl.load(grad_loss_ptr).to(tl.float32)
    # Scalars broadcast to blocks before meeting tensors (the interpreter needs it; free on GPU).
    c_pg = tl.full([BLOCK], 1.0, tl.float32) * (tl.load(coef_ptr + 2 * n) * g)
    c_kl = tl.full([BLOCK], 1.0, tl.float32) * (tl.load(coef_ptr + 2 * n + 1) * g)
    row = n.to(tl.int64)
    base = pid_s * CHUNK
    for start in range(0, CHUNK, BLOCK):
        idx = base + start + offs
        mask = idx < D
        x = tl.load(x_ptr + row * stride_x + idx, mask=mask, other=0.0).to(tl.float32)
        mu = tl.load(mu_ptr + row * stride_mu + idx, mask=mask, other=0.0).to(tl.float32)
        grad = c_pg * (x - mu)
        if HAS_REF:
            ref = tl.load(ref_ptr + row * stride_ref + idx, mask=mask, other=0.0).to(tl.float32)
            grad += c_kl * (mu - ref)
        tl.store(grad_ptr + row * D + idx, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def flow_grpo_loss_backward(
    grad_loss: Tensor,
    x_next: Tensor,
    mean: Tensor,
    mean_ref: Tensor | None,
    grad_coef: Tensor,
    *,
    block: int | None = None,
    split: int | None = None,
) -> Tensor:
    """Launches the one-pass backward; the `uniref::flow_grpo_loss_backward` op on CUDA.

    grad_loss () float; x_next, mean, mean_ref (N, ...); grad_coef (N, 2) float32 from the forward.
    Returns d loss / d mean shaped and typed like `mean` (contiguous). mean_ref = None skips the KL term
    (and its reads): pass it only when beta != 0.
    """
    n = mean.shape[0]
    xr, mr = _rows(x_next, n), _rows(mean, n)
    rr = _rows(mean_ref, n) if mean_ref is not None else mr
    d = mr.shape[1]
    block, chunk, split = _loss_grid(n, d, mean.device, block, split)
    grad = torch.empty(mean.shape, dtype=mean.dtype, device=mean.device)
    _loss_bwd_kernel[(split, n)](
        grad_loss, xr, mr, rr, grad, xr.stride(0), mr.stride(0), rr.stride(0), grad_coef.contiguous(),
        d, chunk, HAS_REF=mean_ref is not None, BLOCK=block, num_warps=_GPU_WARPS,
    )  # fmt: skip
    return grad


# ---- advantages -------------------------------------------------------------------------------------


@triton.jit
def _load_values(r_ptr, rows, row_mask, cols, col_mask, w, stride_r, NORMALIZE_FIRST: tl.constexpr):
    """The quantities to normalize for a block of rows: the rewards [rows, BLOCK_S] themselves
    (normalize_then_sum) or their weighted sum [rows, 1] (sum_then_normalize)."""
    r = tl.load(r_ptr + rows[:, None] * stride_r + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
    r = r.to(tl.float32)
    if NORMALIZE_FIRST:
        values = r
    else:
        values = tl.sum(r * w[None, :], axis=1)[:, None]
    return values


@triton.jit
def _group_advantages_kernel(
    r_ptr, gid_ptr, w_ptr, adv_ptr, const_ptr, N, S, stride_r, eps, clip,
    NORMALIZE_FIRST: tl.constexpr, BATCH_STD: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    rows_i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = rows_i < N
    cols = tl.arange(0, BLOCK_S)
    col_mask = cols < S
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    gid_i = tl.load(gid_ptr + rows_i, mask=mask_i, other=0)
    v_i = _load_values(r_ptr, rows_i, mask_i, cols, col_mask, w, stride_r, NORMALIZE_FIRST)  # [BI, K]

    # Pass 1 over the batch: size, sum, min and max of each row's group, per quantity. Comparing ids
    # pairwise costs O(N^2 K) but N is a rollout batch (tens to a few thousand rows).
    count = tl.zeros([BLOCK_I], dtype=tl.float32)
    total = tl.zeros_like(v_i)
    lo = tl.full(v_i.shape, float("inf"), tl.float32)
    hi = tl.full(v_i.shape, float("-inf"), tl.float32)
    for j0 in range(0, N, BLOCK_J):
        rows_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = rows_j < N
        gid_j = tl.load(gid_ptr + rows_j, mask=mask_j, other=0)
        v_j = _load_values(r_ptr, rows_j, mask_j, cols, col_mask, w, stride_r, NORMALIZE_FIRST)[None, :, :]
        same = (gid_i[:, None] == gid_j[None, :]) & mask_j[None, :]
        count += tl.sum(same.to(tl.float32), axis=1)
        same3 = same[:, :, None]
        total += tl.sum(tl.where(same3, v_j, 0.0), axis=1)
        lo = tl.minimum(lo, tl.min(tl.where(same3, v_j, float("inf")), axis=1))
        hi = tl.maximum(hi, tl.max(tl.where(same3, v_j, float("-inf")), axis=1))
    # Rows past N (masked, never stored) may find no group: keep their count at 1 to stay finite.
    count = tl.maximum(count, 1.0)[:, None]
    group_mean = total / count

    # Pass 2: the std, two-pass (sum of squared deviations from the mean) for accuracy in fp32.
    if BATCH_STD:
        batch_total = tl.sum(tl.zeros_like(v_i), axis=0)  # [K]
        for j0 in range(0, N, BLOCK_J):
            rows_j = j0 + tl.arange(0, BLOCK_J)
            mask_j = rows_j < N
            v_j = _load_values(r_ptr, rows_j, mask_j, cols, col_mask, w, stride_r, NORMALIZE_FIRST)
            batch_total += tl.sum(v_j, axis=0)  # masked rows load as 0
        batch_mean = (batch_total / N)[None, :]
        batch_ssd = tl.sum(tl.zeros_like(v_i), axis=0)
        for j0 in range(0, N, BLOCK_J):
            rows_j = j0 + tl.arange(0, BLOCK_J)
            mask_j = rows_j < N
            v_j = _load_values(r_ptr, rows_j, mask_j, cols, col_mask, w, stride_r, NORMALIZE_FIRST)
            dev = tl.where(mask_j[:, None], v_j - batch_mean, 0.0)
            batch_ssd += tl.sum(dev * dev, axis=0)
        std = tl.sqrt(batch_ssd / N)[None, :]
    else:
        ssd = tl.zeros_like(v_i)
        for j0 in range(0, N, BLOCK_J):
            rows_j = j0 + tl.arange(0, BLOCK_J)
            mask_j = rows_j < N
            gid_j = tl.load(gid_ptr + rows_j, mask=mask_j, other=0)
            v_j = _load_values(r_ptr, rows_j, mask_j, cols, col_mask, w, stride_r, NORMALIZE_FIRST)[None, :, :]
            same3 = ((gid_i[:, None] == gid_j[None, :]) & mask_j[None, :])[:, :, None]
            dev = tl.where(same3, v_j - group_mean[:, None, :], 0.0)
            ssd += tl.sum(dev * dev, axis=1)
        std = tl.sqrt(ssd / count)

    # Exact (the fp mean of equal values need not equal them). Rows past N count as constant too.
    constant = (lo == hi) | ~mask_i[:, None]
    # A constant group has std 0: divide by 1 there rather than form 0 / 0 and mask it afterwards.
    normalized = tl.where(constant, 0.0, (v_i - group_mean) / tl.where(constant, 1.0, std + eps))
    if NORMALIZE_FIRST:
        adv = tl.sum(normalized * w[None, :], axis=1)
        tl.store(const_ptr + rows_i[:, None] * S + cols[None, :], constant.to(tl.int8),
                 mask=mask_i[:, None] & col_mask[None, :])  # fmt: skip
    else:
        adv = tl.sum(normalized, axis=1)  # K = 1
        tl.store(const_ptr + rows_i[:, None], constant.to(tl.int8), mask=mask_i[:, None])
    adv = tl.minimum(tl.maximum(adv, -clip), clip)
    tl.store(adv_ptr + rows_i, adv, mask=mask_i)


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    weights: Tensor,
    normalize_first: bool,
    batch_std: bool,
    eps: float,
    clip: float,
    *,
    block_i: int = 16,
    block_j: int = 32,
) -> tuple[Tensor, Tensor]:
    """Launches the advantage kernel; the `uniref::group_advantages` op on CUDA.

    rewards (N, S) float; group_ids (N,) integer; weights (S,) float. Returns advantages (N,) float32
    and constant (N, K) bool (K = S if normalize_first else 1), as `grpo_reference.group_advantages_reference`.
    """
    n, s = rewards.shape
    rewards = rewards.contiguous()
    k = s if normalize_first else 1
    advantages = torch.empty(n, dtype=torch.float32, device=rewards.device)
    constant = torch.empty(n, k, dtype=torch.bool, device=rewards.device)
    _group_advantages_kernel[(triton.cdiv(n, block_i),)](
        rewards, group_ids.contiguous(), weights.contiguous(), advantages, constant.view(torch.int8),
        n, s, rewards.stride(0), float(eps), float(clip),
        NORMALIZE_FIRST=bool(normalize_first), BATCH_STD=bool(batch_std),
        BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_S=triton.next_power_of_2(s),
    )  # fmt: skip
    return advantages, constant
