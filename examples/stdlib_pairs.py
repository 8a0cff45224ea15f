"""Moved into the package: ``resilient_tune.demo.data`` (standard-library docstring pairs, offline everywhere).

Kept so that older scripts importing ``stdlib_pairs`` keep working; new code should import from the package.
"""

from resilient_tune.demo.data import DemoData, Doc, Pairs, build_pairs, demo_data, fingerprint, stdlib_docs

__all__ = ["DemoData", "Doc", "Pairs", "build_pairs", "demo_data", "fingerprint", "stdlib_docs"]
