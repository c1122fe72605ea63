"""The step contract: per-run state lives in the run, not on the recipe object, and the teacher is
computed once per run however many steps ask for it."""

from dataclasses import dataclass

from transformers import AutoTokenizer

import compressor.context
from compressor import Recipe
from compressor.model import ModelHandle
from compressor.pipeline import Session
from compressor.step import Step


def run(path, recipe):
    session = Session(ModelHandle.open(path), recipe, AutoTokenizer.from_pretrained(path), progress=False, batch_size=4)
    session.run()
    return session


def test_each_step_has_its_own_state_for_the_run_and_the_recipe_keeps_none(tiny_llama, registered, calibration_file):
    seen = []

    @registered("count_blocks")
    @dataclass
    class CountBlocks(Step):
        """Test step: counts the blocks it saw in its run state."""

        needs_calibration = False

        def compress_block(self, context):
            context.state["blocks"] = context.state.get("blocks", 0) + 1
            seen.append((id(self), context.state["blocks"]))

    recipe = Recipe.from_dict({"steps": ["count_blocks", "count_blocks"]})
    first, second = recipe.steps
    blocks = len(ModelHandle.open(tiny_llama).blocks)
    session = run(tiny_llama, recipe)
    assert [count for owner, count in seen if owner == id(first)] == list(range(1, blocks + 1))
    assert [count for owner, count in seen if owner == id(second)] == list(range(1, blocks + 1))
    assert vars(first) == vars(second) == {}  # nothing was kept on the recipe's step objects
    assert session.run_state.state_of(first) == {"blocks": blocks}
    assert run(tiny_llama, recipe).run_state.state_of(first) == {"blocks": blocks}  # a new run starts afresh


def test_the_teacher_is_computed_once_per_run(tiny_llama, calibration_file, monkeypatch):
    calls = []
    real = compressor.context.teacher_top_k
    monkeypatch.setattr(compressor.context, "teacher_top_k", lambda *args: calls.append(args[5]) or real(*args))
    e2e = {"efficientqat_e2e_qp": {"epochs": 1, "batch_size": 2, "micro_batch_size": 2, "top_k": 8, "heldout": 0.0}}
    recipe = Recipe.from_dict(
        {
            "calibration": {"dataset": calibration_file, "samples": 4, "seq_len": 16, "seed": 0},
            "steps": [{"rtn": {"bits": 4, "group_size": 32}}, e2e, e2e],
        }
    )
    run(tiny_llama, recipe)
    assert calls == [8]
