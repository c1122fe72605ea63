"""compressor: recipe-driven compression of large language models.

    from compressor import Recipe, apply
    report = apply(Recipe.from_yaml("recipes/rtn-w4.yaml"), "demo", output="out/demo-w4")

Importing the package is light (no torch): ``apply`` loads the toolkit on first use, and our native
checkpoint format is registered with transformers when transformers loads (``transformers_hook.py``).
"""

from compressor.recipe import Recipe, RecipeError, register_step  # noqa: E402
from compressor.transformers_hook import register_with_transformers  # noqa: E402
from compressor.version import __version__  # noqa: E402,F401

register_with_transformers()

__all__ = ["Recipe", "RecipeError", "apply", "register_step", "__version__"]


def __getattr__(name):
    if name == "apply":
        from compressor.api import apply

        return apply
    raise AttributeError(f"module 'compressor' has no attribute {name!r}")
