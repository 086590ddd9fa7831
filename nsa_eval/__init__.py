"""nsa-eval: evaluation harness for Native Sparse Attention and full-attention language models.

In a checkout, the subpackages `nsa_eval.kernels`, `nsa_eval.tasks` and `nsa_eval.model_adapters` are the folders
kernels/, tasks/ and model_adapters/ beside this one (DESIGN.md, "Layout"); an installed wheel has them inside this
folder (pyproject.toml's package-dir). Those folders have no __init__.py, so from the repository root `import kernels`
still finds an installed package of that name (transformers imports Hugging Face's `kernels`): a folder without
__init__.py loses to a regular package anywhere on sys.path.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

_checkout = _Path(__file__).resolve().parent.parent
if not _Path(__file__).with_name("kernels").is_dir() and (_checkout / "kernels" / "utils.py").is_file():
    __path__.append(str(_checkout))  # a checkout: find kernels/, tasks/, model_adapters/ beside nsa_eval/
