#!/usr/bin/env python3
"""Build ``demo-moe``, the small mixture-of-experts model shipped beside the demo (``compressor/demo/model-moe``).

The demo's pipeline (``scripts/train_demo.py``: the same Python documentation text, the same document split, so
``compressor/demo/data`` holds its calibration and held-out text too) and the demo's own tokenizer. The model is a
Mixtral: the demo's shape (hidden 256, 6 layers, 8 heads of 32, 2 KV heads, untied embeddings) with each layer's
SwiGLU MLP (width 768) replaced by 6 routed experts of width 128, top-2 routing (softmax, renormalised top-k),
so it has the demo's parameter count plus the routers.

Training a MoE from scratch on two shared CPU cores takes far longer than the demo's half hour, so the experts are
*upcycled* from the trained demo (sparse upcycling, Komatsuzaki et al. 2022, arXiv 2212.05055, with experts cut
from the dense MLP as in MoEfication, Zhang et al. 2022, arXiv 2110.01786): embeddings, attention, norms and head
are the demo's; expert e holds intermediate channels [128 e, 128 (e + 1)) of the demo's gate/up/down projections,
its down projection scaled by 6 (under uniform routing the mixture then averages back to the dense MLP); routers
start at zero (uniform). Then every parameter trains on the demo's training text with the demo's optimiser
(AdamW 0.9/0.95, wd 0.1, warmup and cosine decay) plus transformers' load-balancing loss
(``router_aux_loss_coef`` 0.02), so that every expert is used. Saved in bf16.

    python scripts/train_demo_moe.py --seed 0 --minutes 15     # fits the steps to the budget and prints them
    python scripts/train_demo_moe.py --seed 0 --steps N        # replays a run

Another MoE from another dense model (the unseen-model check, ``benchmarks/results/moe/second-moe.md``): ``--dense``
(its checkpoint and tokenizer), ``--heldout`` (its held-out text), ``--split-seed`` (the split it was trained on) and
``--experts``, e.g. ``--dense /work/second/model --heldout /work/second/data/heldout.txt --split-seed 1 --seed 1
--experts 8 --out /work/second-moe/model``.

Resolvable as model name ``demo-moe`` (``compressor.demo.demo_moe_dir``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_demo import (  # noqa: E402  (the demo's pieces: text, split, batches, schedule, evaluation)
    DEMO,
    Batches,
    encode,
    find_html_root,
    join_docs,
    load_documents,
    lr_at,
    split_documents,
    window_nll,
)


def make_config(dense, experts: int):
    """The demo's config as a Mixtral whose MLPs are ``experts`` experts of ``intermediate / experts`` channels."""
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=dense.vocab_size,
        hidden_size=dense.hidden_size,
        intermediate_size=dense.intermediate_size // experts,
        num_hidden_layers=dense.num_hidden_layers,
        num_attention_heads=dense.num_attention_heads,
        num_key_value_heads=dense.num_key_value_heads,
        head_dim=dense.head_dim,
        num_local_experts=experts,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.02,
        router_jitter_noise=0.0,
        sliding_window=None,
        hidden_act="silu",
        max_position_embeddings=dense.max_position_embeddings,
        rope_parameters=dense.rope_parameters,
        rms_norm_eps=dense.rms_norm_eps,
        tie_word_embeddings=False,
        initializer_range=0.02,
        bos_token_id=dense.bos_token_id,
        eos_token_id=dense.eos_token_id,
        pad_token_id=dense.pad_token_id,
        use_cache=True,
    )


