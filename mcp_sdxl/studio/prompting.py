"""Prompt assembly: preset prompt + scene + LoRA trigger words, each trigger word exactly once."""

from __future__ import annotations

import re


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def prompt_phrases(prompt: str) -> list[str]:
    """Comma-separated phrases with compel weighting stripped: '(red hair)1.3' and 'hat++' -> plain."""
    phrases = []
    for part in prompt.split(","):
        part = re.sub(r"\)[\d.]+", ")", part)  # (word)1.3 -> (word)
        part = re.sub(r"[()+\-]+(?=\s|$)|[()]", " ", part)  # word++ / word-- / parentheses
        if _normalise(part):
            phrases.append(_normalise(part))
    return phrases


def contains_phrase(prompt: str, phrase: str) -> bool:
    """True when `phrase` already appears in `prompt` as whole words (case-insensitive)."""
    target = _normalise(phrase)
    if not target:
        return True
    pattern = r"(?<![\w])" + re.escape(target) + r"(?![\w])"
    return any(re.search(pattern, p) for p in prompt_phrases(prompt))


def compose_prompt(parts: list[str], trigger_words: list[str]) -> str:
    """Join prompt parts and append each trigger word that is not already present, once."""
    prompt = ", ".join(p.strip().strip(",") for p in parts if p and p.strip())
    added: list[str] = []
    for word in trigger_words:
        if not contains_phrase(prompt, word) and _normalise(word) not in {_normalise(a) for a in added}:
            added.append(word.strip())
    if added:
        prompt = ", ".join([*added, prompt]) if prompt else ", ".join(added)
    return prompt


def merge_negative(*parts: str | None) -> str:
    seen: list[str] = []
    for part in parts:
        for phrase in (part or "").split(","):
            phrase = phrase.strip()
            if phrase and _normalise(phrase) not in {_normalise(s) for s in seen}:
                seen.append(phrase)
    return ", ".join(seen)


# compel's weighting grammar (pyparsing) backtracks: its time grows about 4x with each level of nesting
# and each unmatched parenthesis. Measured on the CPU: ((((beach)))) 0.3 s, ((((((beach)))))) 6.8 s,
# (((beach 1.0 s, ((((((( beach 25 s; twelve unclosed would run for hours in the engine's worker, with
# the GPU taken and every later call queued behind it. Prompts are checked before they queue.
MAX_WEIGHT_NESTING = 4
MAX_UNMATCHED = 2


def weighting_problem(text: str, field: str) -> str | None:
    """Why compel would take too long on `text`'s parentheses/brackets, or None."""
    depth = deepest = unmatched = 0
    escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch in "([":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]":
            if depth:
                depth -= 1
            else:
                unmatched += 1  # a closer with nothing open
    unmatched += depth  # openers never closed
    if deepest > MAX_WEIGHT_NESTING:
        return (f"{field} nests parentheses/brackets {deepest} deep; use at most {MAX_WEIGHT_NESTING} levels "
                "(weight a word with (word)1.5 or word++ instead of ((((word)))))")
    if unmatched > MAX_UNMATCHED:
        return (f"{field} has {unmatched} unmatched parentheses/brackets; close them or leave them out "
                f"(at most {MAX_UNMATCHED}: the weighting parser slows down sharply with each one)")
    return None
