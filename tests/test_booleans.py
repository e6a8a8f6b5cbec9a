"""The one boolean parser, shared by the settings and the request options given as text."""

from __future__ import annotations

import pytest

from maskrcnn_serving.booleans import FALSE_WORDS, TRUE_WORDS, parse_bool
from maskrcnn_serving.settings import Settings


@pytest.mark.parametrize("word", ["1", "true", "yes", "on", "TRUE", "On", " yes ", "\ttrue\n"])
def test_true_words(word):
    assert parse_bool(word) is True


@pytest.mark.parametrize("word", ["0", "false", "no", "off", "FALSE", "Off", " no ", "\t0\n"])
def test_false_words(word):
    assert parse_bool(word) is False


@pytest.mark.parametrize("word", ["", " ", "2", "-1", "y", "n", "t", "f", "enable", "disabled", "truex", "o n", "１"])
def test_anything_else_is_refused_naming_the_words(word):
    with pytest.raises(ValueError, match="expected one of 1, true, yes, on, 0, false, no, off"):
        parse_bool(word)


def test_the_words_are_disjoint_and_the_settings_read_them():
    assert not set(TRUE_WORDS) & set(FALSE_WORDS)
    for word in TRUE_WORDS:
        assert Settings.from_env({"MASKRCNN_XLA": word.upper()}).xla is True
    for word in FALSE_WORDS:
        assert Settings.from_env({"MASKRCNN_XLA": f" {word} "}).xla is False