@torch.no_grad()
def upcycle(dense_model, model, experts: int) -> None:
    """Copy everything but the MLPs; cut each dense MLP into ``experts`` experts (see the module docstring)."""
    dense_state = dense_model.state_dict()
    own = model.state_dict()
    for name, tensor in dense_state.items():
        if ".mlp." not in name and name in own:
            own[name].copy_(tensor)
    for index, layer in enumerate(model.model.layers):
        mlp = dense_model.model.layers[index].mlp
        width = mlp.gate_proj.out_features // experts
        for e in range(experts):
            rows = slice(e * width, (e + 1) * width)
            gate_up = torch.cat([mlp.gate_proj.weight[rows], mlp.up_proj.weight[rows]])
            layer.mlp.experts.gate_up_proj[e].copy_(gate_up)
            layer.mlp.experts.down_proj[e].copy_(mlp.down_proj.weight[:, rows] * experts)
        layer.mlp.gate.weight.zero_()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split-seed", type=int, default=0, help="the demo's document split (keep 0)")
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps; 0 = fit them to --minutes")
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--experts", type=int, default=6)
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--final-lr-frac", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-window", type=int, default=512)
    ap.add_argument("--work", default="/tmp/compressor_demo_build", help="scratch folder (the documentation package)")
    ap.add_argument("--out", default=str(DEMO / "model-moe"))
    ap.add_argument("--dense", default=str(DEMO / "model"), help="the dense model to upcycle (and its tokenizer)")
    ap.add_argument("--heldout", default=str(DEMO / "data" / "heldout.txt"), help="held-out text of that model")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, MixtralForCausalLM

    t_start = time.time()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    root, source = find_html_root(Path(args.work))
    train_docs, _, _ = split_documents(load_documents(root), args.split_seed, 220_000, 400_000)
    tokenizer = AutoTokenizer.from_pretrained(args.dense)
    stream = []
    for _, text in train_docs:
        stream.extend(encode(tokenizer, text))
        stream.append(tokenizer.eos_token_id)
    stream = torch.tensor(stream, dtype=torch.long)
    held_ids = encode(tokenizer, Path(args.heldout).read_text(encoding="utf-8"))
    print(f"source: {source}; train tokens {len(stream):,} from {len(join_docs(train_docs)) / 1e6:.1f} MB of text")

    dense = AutoModelForCausalLM.from_pretrained(args.dense, dtype=torch.float32)
    config = make_config(dense.config, args.experts)
    model = MixtralForCausalLM(config)
    upcycle(dense, model, args.experts)
    del dense
    model.eval()
    nll, n, _ = window_nll(model, held_ids, args.eval_window, max_windows=8)
    print(f"upcycled, untrained: held-out ppl (first 8 windows) {math.exp(nll / n):.2f}", flush=True)
    n_params = model.num_parameters()
    print(f"parameters: {n_params:,}")
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    batches = Batches(stream, args.seed)
    model.train()
    t_train = time.time()
    deadline = t_train + args.minutes * 60
    total, step, ema, t_probe = args.steps, 0, None, None
    while total == 0 or step < total:
        if total == 0 and step == 2:
            t_probe = time.time()
        if total == 0 and step == 7:
            per_step = (time.time() - t_probe) / 5
            total = max(args.warmup + 10, step + int((deadline - time.time()) / per_step * 0.92))
            print(f"measured {per_step:.2f} s/step -> total steps {total} (replay with --steps {total})", flush=True)
        x = batches.next(args.batch_tokens // args.seq_len, args.seq_len)
        lr = lr_at(step, max(total, args.warmup + 1), args.lr, args.warmup, args.final_lr_frac)
        for group in opt.param_groups:
            group["lr"] = lr
        output = model(input_ids=x, labels=x, output_router_logits=True)  # loss includes the balancing term
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(output.loss.detach() - config.router_aux_loss_coef * output.aux_loss.detach())
        ema = loss if ema is None else 0.95 * ema + 0.05 * loss
        if step % 5 == 0 or step == total - 1:
            print(
                f"step {step:4d} loss {loss:.4f} ema {ema:.4f} aux {float(output.aux_loss):.3f} lr {lr:.2e} "
                f"elapsed {(time.time() - t_train) / 60:.1f} min",
                flush=True,
            )
        step += 1
        if time.time() > deadline and step < max(total, 1):
            print(f"wall-clock cap of {args.minutes} min reached at step {step}", flush=True)
            break
    train_s = time.time() - t_train

    model.eval()
    model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        do_sample=False,
        max_new_tokens=64,
    )
    for f in out.iterdir():
        if f.is_file():
            f.unlink()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    nll, n, _ = window_nll(reloaded, held_ids, args.eval_window)
    report = {
        "source": source,
        "parameters": n_params,
        "steps": step,
        "tokens_seen": batches.tokens_seen,
        "train_minutes": round(train_s / 60, 2),
        "total_minutes": round((time.time() - t_start) / 60, 2),
        "heldout_tokens_scored": n,
        "heldout_ppl": round(math.exp(nll / n), 3),
        "file_sizes": {f.name: f.stat().st_size for f in sorted(out.iterdir())},
        "args": vars(args),
    }
    (out.parent / f"{out.name}.training.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
