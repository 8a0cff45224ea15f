"""The public surface: an explicit, sorted __all__ whose names all resolve, imported lazily."""

import subprocess
import sys

import resilient_tune


def test_all_is_sorted_and_resolves():
    assert resilient_tune.__all__ == sorted(resilient_tune.__all__)
    for name in resilient_tune.__all__:
        assert getattr(resilient_tune, name) is not None, name


def test_unknown_attribute_is_an_attribute_error():
    try:
        resilient_tune.nope  # noqa: B018
    except AttributeError as exc:
        assert "nope" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_import_is_light():
    code = "import sys, resilient_tune; print(sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "[]"


def test_the_callbacks_take_the_sessions_arguments():
    """The callbacks spell out the session's arguments (LightningCLI reads their signatures): the same names, defaults
    and order, so that they cannot drift apart (the Hugging Face callback adds ``probe_loss``; the session adds the
    two arguments of the probe batching it does itself in a custom loop)."""
    import inspect

    from resilient_tune.integrations import lightning, pytorch_lightning, transformers
    from resilient_tune.session import Cocktail

    def params(cls, drop=()):
        return [
            (p.name, p.default, p.kind)
            for p in inspect.signature(cls.__init__).parameters.values()
            if p.name not in ("self", *drop)
        ]

    session = params(Cocktail, drop=("batch_size", "collate_fn"))
    assert params(transformers.CocktailCallback, drop=("probe_loss",)) == session
    assert params(lightning.CocktailCallback) == session
    assert params(pytorch_lightning.CocktailCallback) == session
