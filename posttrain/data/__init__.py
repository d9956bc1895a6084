"""Preference data: readers for the formats users bring, validation with row-level errors,
the tokenisation contract, built-in generated tasks, and collation."""

from posttrain.data.readers import PreferenceRow, load_preference_rows
from posttrain.data.tokenize import TokenizedPair, tokenize_pairs

__all__ = ["PreferenceRow", "TokenizedPair", "load_preference_rows", "tokenize_pairs"]
