"""The session: block inputs, sequential propagation, model steps, pass grouping."""

from dataclasses import dataclass

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compressor import Recipe, apply
from compressor.context import matches_any
from compressor.export import load_quantized_model
from compressor.model import ModelHandle
from compressor.pipeline import Session, step_passes
from compressor.step import Step, param


def test_captured_block_inputs_equal_the_models_hidden_states(tiny_models, registered, calibration_file):
    """A calibrating layer step that changes nothing must see exactly the model's hidden states."""
    seen = {}

    @registered("record_inputs")
    @dataclass
    class RecordInputs(Step):
        """Test step: remembers the inputs of every block."""

        def compress_block(self, context):
            seen[context.index] = torch.cat(context.inputs)

    source = tiny_models["qwen3"]
    recipe = Recipe.from_dict(
        {"calibration": {"dataset": calibration_file, "samples": 3, "seq_len": 16}, "steps": ["record_inputs"]}
    )
    handle = ModelHandle.open(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    session = Session(handle, recipe, tokenizer, batch_size=2, progress=False)
    session.run()
    tokens = session.calibration_tokens()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    hidden = model(tokens, output_hidden_states=True).hidden_states
    assert sorted(seen) == [0, 1]
    for index in (0, 1):
        assert torch.allclose(seen[index], hidden[index], atol=1e-5), index


def test_inputs_come_from_the_compressed_blocks_before(tiny_llama, registered, calibration_file):
    """Block 1's inputs are block 0's outputs *after* block 0 was quantized."""
    seen = {}

    @registered("record_after_rtn")
    @dataclass
    class Record(Step):
        """Test step."""

        def compress_block(self, context):
            seen[context.index] = torch.cat(context.inputs)

    recipe = Recipe.from_dict(
        {
            "calibration": {"dataset": calibration_file, "samples": 2, "seq_len": 16},
            "steps": [{"rtn": {"bits": 2, "group_size": 32}}, "record_after_rtn"],
        }
    )
    handle = ModelHandle.open(tiny_llama)
    session = Session(handle, recipe, AutoTokenizer.from_pretrained(tiny_llama), progress=False)
    session.run()
    quantized_block0 = handle.blocks[0]
    kwargs = session.capture_block_inputs()[1][0]  # block 0's, batch 0
    expected = torch.cat(session.run_block(quantized_block0, [seen[0][:1], seen[0][1:]], [kwargs[0], kwargs[0]]))
    assert torch.allclose(seen[1], expected, atol=1e-5)


def test_model_step_sees_the_whole_compressed_model(tiny_llama, registered, tmp_path):
    @registered("scale_lm_head")
    @dataclass
    class ScaleHead(Step):
        """Test model step: scales the LM head, so its effect on the export is checkable."""

        factor: float = param(2.0, "factor")
        kind = "model"

        def compress_model(self, context):
            assert all(not p.is_meta for p in context.model.parameters())
            context.model.lm_head.weight.data *= self.factor
            context.record("lm_head", factor=self.factor)

    recipe = Recipe.from_dict({"steps": [{"rtn": {"bits": 8, "group_size": 32}}, {"scale_lm_head": {"factor": 0.5}}]})
    report = apply(recipe, tiny_llama, tmp_path / "out", progress=False)
    assert [p["kind"] for p in report.passes] == ["layer", "model"]
    exported = load_quantized_model(tmp_path / "out")
    original = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    assert torch.allclose(exported.lm_head.weight, original.lm_head.weight * 0.5)
    assert type(exported.model.layers[0].mlp.down_proj).__name__ == "QuantizedLinear"


def test_step_passes_group_consecutive_layer_steps():
    layer, model = Step(), Step()
    model.kind = "model"
    assert [(k, len(s)) for k, s in step_passes([layer, layer, model, layer])] == [
        ("layer", 2),
        ("model", 1),
        ("layer", 1),
    ]


@pytest.mark.parametrize(
    "name, patterns, expected",
    [
        ("lm_head", ["lm_head"], True),
        ("model.layers.0.self_attn.q_proj", ["q_proj"], True),
        ("model.layers.0.self_attn.q_proj", ["*.layers.0.*"], True),
        ("model.layers.10.self_attn.q_proj", ["*.layers.1.*"], False),
        ("model.layers.3.mlp.down_proj", ["re:layers\\.[0-3]\\.mlp"], True),
        ("model.layers.3.mlp.down_proj", ["re:self_attn"], False),
    ],
)
def test_ignore_patterns(name, patterns, expected):
    assert matches_any(name, patterns) is expected


def test_ignore_keeps_layers_dense(tiny_llama, tmp_path):
    recipe = Recipe.from_dict(
        {"steps": [{"rtn": {"bits": 4, "group_size": 32, "ignore": ["lm_head", "*.layers.1.*"]}}]}
    )
    report = apply(recipe, tiny_llama, tmp_path / "out", progress=False)
    assert {row["block"] for row in report.rows} == {0}
    model = load_quantized_model(tmp_path / "out")
    assert type(model.model.layers[1].mlp.up_proj).__name__ == "Linear"


def test_data_free_pass_then_calibrating_pass_on_a_bf16_model(tmp_path, registered, calibration_file):
    """RTN keeps bf16 blocks as stored; a later calibrating pass must still run them in fp32 on CPU."""
    from compressor.testing import make_random_model

    seen = []

    @registered("record_dtype")
    @dataclass
    class RecordDtype(Step):
        """Test step."""

        def compress_block(self, context):
            out = context.forward()
            seen.append((context.inputs[0].dtype, out[0].dtype))

    @registered("model_noop")
    @dataclass
    class ModelNoop(Step):
        """Test model step that forces the RTN pass to keep its blocks."""

        kind = "model"

        def compress_model(self, context):
            pass

    source = make_random_model("llama", tmp_path / "bf16", dtype=torch.bfloat16)
    recipe = Recipe.from_dict(
        {
            "calibration": {"dataset": calibration_file, "samples": 2, "seq_len": 16},
            "steps": [{"rtn": {"bits": 4, "group_size": 32}}, "model_noop", "record_dtype"],
        }
    )
    apply(recipe, source, tmp_path / "out", progress=False)
    assert seen == [(torch.float32, torch.float32)] * 2


def test_a_compressed_blocks_original_weights_are_released_during_the_run(tiny_llama, tmp_path, monkeypatch):
    """Once a block is compressed and written, nothing keeps its original linears (and the weights
    loaded into them) alive: a run's memory stays at about one block, not the whole model. (The
    session's pre-run checks once kept a table of every skeleton linear alive for the whole run.)"""
    import gc
    import weakref

    from compressor.quant.rtn import RTN

    originals, alive_later = {}, []
    compress = RTN.compress_block

    def watching(self, context):
        originals[context.index] = [weakref.ref(m) for m in context.linears([]).values()]
        compress(self, context)
        if context.index >= 1:
            gc.collect()
            earlier = [ref() for refs in list(originals.values())[: context.index] for ref in refs]
            alive_later.append(sum(1 for m in earlier if m is not None and m.weight.device.type != "meta"))

    monkeypatch.setattr(RTN, "compress_block", watching)
    apply(
        Recipe.from_dict({"steps": [{"rtn": {"bits": 4, "group_size": 32}}]}),
        tiny_llama,
        tmp_path / "out",
        progress=False,
    )
    assert len(alive_later) >= 1 and alive_later == [0] * len(alive_later), alive_later


@pytest.mark.parametrize(
    "steps, expected",
    [
        (
            ["rtn", {"rtn": {"bits": 8}}],
            r"steps\[1\]\.rtn: model\.layers\.0\.\S+ is quantized by steps\[0\]\.rtn already",
        ),
        (["rtn", "qllm"], r"steps\[1\]\.qllm: model\.layers\.0\.\S+ is quantized by steps\[0\]\.rtn already"),
        (["rtn", "transmla"], r"steps\[1\]\.transmla: changes the architecture, so it comes before steps\[0\]\.rtn"),
        (["rtn", "swiftkv"], r"steps\[1\]\.swiftkv: changes the architecture, so it comes before steps\[0\]\.rtn"),
        (["transmla", "transmla"], r"steps\[1\]\.transmla: steps\[0\]\.transmla changed the architecture already"),
        (
            [{"bfp": {"k_bits": 4, "ksort": "weight_norm", "block_size": 16}}, {"rtn": {"group_size": 32}}],
            r"steps\[1\]\.rtn: its weights go to compressed-tensors, which cannot hold steps\[0\]\.bfp's quantized KV",
        ),
    ],
)
def test_step_order_rules_refuse_before_any_work(steps, expected, tiny_llama, tmp_path):
    """What a later step would silently skip or crash on after minutes is one line before the model loads."""
    from compressor.errors import UserError

    recipe = Recipe.from_dict({"calibration": {"samples": 2, "seq_len": 16}, "steps": steps})
    with pytest.raises(UserError, match=expected):
        apply(recipe, tiny_llama, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_quantizers_with_complementary_ignores_compose(tiny_llama, tmp_path):
    steps = [
        {"rtn": {"bits": 8, "ignore": ["re:mlp", "lm_head"]}},
        {"rtn": {"bits": 4, "ignore": ["re:self_attn", "lm_head"]}},
    ]
    apply(Recipe.from_dict({"steps": steps}), tiny_llama, tmp_path / "out", progress=False)
