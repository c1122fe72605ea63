"""The generic adapter: a decoder with no row in ``ADAPTERS``, read from its module tree and checked by a probe.

``derive_adapter(model)`` proposes an ``ArchAdapter`` from the names alone (the blocks are the base model's
``ModuleList`` of ``num_hidden_layers`` modules; the projections are Llama's ``q/k/v/o_proj`` and
``gate/up/down_proj`` under the block's attention and MLP children; the embedding and LM head are what the
model says they are), then runs one block of the real class (random weights, the real config) on a tiny
input with hooks on every module of the block, and accepts the proposal only when the probe confirms
everything the steps rely on:

* q, k and v read one same tensor, and so do gate and up: the output of one norm of the block (a norm
  ->linear group, what GPTQ takes Hessians of together and QLLM reassembles), or the residual stream
  itself (a tensor no module of the block produced: the block's input, or the sum after attention);
* the attention's output is o_proj's output and the MLP's is down_proj's (QLLM runs them with o_proj and
  down_proj set aside), and down_proj reads ``act(gate) * up``;
* the shapes are the config's attention geometry (q: heads x head_dim, k and v: KV heads x head_dim, o back);
* the attention hands its keys and values to the cache (what the KV-cache methods quantize);
* nothing happens to the logits after the LM head that the config would say (soft-capping, scales).

Otherwise it refuses in one line: what it found and what did not match. Structural steps never run on a
generic family (their declared families are rows of the table); layer-step quantizers do.
``adapter_of(model, config)`` is the one entry: the table's row, else this.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from compressor.arch import LLAMA_LINEARS, ArchAdapter, UnsupportedArchitecture, adapter_for, attention_geometry

LOGIT_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "logit_softcapping", "output_multiplier")


def adapter_of(model: nn.Module, config) -> ArchAdapter:
    """The adapter of ``model``: its family's row in ``ADAPTERS``, else the generic one if the probe confirms
    it; else one line saying what the table lacks and what the probe found."""
    try:
        return adapter_for(config)
    except UnsupportedArchitecture as refused:
        try:
            return derive_adapter(model, config)
        except UnsupportedArchitecture as error:
            raise UnsupportedArchitecture(f"{refused}; the generic adapter cannot prove it: {error}") from None


def module_path(model: nn.Module, module: nn.Module) -> str | None:
    return next((name for name, m in model.named_modules() if m is module), None)


def find_blocks(model: nn.Module, config) -> str | None:
    """The path of the ``ModuleList`` holding the decoder blocks (``num_hidden_layers`` of them)."""
    count = getattr(config, "num_hidden_layers", None)
    lists = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    return lists[0] if len(lists) == 1 else None


def derive_adapter(model: nn.Module, config) -> ArchAdapter:
    """The adapter of ``model`` (a transformers causal LM, parameters anywhere) from names, confirmed by
    ``probe``; ``UnsupportedArchitecture`` in one line when anything does not match."""
    model_type = getattr(config, "model_type", "?")
    found, problems = [], []
    blocks = find_blocks(model, config)
    if blocks is None:
        raise UnsupportedArchitecture(f"no single list of {getattr(config, 'num_hidden_layers', '?')} decoder blocks")
    block = model.get_submodule(f"{blocks}.0")
    linears = [name for name, m in block.named_modules() if isinstance(m, nn.Linear)]
    by_leaf = {name.rsplit(".", 1)[-1]: name for name in linears}
    roles = {role: by_leaf.get(path.rsplit(".", 1)[-1]) for role, path in LLAMA_LINEARS.items()}
    missing = [LLAMA_LINEARS[role].rsplit(".", 1)[-1] for role, path in roles.items() if path is None]
    extra = [name for name in linears if name not in roles.values()]
    found.append(f"block {blocks}.0 with linears {', '.join(linears) or 'none'}")
    if missing:
        problems.append(f"no {', '.join(missing)}")
    if extra:
        problems.append(f"linears with no role: {', '.join(extra)}")
    logit_keys = [k for k in LOGIT_KEYS if getattr(config, k, None) not in (None, 1, 1.0)]
    if logit_keys:
        problems.append(f"the logits are changed after the LM head ({', '.join(logit_keys)})")
    attention = mlp = None
    if not missing:
        attention = roles["q"].rpartition(".")[0]
        mlp = roles["down"].rpartition(".")[0]
        if not attention or any(roles[r].rpartition(".")[0] != attention for r in ("k", "v", "o")):
            problems.append("q/k/v/o_proj are not children of one attention module")
        if not mlp or any(roles[r].rpartition(".")[0] != mlp for r in ("gate", "up")):
            problems.append("gate/up/down_proj are not children of one MLP module")
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embed is None or head is None:
        problems.append("no input embedding or no LM head")
    base = blocks.rpartition(".")[0]
    norms = [
        f"{base}.{name}" if base else name
        for name, m in model.get_submodule(base).named_children()
        if "norm" in type(m).__name__.lower()
    ]
    if len(norms) != 1:
        problems.append(f"{len(norms)} norms beside the blocks (one final norm expected)")
    if problems:
        raise UnsupportedArchitecture(f"found {'; '.join(found)}; {'; '.join(problems)}")
    proposal = ArchAdapter(
        family=model_type,
        model_types=(model_type,),
        blocks=blocks,
        embed_tokens=module_path(model, embed),
        final_norm=norms[0],
        lm_head=module_path(model, head),
        linears=roles,
        norms={},
        norm_inputs={},
        attention=attention,
        mlp=mlp,
        generic=True,
    )
    return probe(model, config, proposal)


class _Probe:
    """Hooks on every module of a block: each module's output (by identity) and what each linear read."""

    def __init__(self, block: nn.Module):
        self.outputs: dict[int, str] = {}  # id of an output tensor -> the module that produced it
        self.output_of: dict[str, torch.Tensor] = {}
        self.read: dict[str, torch.Tensor] = {}
        self.kept: list[torch.Tensor] = []  # every output stays alive, so no id is reused during the probe
        self.hooks = []
        for name, module in block.named_modules():
            self.hooks.append(module.register_forward_hook(self.keep_output(name)))
            if isinstance(module, nn.Linear):
                self.hooks.append(module.register_forward_pre_hook(self.keep_input(name)))

    def keep_output(self, name):
        def hook(module, args, output):
            tensor = output[0] if isinstance(output, tuple) else output
            if isinstance(tensor, torch.Tensor):
                self.kept.append(tensor)
                self.outputs.setdefault(id(tensor), name)
                self.output_of[name] = tensor

        return hook

    def keep_input(self, name):
        def hook(module, args):
            self.read[name] = args[0]

        return hook

    def remove(self):
        for hook in self.hooks:
            hook.remove()


