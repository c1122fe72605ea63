"""The llm-compressor side of ``quality.py``: GPTQ, or AWQ then RTN, through its ``oneshot``, saved compressed.

    V/bin/python benchmarks/llmcompressor_worker.py SPEC.json

Runs under llm-compressor's own interpreter (``quality.py --llmcompressor-python V/bin/python``): it pins other
transformers and compressed-tensors versions than ours, so this file imports nothing of ``compressor`` (whose
shipped architectures need our transformers). SPEC names the model, the calibration tokens (a saved tensor),
the output folder, the scheme (bits, group_size, symmetric) and the algorithm (gptq or awq); the last line
printed is JSON with the peak resident memory and the settings used.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from llmcompressor.modifiers.transform import AWQModifier
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(spec_path: str) -> None:
    if not torch.cuda.is_available():
        # llm-compressor 0.14's AWQ pins its cached activations (pipelines/cache.py pin_memory) whether or not an
        # accelerator exists, and torch refuses pinned memory without one: skip the pinning (a transfer speed-up)
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    spec = json.loads(Path(spec_path).read_text())
    tokens = torch.load(spec["calibration"])
    data = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype="auto")  # scales are stored in this dtype
    weights = QuantizationArgs(
        num_bits=spec["bits"], type="int", symmetric=spec["symmetric"], strategy="group", group_size=spec["group_size"]
    )
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    if spec["algorithm"] == "gptq":
        modifier = GPTQModifier(config_groups=groups, ignore=["lm_head"])
        settings = f"actorder {modifier.actorder}"
    else:  # the paper's scales (activations only), then round to nearest
        modifier = [AWQModifier(duo_scaling=False), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
        settings = "duo_scaling false, no clipping"
    oneshot(
        model=model,
        dataset=data,
        recipe=modifier,
        num_calibration_samples=len(tokens),
        max_seq_length=tokens.shape[1],
        shuffle_calibration_samples=False,
    )
    model.save_pretrained(spec["output"], save_compressed=True)
    AutoTokenizer.from_pretrained(spec["model"]).save_pretrained(spec["output"])
    print(
        json.dumps(
            {
                "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                "settings": settings,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
