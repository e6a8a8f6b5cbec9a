"""The figures the image tests measured (build time, size, cold start, ...), one row per image, printed at the end
of the test session."""

from __future__ import annotations

import pytest

FIGURES = pytest.StashKey[dict]()


@pytest.fixture(scope="session")
def image_figures(pytestconfig) -> dict[str, dict[str, str]]:
    """``{folder: {figure: text}}``, filled by the tests of tests/images/."""
    return pytestconfig.stash.setdefault(FIGURES, {})


def pytest_terminal_summary(terminalreporter, config) -> None:
    figures = config.stash.get(FIGURES, {})
    if figures:
        terminalreporter.section("serving images, built and run here")
        for folder, row in figures.items():
            terminalreporter.write_line(f"{folder}: " + "; ".join(f"{name} {value}" for name, value in row.items()))
