"""MoDeGPT's solvers (modegpt.md §7): exact at full keep, optimal where the paper says so, better than
plain truncated SVD of the weights at the same parameter count, and a sparsity allocation that keeps
its mean, cap and order."""

import pytest
import torch
import torch.nn.functional as F

from compressor.lowrank.modegpt import (
    allocate_sparsity,
    block_importance,
    cr_key_query,
    nystrom_mlp,
    refit_down,
    rotary_pair_scores,
    whitened_value_output,
)

D, FF, N_HEADS, N_KV, HEAD_DIM, TOKENS = 64, 176, 4, 2, 16, 2048


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def decaying(rows, cols, seed, power=1.0):
    """A Gaussian matrix with a decaying column spectrum, like trained weights and activations."""
    g = torch.randn(rows, cols, generator=generator(seed), dtype=torch.float64)
    return g * torch.arange(1, cols + 1, dtype=torch.float64) ** -power


@pytest.fixture(scope="module")
def mlp():
    x = decaying(TOKENS, D, 1, 0.7) @ torch.linalg.qr(torch.randn(D, D, generator=generator(2), dtype=torch.float64))[0]
    gate, up = decaying(FF, D, 3, 0.5), decaying(FF, D, 4, 0.5)
    down = torch.randn(D, FF, generator=generator(5), dtype=torch.float64) / FF**0.5
    z = F.silu(x @ gate.T) * (x @ up.T)
    return x, gate, up, down, z


def mlp_error(x, z, down, gate, up, new_down):
    reference = z @ down.T
    return float(torch.linalg.norm(reference - (F.silu(x @ gate.T) * (x @ up.T)) @ new_down.T) / torch.linalg.norm(reference))


def test_type_one_at_full_keep_is_exact(mlp):
    x, gate, up, down, z = mlp
    new_gate, new_up, new_down, index = nystrom_mlp(gate, up, down, z.T @ z, FF)
    assert torch.equal(index, torch.arange(FF))
    assert mlp_error(x, z, down, new_gate, new_up, new_down) < 1e-8


def test_type_one_beats_slicing_and_truncated_svd_at_the_same_parameters(mlp):
    x, gate, up, down, z = mlp
    keep = FF // 2
    new_gate, new_up, new_down, index = nystrom_mlp(gate, up, down, z.T @ z, keep)
    ours = mlp_error(x, z, down, new_gate, new_up, new_down)
    sliced = mlp_error(x, z, down, gate[index], up[index], down[:, index])  # same neurons, no refit
    by_norm = (gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0)).topk(keep).indices.sort().values
    by_norm_error = mlp_error(x, z, down, gate[by_norm], up[by_norm], down[:, by_norm])
    rank = keep * D // (D + FF)  # 3 * keep * D parameters either way

    def truncated(w):
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return (u[:, :rank] * s[:rank]) @ vh[:rank]

    svd_error = mlp_error(x, z, truncated(down), truncated(gate), truncated(up), truncated(down))
    assert ours <= sliced and ours < by_norm_error, (ours, sliced, by_norm_error)
    assert ours < svd_error, (ours, svd_error)


def test_type_one_refit_is_the_least_squares_optimum(mlp):
    x, gate, up, down, z = mlp
    index = torch.arange(0, FF, 3)
    best = refit_down(down, z.T @ z, index)
    error = mlp_error(x, z, down, gate[index], up[index], best)
    for seed in range(5):
        nudge = torch.randn(best.shape, generator=generator(seed), dtype=torch.float64) * 1e-3 * best.abs().mean()
        assert mlp_error(x, z, down, gate[index], up[index], best + nudge) > error