@torch.no_grad()
def probe(model: nn.Module, config, proposal: ArchAdapter) -> ArchAdapter:
    """Run one block of ``model``'s class (random weights, the real config) on a tiny input and keep
    ``proposal`` only if what the hooks saw confirms it; the confirmed adapter carries the norm -> linear
    groups the probe found."""
    from compressor.arch.blocks import catch_block_inputs, first_output

    geometry = attention_geometry(config)
    blocks = model.get_submodule(proposal.blocks)
    torch.manual_seed(0)
    try:
        block = type(blocks[0])(config, 0).float().eval()  # real initialisation, on the CPU
    except Exception as error:
        raise UnsupportedArchitecture(
            f"its block class {type(blocks[0]).__name__} is not built as Block(config, layer_idx) ({error})"
        ) from None
    base = model.get_submodule(proposal.blocks.rpartition(".")[0])
    hidden = torch.randn(1, 8, config.hidden_size)
    caught = {}

    class Embeds(nn.Module):  # hand the base model our hidden states instead of embedding tokens
        def forward(self, input_ids):
            return hidden

    embed_path = proposal.embed_tokens.removeprefix(f"{proposal.blocks.rpartition('.')[0]}.")
    embedding = base.get_submodule(embed_path)
    base.set_submodule(embed_path, Embeds())
    try:
        _, kwargs = catch_block_inputs(base, blocks, torch.zeros(1, 8, dtype=torch.long))
        caught = kwargs[0]
    except Exception as error:  # any failure of the model's own code is a refusal, in one line
        raise UnsupportedArchitecture(
            f"the model did not run up to its blocks ({type(error).__name__}: {' '.join(str(error).split())[:200]})"
        ) from None
    finally:
        base.set_submodule(embed_path, embedding)

    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    recorder = _Probe(block)
    try:
        name = "cache" if "cache" in caught or "past_key_values" not in caught else "past_key_values"
        output = first_output(block(hidden, **{**caught, name: cache, "use_cache": True}))
    except Exception as error:
        raise UnsupportedArchitecture(
            f"the probe forward failed ({type(error).__name__}: {' '.join(str(error).split())[:200]})"
        ) from None
    finally:
        recorder.remove()

    roles = proposal.linears
    problems, norms, norm_inputs, raw_inputs = [], {}, {}, []
    for group in (("q", "k", "v"), ("gate", "up")):
        read = [recorder.read.get(roles[r]) for r in group]
        if any(x is None for x in read):
            problems.append(f"{'/'.join(group)} did not all run")
            continue
        if any(x is not read[0] for x in read[1:]):
            problems.append(f"{'/'.join(group)} read different tensors")
            continue
        source = recorder.outputs.get(id(read[0]))
        if source is None:  # no module made it: the residual stream (the block's input, or a sum inside it)
            raw_inputs.append(group)
        elif "norm" in type(block.get_submodule(source)).__name__.lower():
            role = source.removesuffix("_layernorm").removesuffix("layernorm").removesuffix("_norm") or source
            norms[role] = source
            norm_inputs[role] = norm_inputs.get(role, ()) + group
        else:
            problems.append(f"{'/'.join(group)} read the output of {source}, neither a norm nor the residual stream")
    attention_out = recorder.output_of.get(proposal.attention)
    if attention_out is None or attention_out is not recorder.output_of.get(roles["o"]):
        problems.append(f"{proposal.attention}'s output is not o_proj's")
    mlp_module = block.get_submodule(proposal.mlp)
    if recorder.output_of.get(proposal.mlp) is not recorder.output_of.get(roles["down"]):
        problems.append(f"{proposal.mlp}'s output is not down_proj's")
    act = getattr(mlp_module, "act_fn", None)
    gate, up = recorder.output_of.get(roles["gate"]), recorder.output_of.get(roles["up"])
    down_in = recorder.read.get(roles["down"])
    if act is None or gate is None or down_in is None or not torch.allclose(act(gate) * up, down_in, atol=1e-6):
        problems.append(f"{roles['down']} does not read act_fn(gate_proj) * up_proj")
    shapes = {
        "q": (geometry.num_heads * geometry.head_dim, config.hidden_size),
        "k": (geometry.num_kv_heads * geometry.head_dim, config.hidden_size),
        "v": (geometry.num_kv_heads * geometry.head_dim, config.hidden_size),
        "o": (config.hidden_size, geometry.num_heads * geometry.head_dim),
    }
    for role, shape in shapes.items():
        weight = block.get_submodule(roles[role]).weight
        if tuple(weight.shape) != shape:
            problems.append(f"{roles[role]} is {tuple(weight.shape)}, the config's geometry says {shape}")
    if cache.get_seq_length() != hidden.shape[1]:
        problems.append("the attention did not hand its keys and values to the cache")
    if not torch.isfinite(output).all() or output.shape != hidden.shape:
        problems.append("the block's output is not a finite hidden state")
    if problems:
        raise UnsupportedArchitecture(
            f"found {proposal.blocks}.0 with {', '.join(proposal.linears.values())}; the probe did not confirm: "
            f"{'; '.join(problems)}"
        )
    qk = {r: f"{proposal.attention}.{r}_norm" for r in ("q", "k")}
    qk_norms = qk if all(path in dict(block.named_modules()) for path in qk.values()) else {}
    return dataclasses.replace(
        proposal,
        norms=norms,
        norm_inputs=norm_inputs,
        raw_inputs=tuple(raw_inputs),
        qk_norms=qk_norms,
        differs=("no hand-written adapter: read through the generic one, confirmed by a probe",),
    )
