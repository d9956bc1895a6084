"""From a recipe's data source to tokenised pairs: read or generate, validate, tokenise, report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from posttrain.data.readers import InvalidRow, handle_invalid, load_preference_rows, write_skipped_rows
from posttrain.data.tasks import builtin_rows
from posttrain.data.tokenize import TokenizedPair, TokenizeStats, tokenize_pairs
from posttrain.errors import DataError
from posttrain.logs import get_logger


def load_pairs(source, data_cfg, tokenizer, seed: int = 0, what: str = "data.train",
               skipped_log: Optional[Path] = None) -> tuple[list[TokenizedPair], TokenizeStats, list[InvalidRow]]:
    """Tokenised pairs of one data source, with invalid rows handled per `data.invalid_rows`."""
    if source.builtin:
        rows, invalid = builtin_rows(source.builtin, source.split, source.num_rows, seed), []
    else:
        rows, invalid = load_preference_rows(source.path, source.format, source.split, config=source.config)
    handle_invalid(invalid, data_cfg.invalid_rows, what)
    rows = rows[source.start:]
    if source.limit is not None:
        rows = rows[:source.limit]
    pairs, untrainable, stats = tokenize_pairs(rows, tokenizer, data_cfg.template, data_cfg.max_length,
                                               data_cfg.max_prompt_length, data_cfg.truncation)
    handle_invalid(untrainable, data_cfg.invalid_rows, what)
    invalid = invalid + untrainable
    write_skipped_rows(invalid, skipped_log, what)  # before any error below, so the skipped rows are listed
    if not pairs:
        raise DataError(f"{what}: no usable pairs in {source.path or 'builtin:' + str(source.builtin)} "
                        f"({len(invalid)} invalid rows). Check the file and its fields.")
    log = get_logger()
    log.info("%s: %d pairs (%d skipped as invalid, %d truncated to max_length=%d); template %s: %d rendered with "
             "the chat template, %d as raw text; %d with a token merged across the prompt's end (its last prompt "
             "tokens left out, as TRL does)", what, len(pairs), len(invalid), stats.truncated, data_cfg.max_length,
             data_cfg.template, stats.chat_rows, stats.rows - stats.chat_rows, stats.boundary_merges)
    return pairs, stats, invalid
