"""Whole-word rules shared by the sampling ban and the text filter, for scripts with and without spaces."""

from __future__ import annotations

import re

__all__ = ["WORD_CHAR", "blocked_pattern", "is_word_char"]

_SPACELESS = (
    "\u1100-\u11ff\u2e80-\u2fdf\u3005-\u3007\u3040-\u30ff\u3130-\u318f\u31f0-\u31ff\u3400-\u4dbf"
    "\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003ffff"
)
"""Han characters, Japanese kana and Korean Hangul: scripts written without spaces between words (Korean glues
particles to nouns), so a blocked word in them matches wherever it appears."""
WORD_CHAR = f"(?:(?![{_SPACELESS}])\\w)"
"""A character that continues a word for whole-word matching: a letter, digit or underscore of a script that
separates words with spaces. "class" does not contain the word "ass", but "你好damn" contains "damn"."""


def is_word_char(char: str) -> bool:
    return re.fullmatch(WORD_CHAR, char) is not None


def blocked_pattern(words: list[str]) -> re.Pattern[str] | None:
    """Any of `words`, case-insensitively, as whole words: a word that starts (ends) with a `WORD_CHAR` does not
    match right after (before) another one, so blocking "ass" leaves "class" alone; Chinese, Japanese and Korean
    words, and the Chinese side of a word next to Chinese text, match wherever they appear ("你真是个笨蛋！")."""
    if not words:
        return None
    forms = []
    for word in sorted(words, key=len, reverse=True):
        before = f"(?<!{WORD_CHAR})" if is_word_char(word[0]) else ""
        after = f"(?!{WORD_CHAR})" if is_word_char(word[-1]) else ""
        forms.append(before + re.escape(word) + after)
    return re.compile("|".join(forms), re.IGNORECASE)
