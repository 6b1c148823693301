import inspect
import pathlib
import subprocess
import sys

import clipopt

EXPECTED = {
    "Attachment",
    "GradRecorder",
    "GradReport",
    "GradReportRow",
    "StatsHistory",
    "StatsLogger",
    "attach",
    "check_double_clipping",
    "grad_report",
    "log_stats",
    "AGC",
    "AdaGC",
    "Chain",
    "PercentileClip",
    "RelativeClip",
    "ZScoreClip",
    "MIN_TORCH",
    "ClipInputs",
    "ClipResult",
    "ClipStats",
    "ClipStrategy",
    "ClippedOptimizer",
    "Clipper",
    "Handover",
    "Measurement",
    "Scale",
    "ScaleEach",
    "Clamp",
    "SpikeSkip",
    "strategies",
    "NonfinitePolicy",
    "NormClip",
    "ValueClip",
    "__version__",
    "available_strategies",
    "functional",
    "get_strategy",
    "register_strategy",
}
DOCS = pathlib.Path(__file__).parent.parent / "docs"


def test_all_is_pinned():
    assert set(clipopt.__all__) == EXPECTED
    for name in clipopt.__all__:
        assert hasattr(clipopt, name)


def test_every_public_symbol_has_a_docstring():
    for name in clipopt.__all__:
        obj = getattr(clipopt, name)
        if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismodule(obj):
            assert obj.__doc__, name
            assert obj.__doc__.strip(), name
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if not attr.startswith("_") and callable(member):
                        assert member.__doc__, f"{name}.{attr}"
    for module in (clipopt.functional, clipopt.strategies):
        for name in module.__all__:
            obj = getattr(module, name)
            if not isinstance(obj, float):
                assert obj.__doc__, name


def test_functional_exports_public_kernels_only():
    """CPU internals (norm plans, host-readable shortcuts) stay private."""
    assert set(clipopt.functional.__all__) == {
        "NORM_EPS",
        "clamp_",
        "clip_coef",
        "finite",
        "nonfinite_to_zero_",
        "percentile",
        "percentile_sorted",
        "scale_",
        "scale_each_",
        "tensor_norms",
        "total_norm",
        "unit_norms",
    }


def test_every_public_class_and_function_is_in_the_api_reference():
    api = (DOCS / "api.md").read_text()
    for name in clipopt.__all__:
        obj = getattr(clipopt, name)
        if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismodule(obj):
            assert f"::: clipopt.{name}" in api, name


def test_tuning_public_symbols_are_documented():
    import clipopt.tuning as ct

    for name in ct.__all__:
        obj = getattr(ct, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__doc__, name
    assert "::: clipopt.tuning" in (DOCS / "api.md").read_text()


def test_import_does_not_import_optuna():
    code = "import sys, clipopt; print('optuna' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_py_typed_is_shipped():
    assert (pathlib.Path(clipopt.__file__).parent / "py.typed").exists()
