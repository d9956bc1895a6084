"""User rewards for the online-RL tests (referenced from recipes as `online_rewards:<function>`).

A tiny random model samples almost uniformly over SmolLM2's 49k-token vocabulary, so exact answers are
out of its reach; these rewards score properties of any text instead.
"""


def letter_share(completion, example):
    """Share of the completion's characters that are letters (about 0.85 for random tokens)."""
    text = completion.strip()
    return sum(c.isalpha() for c in text) / max(len(text), 1)


def letter_share_on_even_answers(completion, example):
    """letter_share for prompts whose answer is even; a constant 0 for the others (zero-variance groups)."""
    return letter_share(completion, example) if int(example.answer) % 2 == 0 else 0.0


def first_character_is_vowel(completion, example):
    """1 when the completion starts with a vowel, else 0 (a success / failure reward)."""
    text = completion.strip().lower()
    return float(bool(text) and text[0] in "aeiou")
