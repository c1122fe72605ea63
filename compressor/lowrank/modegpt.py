"""MoDeGPT (Lin et al., "Modular Decomposition for Large Language Model Compression", arXiv 2408.09632):
the solvers, as plain functions on tensors.

MoDeGPT compresses the pairs of matrices multiplied inside a block, choosing their shared inner
dimension to keep each module's output on calibration activations:

* Type I, the MLP ``down(silu(gate x) * up x)``: keep ``k`` intermediate neurons by ridge leverage
  scores of their activation correlation ``C_sigma`` and refit ``down`` in closed form (Nystrom);
* Type II, query-key: keep whole rotary pairs ``(p, p + d/2)`` per KV head by the CR score
  ``sqrt(sum C_q[c,c] C_k[c,c])`` (column norms of the query and key activations), shared by the query
  heads of a GQA group;
* Type III, value-output: per KV head, the truncated SVD of ``C_x^{1/2} W_V [W_O,h1 .. W_O,hg]``, the
  value-output maps of the group's query heads taken jointly (exact at full rank, Eckart-Young optimal
  in the whitened norm);
* the keep ratio of each block from a global allocation: sparsity ``L * phi * softmax(-s / eps)`` over
  block importances ``s`` (1 - cosine of a block's input and output), capped and redistributed.

Defaults and choices (``docs/methods/modegpt.md`` when the step lands): ridge ``1e-2 * mean diag``
(scale-free; the reimplementations use absolute values), refit in float64 with a ``1e-10`` relative
jitter, smoothing ``eps = 0.15`` and cap ``0.8`` (cbacary/MoDeGPT's defaults; the paper leaves eps a
hyper-parameter), the inverse-free Type III form (``W_V B``, ``U_k^T C^{1/2} W_V W_O``: no
``C_x^{-1/2}``, so no ridge). Not yet a recipe step: the step, the allocation pass and the sliced and
masked exports come with the architecture channel (issue 17).
"""

from __future__ import annotations

import torch


# ----------------------------------------------------------------------------------------------
# Global sparsity allocation


def block_importance(block_input: torch.Tensor, block_output: torch.Tensor) -> float:
    """1 - the mean cosine similarity of each token's residual stream before and after the block."""
    cos = torch.nn.functional.cosine_similarity(block_input.flatten(0, -2).double(), block_output.flatten(0, -2).double(), dim=-1)
    return float(1 - cos.mean())


def allocate_sparsity(importance: torch.Tensor, target: float, smoothing: float = 0.15, cap: float = 0.8) -> torch.Tensor:
    """Per-block sparsity with mean ``target``: ``L * target * softmax(-importance / smoothing)``, each
    at most ``cap``; the excess of capped blocks goes to the others in proportion to their weights."""
    count = len(importance)
    if not 0 <= target <= cap:
        raise ValueError(f"ratio: a mean sparsity of {target} cannot be spread with each block at most {cap}")
    weights = torch.softmax(-importance.double() / smoothing, dim=0)
    sparsity = count * target * weights
    capped = torch.zeros(count, dtype=torch.bool)
    while (over := (sparsity > cap + 1e-12) & ~capped).any():
        capped |= over
        free = ~capped
        sparsity[capped] = cap
        sparsity[free] = (count * target - cap * int(capped.sum())) * weights[free] / weights[free].sum()
    return sparsity


# ----------------------------------------------------------------------------------------------
# Type I: MLP by Nystrom approximation