def rope(x, positions, frequencies):
    """HF half-split rotary embedding of ``x`` [tokens, heads, d] with the given inverse frequencies [d/2]."""
    angles = positions[:, None].double() * frequencies[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def attention_logits(hidden, query, key, positions, frequencies, head_dim):
    q = rope((hidden @ query.T).view(len(hidden), N_HEADS, head_dim), positions, frequencies)
    k = rope((hidden @ key.T).view(len(hidden), N_KV, head_dim), positions, frequencies)
    k = k.repeat_interleave(N_HEADS // N_KV, dim=1)
    return torch.einsum("qhd,khd->hqk", q, k)


def test_type_two_keeps_the_kept_pairs_logits_exactly_with_their_own_frequencies():
    hidden = decaying(40, D, 6, 0.5)
    query, key = decaying(N_HEADS * HEAD_DIM, D, 7), decaying(N_KV * HEAD_DIM, D, 8)
    q_act, k_act = hidden @ query.T, hidden @ key.T
    query_diag = (q_act**2).sum(0).view(N_HEADS, HEAD_DIM)
    key_diag = (k_act**2).sum(0).view(N_KV, HEAD_DIM)
    frequencies = 10000.0 ** (-torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    positions = torch.tensor([0, 37] + list(range(2, 40)))
    keep = 3
    new_query, new_key, _, _, pairs = cr_key_query(query, key, query_diag, key_diag, keep)
    assert new_query.shape == (N_HEADS * 2 * keep, D) and new_key.shape == (N_KV * 2 * keep, D)
    assert pairs.shape == (N_KV, keep)

    # masked: zero the dropped coordinates at their original places (pre-RoPE = post-RoPE for whole pairs)
    dropped = torch.ones(N_KV, HEAD_DIM, dtype=torch.bool)
    for j in range(N_KV):
        dropped[j, pairs[j]] = False
        dropped[j, pairs[j] + HEAD_DIM // 2] = False
    keep_q = (~dropped).repeat_interleave(N_HEADS // N_KV, 0).reshape(-1, 1).double()
    masked = attention_logits(hidden, query * keep_q, key * (~dropped).reshape(-1, 1).double(), positions, frequencies, HEAD_DIM)
    full = attention_logits(hidden, query, key, positions, frequencies, HEAD_DIM)
    only_dropped = attention_logits(hidden, query * (1 - keep_q), key * dropped.reshape(-1, 1).double(), positions, frequencies, HEAD_DIM)
    torch.testing.assert_close(masked, full - only_dropped, rtol=0, atol=1e-10)

    # sliced: each KV head's kept pairs keep their own frequencies
    q = (hidden @ new_query.T).view(len(hidden), N_HEADS, 2 * keep)
    k = (hidden @ new_key.T).view(len(hidden), N_KV, 2 * keep)
    q = torch.stack([rope(q[:, h : h + 1], positions, frequencies[pairs[h // (N_HEADS // N_KV)]])[:, 0] for h in range(N_HEADS)], 1)
    k = torch.stack([rope(k[:, j : j + 1], positions, frequencies[pairs[j]])[:, 0] for j in range(N_KV)], 1)
    sliced = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(N_HEADS // N_KV, dim=1))
    torch.testing.assert_close(sliced, masked, rtol=0, atol=1e-10)


def test_type_two_pairs_are_chosen_by_the_cr_score_of_the_whole_group():
    query_diag = torch.ones(N_HEADS, HEAD_DIM, dtype=torch.float64)
    key_diag = torch.ones(N_KV, HEAD_DIM, dtype=torch.float64)
    query_diag[1, 3] = 100.0  # head 1 (kv head 0) loves pair 3 through its first coordinate
    key_diag[1, 5 + HEAD_DIM // 2] = 50.0  # kv head 1 loves pair 5 through its partner coordinate
    scores = rotary_pair_scores(query_diag, key_diag)
    assert scores[0].argmax() == 3 and scores[1].argmax() == 5


def value_output_error(x, value, output, new_value, new_output, group):
    """Summed over heads: || x W_V,j W_O,h - x W'_V,j W'_O,h ||_F (the linear part of each head)."""
    d, k = value.shape[0] // N_KV, new_value.shape[0] // N_KV
    total = 0.0
    for h in range(N_HEADS):
        j = h // group
        exact = x @ value[j * d : (j + 1) * d].T @ output[:, h * d : (h + 1) * d].T
        approx = x @ new_value[j * k : (j + 1) * k].T @ new_output[:, h * k : (h + 1) * k].T
        total += float(torch.linalg.norm(exact - approx) ** 2)
    return total**0.5


@pytest.fixture(scope="module")
def attention():
    x = decaying(TOKENS, D, 9, 0.8)
    value = decaying(N_KV * HEAD_DIM, D, 10, 0.3)
    output = decaying(D, N_HEADS * HEAD_DIM, 11, 0.3)
    return x, value, output


def test_type_three_at_full_rank_is_exact_and_carries_the_bias(attention):
    x, value, output = attention
    bias = torch.randn(N_KV * HEAD_DIM, generator=generator(12), dtype=torch.float64)
    new_value, new_output, new_bias = whitened_value_output(value, output, x.T @ x, N_HEADS, N_KV, HEAD_DIM, bias)
    assert value_output_error(x, value, output, new_value, new_output, N_HEADS // N_KV) < 1e-8 * torch.linalg.norm(x)
    ones = torch.ones(3, 1, dtype=torch.float64)
    for h in range(N_HEADS):  # the bias's path through each head is kept too
        j = h // (N_HEADS // N_KV)
        exact = ones * bias[j * HEAD_DIM : (j + 1) * HEAD_DIM] @ output[:, h * HEAD_DIM : (h + 1) * HEAD_DIM].T
        approx = ones * new_bias[j * HEAD_DIM : (j + 1) * HEAD_DIM] @ new_output[:, h * HEAD_DIM : (h + 1) * HEAD_DIM].T
        torch.testing.assert_close(approx, exact, rtol=1e-8, atol=1e-8)


def test_type_three_is_eckart_young_optimal_and_beats_plain_svd(attention):
    x, value, output = attention
    keep = 5
    # one head (MHA): the error is exactly the tail singular energy of X W_V W_O
    v1, o1 = value[:HEAD_DIM], output[:, :HEAD_DIM]
    new_v, new_o, _ = whitened_value_output(v1, o1, x.T @ x, 1, 1, keep)
    singular = torch.linalg.svdvals(x @ v1.T @ o1.T)
    error = float(torch.linalg.norm(x @ v1.T @ o1.T - x @ new_v.T @ new_o.T))
    assert error == pytest.approx(float(singular[keep:].norm()), rel=1e-6)
    # GQA: whitened joint SVD below plain (unwhitened) SVD of each head's W_V W_O at the same k
    new_value, new_output, _ = whitened_value_output(value, output, x.T @ x, N_HEADS, N_KV, keep)
    plain_value, plain_output, _ = whitened_value_output(value, output, torch.eye(D, dtype=torch.float64), N_HEADS, N_KV, keep)
    group = N_HEADS // N_KV
    ours = value_output_error(x, value, output, new_value, new_output, group)
    plain = value_output_error(x, value, output, plain_value, plain_output, group)
    assert ours < plain, (ours, plain)


def test_allocation_keeps_the_mean_the_cap_and_the_order():
    importance = torch.tensor([0.30, 0.02, 0.05, 0.01, 0.20, 0.015])
    sparsity = allocate_sparsity(importance, 0.4, smoothing=0.02, cap=0.6)
    assert float(sparsity.mean()) == pytest.approx(0.4, abs=1e-9)
    assert float(sparsity.max()) <= 0.6 + 1e-12 and (sparsity == 0.6).sum() >= 1  # the cap bit
    order = importance.argsort()
    assert (sparsity[order].diff() <= 1e-12).all()  # more important blocks are pruned less
    uniform = allocate_sparsity(importance, 0.25, smoothing=1e6)
    torch.testing.assert_close(uniform, torch.full((6,), 0.25, dtype=torch.float64), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="cannot be spread"):
        allocate_sparsity(importance, 0.9, cap=0.8)


def test_block_importance():
    h = torch.randn(2, 7, D, generator=generator(13))
    assert block_importance(h, h) == pytest.approx(0.0, abs=1e-12)
    assert block_importance(h, -h) == pytest.approx(2.0)
