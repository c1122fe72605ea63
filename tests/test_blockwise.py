"""Model steps run the model block by block; their gradients must be those of plain autograd."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import AutoModelForCausalLM

from compressor import Recipe, apply
from compressor.blockwise import BlockwiseModel, next_token_loss
from compressor.model import ModelHandle
from compressor.step import Step


def materialized(path):
    handle = ModelHandle.open(path)
    handle.materialize_all("cpu", torch.float32)
    return handle


def tokens(vocab: int, batch: int = 2, seq: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("offloaded", [False, True])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_blockwise_gradients_equal_plain_autograd(tiny_models, arch, offloaded):
    reference = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32)
    handle = materialized(tiny_models[arch])
    ids = tokens(reference.config.vocab_size)
    trainable = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"]
    for model in (reference, handle.model):
        model.requires_grad_(False)
        for name in trainable:
            model.get_parameter(name).requires_grad_(True)

    expected_loss = reference(input_ids=ids, labels=ids).loss
    expected_loss.backward()
    runner = BlockwiseModel(handle, "cpu", offloaded=offloaded)
    loss = runner.forward_backward(ids)

    assert loss == pytest.approx(expected_loss.item(), rel=1e-5)
    for name in trainable:
        torch.testing.assert_close(
            handle.model.get_parameter(name).grad, reference.get_parameter(name).grad, rtol=1e-4, atol=1e-6
        )
    torch.testing.assert_close(runner.logits(ids), reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_gradients_accumulate_and_reach_the_embedding(tiny_llama):
    handle = materialized(tiny_llama)
    embedding = handle.model.model.embed_tokens.weight
    embedding.requires_grad_(True)
    ids = tokens(handle.config.vocab_size, batch=1)
    runner = BlockwiseModel(handle, "cpu")
    runner.forward_backward(ids)
    once = embedding.grad.clone()
    assert once.abs().sum() > 0
    runner.forward_backward(ids)
    torch.testing.assert_close(embedding.grad, 2 * once)


def test_custom_loss_and_hooks_fire_once_per_call(tiny_llama):
    handle = materialized(tiny_llama)
    weight = handle.model.model.layers[1].self_attn.v_proj.weight
    weight.requires_grad_(True)
    fired = []
    weight.register_post_accumulate_grad_hook(lambda p: fired.append(p.grad.clone()))
    ids = tokens(handle.config.vocab_size)
    runner = BlockwiseModel(handle, "cpu")
    runner.forward_backward(ids, loss_fn=lambda logits, ids: 3 * next_token_loss(logits, ids))
    assert len(fired) == 1
    weight.grad = None
    runner.forward_backward(ids)
    torch.testing.assert_close(fired[0], 3 * weight.grad)


def test_offloaded_runs_hold_one_block_on_the_device_at_a_time(tiny_llama):
    handle = materialized(tiny_llama)
    handle.model.model.layers[1].mlp.up_proj.weight.requires_grad_(True)
    runner = BlockwiseModel(handle, "cpu", offloaded=True)
    calls = []
    for index, block in enumerate(runner.blocks):
        block.register_forward_hook(
            lambda module, args, output, index=index: calls.append((index, set(runner.on_device)))
        )
    runner.forward_backward(tokens(handle.config.vocab_size))
    # forward over both blocks, then recomputation of block 1 only: block 0 has nothing to train
    assert [index for index, _ in calls] == [0, 1, 1]
    assert all(resident == {index} for index, resident in calls)


def test_model_step_in_a_recipe_gets_gradients(tiny_llama, registered, tmp_path):
    seen = {}

    @registered("grad_probe")
    @dataclass
    class GradProbe(Step):
        """Test model step: one backward pass; records the gradient norm of every block weight."""

        kind = "model"

        def compress_model(self, context):
            weights = {name: p for name, p in context.model.named_parameters() if name.endswith("proj.weight")}
            for p in weights.values():
                p.requires_grad_(True)
            seen["loss"] = context.forward_backward(context.calibration_tokens()[:2])
            seen["offloaded"] = context.offloaded
            seen["norms"] = [p.grad.norm().item() for p in weights.values()]
            for p in weights.values():
                p.requires_grad_(False)
                p.grad = None

    text = tmp_path / "calibration.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    recipe = Recipe.from_dict(
        {"calibration": {"dataset": str(text), "samples": 4, "seq_len": 32}, "steps": [{"grad_probe": {}}]}
    )
    apply(recipe, tiny_llama, tmp_path / "out", progress=False, offload=True)
    assert seen["offloaded"] is True
    assert seen["loss"] > 0 and all(norm > 0 for norm in seen["norms"])
