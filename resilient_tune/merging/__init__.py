"""The merge core: pure functions over ``Mapping[str, Tensor]`` (imports torch and the stdlib only).

Methods are data rows in :data:`METHODS` (see :mod:`resilient_tune.merging._registry` for the table
of methods and options); :func:`merge_tensor` merges one key with any of them and
:func:`merge_state_dicts` merges whole in-memory state dicts. Semantics are documented in
:mod:`resilient_tune.merging._merge` (merge rules), :mod:`resilient_tune.merging._sparsify`
(trim / DARE / breadcrumbs) and :mod:`resilient_tune.merging._depth` (LiNeS depths).
"""

from resilient_tune.merging._combine import SLERP_DOT_THRESHOLD
from resilient_tune.merging._depth import layer_depths
from resilient_tune.merging._merge import (
    OwnedLoader,
    TensorSource,
    check_inputs,
    merge_tensor,
    raise_if_non_finite,
)
from resilient_tune.merging._registry import METHODS, MergeMethod, get_method, method_names, resolve_options
from resilient_tune.merging._sparsify import (
    dare_sparsify,
    magnitude_sparsify,
    outlier_sparsify,
    tensor_generator,
)
from resilient_tune.merging._state_dict import merge_state_dicts
from resilient_tune.merging._validate import check_compatible, validate_weights

__all__ = [
    "METHODS",
    "SLERP_DOT_THRESHOLD",
    "MergeMethod",
    "OwnedLoader",
    "TensorSource",
    "check_compatible",
    "check_inputs",
    "dare_sparsify",
    "get_method",
    "layer_depths",
    "magnitude_sparsify",
    "merge_state_dicts",
    "merge_tensor",
    "method_names",
    "outlier_sparsify",
    "raise_if_non_finite",
    "resolve_options",
    "tensor_generator",
    "validate_weights",
]