def ridge_leverage_scores(correlation: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
    """``diag(C (C + lambda I)^-1)`` with ``lambda = ridge * mean diag(C)``, in float64."""
    c = correlation.double()
    lam = ridge * c.diagonal().mean()
    eye = torch.eye(len(c), dtype=c.dtype, device=c.device)
    return 1 - lam * torch.cholesky_inverse(torch.linalg.cholesky(c + lam * eye)).diagonal()


def refit_down(down: torch.Tensor, correlation: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The least-squares ``down`` [D, k] for the kept neurons ``index``: ``W_down C[:, S] (C[S, S])^-1``."""
    c = correlation.double()
    kept = c[index][:, index]
    jitter = 1e-10 * kept.diagonal().mean() * torch.eye(len(index), dtype=c.dtype, device=c.device)
    return torch.linalg.solve(kept + jitter, (down.double() @ c[:, index]).T).T


def nystrom_mlp(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, correlation: torch.Tensor, keep: int,
                ridge: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Type I. ``gate``, ``up`` [F, D], ``down`` [D, F] (``nn.Linear`` weights), ``correlation`` the
    ``[F, F]`` sum of ``z z^T`` over calibration tokens, ``z = silu(gate x) * up x``. Returns the kept
    rows of gate and up, the refitted down [D, keep] and the kept neuron indices (ascending)."""
    index = ridge_leverage_scores(correlation, ridge).topk(keep).indices.sort().values
    return gate[index], up[index], refit_down(down, correlation, index).to(down.dtype), index


# ----------------------------------------------------------------------------------------------
# Type II: key-query by CR decomposition, whole rotary pairs, shared within a GQA group


def rotary_pair_scores(query_diag: torch.Tensor, key_diag: torch.Tensor) -> torch.Tensor:
    """CR scores ``[n_kv, d/2]`` of the rotary pairs ``(p, p + d/2)`` from the diagonals of the query
    (``[n_heads, d]``) and key (``[n_kv, d]``) activation correlations, pre-RoPE."""
    n_heads, d = query_diag.shape
    n_kv = len(key_diag)
    per_coordinate = (query_diag.double().view(n_kv, n_heads // n_kv, d) * key_diag.double()[:, None, :]).sum(1)
    return (per_coordinate[:, : d // 2] + per_coordinate[:, d // 2 :]).clamp(min=0).sqrt()


def kept_coordinates(pairs: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[n_kv, 2p]`` coordinates of kept pairs in the half-split layout: the pairs, then their partners."""
    return torch.cat([pairs, pairs + head_dim // 2], dim=1)


def cr_key_query(query: torch.Tensor, key: torch.Tensor, query_diag: torch.Tensor, key_diag: torch.Tensor, keep_pairs: int,
                 query_bias: torch.Tensor | None = None, key_bias: torch.Tensor | None = None):
    """Type II. ``query`` [n_heads * d, D] and ``key`` [n_kv * d, D] weights. Returns the new query and
    key weights ``[heads * 2 * keep_pairs, D]`` (and biases), and the kept pair indices ``[n_kv,
    keep_pairs]`` (ascending): the rotary frequencies each kept pair must keep using."""
    n_heads, d = query_diag.shape
    n_kv = len(key_diag)
    pairs = rotary_pair_scores(query_diag, key_diag).topk(keep_pairs, dim=1).indices.sort(dim=1).values
    coords = kept_coordinates(pairs, d)  # [n_kv, 2p]
    group = n_heads // n_kv

    def take(weight: torch.Tensor, heads_per_kv: int) -> torch.Tensor:
        shaped = weight.reshape(n_kv, heads_per_kv, d, *weight.shape[1:])
        index = coords[:, None, :].expand(n_kv, heads_per_kv, coords.shape[1])
        if weight.dim() == 2:
            index = index[..., None].expand(*index.shape, weight.shape[1])
        return shaped.gather(2, index).reshape(-1, *weight.shape[1:])

    new_query, new_key = take(query, group), take(key, 1)
    new_query_bias = take(query_bias, group) if query_bias is not None else None
    new_key_bias = take(key_bias, 1) if key_bias is not None else None
    return new_query, new_key, new_query_bias, new_key_bias, pairs


# ----------------------------------------------------------------------------------------------
# Type III: value-output by whitened SVD, joint over a GQA group's output heads


def correlation_root(correlation: torch.Tensor) -> torch.Tensor:
    """``C^{1/2}`` of a symmetric positive semi-definite correlation, in float64."""
    values, vectors = torch.linalg.eigh(correlation.double())
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def whitened_value_output(value: torch.Tensor, output: torch.Tensor, correlation: torch.Tensor, n_heads: int, n_kv: int, keep: int,
                          value_bias: torch.Tensor | None = None):
    """Type III. ``value`` [n_kv * d, D], ``output`` [D, n_heads * d] (``nn.Linear`` weights),
    ``correlation`` ``C_x`` [D, D] of the attention's (normalised) inputs. Per KV head j with query
    heads h of its group: the top-``keep`` left singular vectors ``U_k`` of ``C^{1/2} W_V,j [W_O,h ..]``,
    then ``W_V,j <- W_V,j B`` with ``B = (C^{1/2} W_V,j)^+ U_k`` and ``W_O,h <- U_k^T C^{1/2} W_V,j W_O,h``.
    Returns the new value weight [n_kv * keep, D], output weight [D, n_heads * keep] and value bias."""
    d = value.shape[0] // n_kv
    group = n_heads // n_kv
    root = correlation_root(correlation)
    new_values, new_outputs, new_biases = [], [], []
    for j in range(n_kv):
        value_j = value[j * d : (j + 1) * d].double().T  # [D, d]: x @ value_j is head j's value
        whitened = root @ value_j  # [D, d]
        outputs = [output[:, h * d : (h + 1) * d].double().T for h in range(j * group, (j + 1) * group)]  # each [d, D]
        left, _, _ = torch.linalg.svd(whitened @ torch.cat(outputs, dim=1), full_matrices=False)
        basis = left[:, :keep]  # [D, k]
        projection = torch.linalg.pinv(whitened) @ basis  # [d, k]
        new_values.append((value_j @ projection).T)  # [k, D]
        new_outputs += [(basis.T @ whitened @ out).T for out in outputs]  # each [D, k]
        if value_bias is not None:
            new_biases.append(projection.T @ value_bias[j * d : (j + 1) * d].double())
    new_bias = torch.cat(new_biases).to(value_bias.dtype) if value_bias is not None else None
    return torch.cat(new_values).to(value.dtype), torch.cat(new_outputs, dim=1).to(output.dtype), new_bias
