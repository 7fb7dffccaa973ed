"""The key/value cache under the name the installed transformers uses.

transformers 5.24 renamed the forward argument and output field `past_key_values` to `cache`
(the old name still works there, with a deprecation warning, until 5.40). realign supports
transformers >= 5.0, so it asks the model which name it takes instead of assuming either.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

NEW, OLD = "cache", "past_key_values"


@lru_cache(maxsize=None)
def _name_for(forward_owner: type) -> str:
    params = inspect.signature(forward_owner.forward).parameters
    if NEW in params:
        return NEW
    if OLD in params:
        return OLD
    # a forward that takes only **kwargs: the library's own name decides
    import transformers
    from packaging.version import Version

    return NEW if Version(transformers.__version__) >= Version("5.24.0.dev0") else OLD


def cache_argument(model) -> str:
    """The keyword `model.forward` / `model.generate` take a key/value cache under."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel forwards **kwargs
    return _name_for(type(inner))
