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
