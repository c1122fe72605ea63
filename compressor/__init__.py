"""compressor: recipe-driven compression of large language models.

    from compressor import Recipe, apply
    report = apply(Recipe.from_yaml("recipes/rtn-w4.yaml"), "demo", output="out/demo-w4")
"""

from compressor.version import __version__  # noqa: E402,F401

from compressor.api import apply  # noqa: E402
from compressor.export import hf_quantizer  # noqa: E402,F401  (registers quant_method "compressor" with transformers)
from compressor.recipe import Recipe, RecipeError, register_step  # noqa: E402

__all__ = ["Recipe", "RecipeError", "apply", "register_step", "__version__"]
