"""Read preference pairs from JSONL, JSON, parquet, a `datasets` directory, or a Hub dataset id (`owner/name`,
loaded through `datasets`: from the local cache when offline).

Formats (detected per file from the first row's fields, or fixed by `format:`):
- "trl": TRL's standard preference format, `prompt` / `chosen` / `rejected`, each a string or a list of
  chat messages ({"role", "content"}); without `prompt`, the shared leading messages of `chosen` and
  `rejected` are the prompt (TRL's implicit-prompt form).
- "hh": raw Anthropic HH-RLHF, `chosen` / `rejected` as whole dialogues; the prompt is everything up to and
  including the last "\n\nAssistant:", the response what follows it.

Every row is validated; a bad row is reported with the file, the row number (1-based) and the
field. With `invalid_rows: skip` it is counted and logged, never silently dropped.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

from posttrain.errors import DataError

HH_SPLIT = "\n\nAssistant:"
ROW_KIND = "row_kind"  # extras key: "demonstration" (SFT data) or "unpaired" (KTO data); pairs have none
KTO_DESIRABLE = "kto_desirable"  # extras key of an unpaired row: 1.0 desirable, 0.0 undesirable
Messages = list[dict]


@dataclass
class PreferenceRow:
    """One validated pair. `prompt` is a string or chat messages; responses are strings (the assistant's
    text). `source`/`row` say where it came from."""

    prompt: Union[str, Messages]
    chosen: str
    rejected: str
    source: str
    row: int
    extras: dict = field(default_factory=dict)


@dataclass
class InvalidRow:
    source: str
    row: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}, row {self.row}, field {self.field!r}: {self.reason}"


class RepeatedKeys(dict):
    """A JSON object that gave a key more than once (JSON keeps only the last value)."""

    repeated: list[str]


def _json_object(pairs: list[tuple[str, Any]]) -> dict:
    record = dict(pairs)
    if len(record) < len(pairs):
        record = RepeatedKeys(record)
        record.repeated = [key for key, count in Counter(key for key, _ in pairs).items() if count > 1]
    return record


def _loads(text: str) -> Any:
    return json.loads(text, object_pairs_hook=_json_object)


def _value_problem(value: Any) -> Optional[str]:
    """What makes a parsed value unusable although it is valid JSON: a key given twice in an object, or a
    string with an unpaired surrogate (an escape like \\ud800 that encodes no character)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"holds an unpaired surrogate ({value[exc.start]!r}), which is not text; fix that escape"
        return None
    if isinstance(value, RepeatedKeys):
        return f"key {value.repeated[0]!r} is given twice in one object (JSON would keep only the last value)"
    for item in value.values() if isinstance(value, dict) else value if isinstance(value, list) else ():
        problem = _value_problem(item)
        if problem:
            return problem
    return None


def record_problem(record: dict) -> Optional[tuple[str, str]]:
    """(field, reason) of the first unusable value in a record (see `_value_problem`), or None."""
    if isinstance(record, RepeatedKeys):
        return record.repeated[0], "given twice in the row (JSON would keep only the last value); remove one"
    for name, value in record.items():
        problem = _value_problem(value)
        if problem:
            return name, problem
    return None


def message_problem(messages: list) -> Optional[str]:
    """Why a list of {role, content} messages cannot be rendered, or None: role and content must be text."""
    for i, message in enumerate(messages):
        for key in ("role", "content"):
            if not isinstance(message[key], str):
                return f"message {i + 1}: {key} must be a string, got {type(message[key]).__name__}"
        if not message["role"]:
            return f"message {i + 1}: empty role"
    return None


def iter_raw_rows(path: Path, split: str) -> Iterator[tuple[int, Any]]:
    """Yield (row_number, record) for every record, 1-based, with errors naming file and row."""
    if path.is_dir():
        try:
            import datasets

            ds = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise DataError(f"{path}: not a directory written by datasets' save_to_disk ({exc}).") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: the datasets directory has splits {list(ds)}, not {split!r}; set `split:`.")
            ds = ds[split]
        for i, record in enumerate(ds):
            yield i + 1, record
        return
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:
            raise DataError(f"{path}: cannot read as parquet ({exc}).") from None
        for i, record in enumerate(table.to_pylist()):
            yield i + 1, record
        return
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a leading byte-order mark (editors on Windows) is not part of the data
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise DataError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start}, line {line}). Re-save the file "
                        f"as UTF-8.") from None
    if text.lstrip().startswith("["):  # one JSON array of rows (whatever the suffix: also a .jsonl saved as JSON)
        try:
            records = _loads(text)
        except json.JSONDecodeError as exc:
            if suffix == ".json":
                raise DataError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg.removesuffix(' at')}.") from None
            records = None  # JSON Lines whose first row is not an object: reported row by row below
        if isinstance(records, list):
            for i, record in enumerate(records):
                yield i + 1, record
            return
    # JSON Lines (also .json files holding one record a line). Split on "\n" only: str.splitlines() also splits
    # at U+2028, U+0085, form feeds etc., which JSON allows unescaped inside strings.
    for i, line in enumerate(text.split("\n")):
        if not line.strip():
            continue
        try:
            yield i + 1, _loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {i + 1}: invalid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno}). Fix or remove "
                            f"that line.") from None


def is_hub_id(path: str) -> bool:
    """Whether a data path that is not a local file names a Hugging Face Hub dataset (`owner/name`)."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", str(path))) and not Path(path).suffix


def iter_hub_rows(repo_id: str, split: str, config: Optional[str]) -> Iterator[tuple[int, Any]]:
    """(row_number, record) of a Hub dataset through `datasets.load_dataset`: from the Hub, or from the local
    datasets cache when offline (HF_HUB_OFFLINE=1 or HF_DATASETS_OFFLINE=1). Any failure is one DataError."""
    import datasets
    from datasets import config as datasets_config

    try:
        ds = datasets.load_dataset(repo_id, config, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; the user gets one paragraph
        reason = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
        where = (f"the local datasets cache ({datasets_config.HF_DATASETS_CACHE}; offline mode)"
                 if datasets_config.HF_HUB_OFFLINE else f"the Hub or the local datasets cache "
                                                         f"({datasets_config.HF_DATASETS_CACHE})")
        raise DataError(f"data path {repo_id!r} is not a local file, and as a Hub dataset id"
                        f"{f' (config {config!r})' if config else ''}, split {split!r}, it could not be loaded from "
                        f"{where}: {reason}. On a machine with the Hub, `datasets.load_dataset({repo_id!r})` caches "
                        f"it (then set HF_HUB_OFFLINE=1 here), or save it to a local file and set data.path to it "
                        f"(docs/data.md).") from None
    for i, record in enumerate(ds):
        yield i + 1, record


def is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def detect_format(record: dict, source: str, row: int = 1) -> str:
    """The format of a file, from its first record. A record that has some of the expected fields but not all
    still fixes the format (its missing field is then reported as an invalid row, with the row's number)."""
    if not isinstance(record, dict):
        raise DataError(f"{source}, row {row}: expected a JSON object with fields prompt/chosen/rejected, got "
                        f"{type(record).__name__}.")
    if "completion" in record and "label" in record:
        return "kto"
    if "messages" in record or ("completion" in record and "chosen" not in record):
        return "sft"
    if any(name in record for name in ("prompt", "chosen", "rejected")):
        if "prompt" in record:
            return "trl"
        if any(isinstance(record.get(name), str) and HH_SPLIT in record[name] for name in ("chosen", "rejected")):
            return "hh"
        return "trl"
    raise DataError(
        f"{source}, row {row}: cannot tell the data format from fields {sorted(record)}. posttrain reads TRL's "
        f"preference format (prompt, chosen, rejected), raw HH-RLHF (chosen, rejected dialogues), for the sft "
        f"loss TRL's SFT formats (messages; prompt, completion) and for kto TRL's unpaired format (prompt, "
        f"completion, label); rename your fields or set `format:`."
    )


def _assistant_text(value: Any) -> Optional[str]:
    """A response given as a string or as messages ending in one assistant message."""
    if isinstance(value, str):
        return value
    if is_messages(value) and value and value[-1]["role"] == "assistant" and isinstance(value[-1]["content"], str):
        return value[-1]["content"] if len(value) == 1 else None
    return None


def _missing(record: dict) -> str:
    return f"missing field (the row has fields {sorted(record)})"


def _parse_trl(record: dict, source: str, row: int) -> Union[PreferenceRow, InvalidRow]:
    for name in ("chosen", "rejected"):
        if name not in record or record[name] is None:
            return InvalidRow(source, row, name, _missing(record))
    chosen, rejected = record["chosen"], record["rejected"]
    prompt = record.get("prompt")
    if prompt is None:  # implicit prompt: shared leading messages
        if not (is_messages(chosen) and is_messages(rejected)):
            return InvalidRow(source, row, "prompt", "missing field (and chosen/rejected are not message lists "
                                                     "from which to take an implicit prompt)")
        if chosen[:-1] != rejected[:-1]:
            return InvalidRow(source, row, "prompt", "the prompt differs between chosen and rejected")
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
        if not prompt:
            return InvalidRow(source, row, "prompt", "empty prompt")
    if not (isinstance(prompt, str) or is_messages(prompt)):
        return InvalidRow(source, row, "prompt", "must be a string or a list of {role, content} messages")
    if isinstance(prompt, list) and message_problem(prompt):
        return InvalidRow(source, row, "prompt", message_problem(prompt))
    c_text, r_text = _assistant_text(chosen), _assistant_text(rejected)
    if c_text is None:
        return InvalidRow(source, row, "chosen", "must be a string or a single assistant message")
    if r_text is None:
        return InvalidRow(source, row, "rejected", "must be a string or a single assistant message")
    extras = {k: v for k, v in record.items() if k not in ("prompt", "chosen", "rejected")}
    return PreferenceRow(prompt, c_text, r_text, source, row, extras)


def _parse_hh(record: dict, source: str, row: int) -> Union[PreferenceRow, InvalidRow]:
    for name in ("chosen", "rejected"):
        if not isinstance(record.get(name), str):
            return InvalidRow(source, row, name, _missing(record) if name not in record else "must be a string")
    chosen, rejected = record["chosen"], record["rejected"]
    c_cut, r_cut = chosen.rfind(HH_SPLIT), rejected.rfind(HH_SPLIT)
    if c_cut < 0:
        return InvalidRow(source, row, "chosen", f"no {HH_SPLIT!r} turn to split the dialogue at")
    if r_cut < 0:
        return InvalidRow(source, row, "rejected", f"no {HH_SPLIT!r} turn to split the dialogue at")
    c_prompt, r_prompt = chosen[:c_cut + len(HH_SPLIT)], rejected[:r_cut + len(HH_SPLIT)]
    if c_prompt != r_prompt:
        return InvalidRow(source, row, "prompt", "the prompt (dialogue before the last Assistant turn) differs "
                                                 "between chosen and rejected")
    return PreferenceRow(c_prompt, chosen[c_cut + len(HH_SPLIT):], rejected[r_cut + len(HH_SPLIT):], source, row)


def _parse_sft(record: dict, source: str, row: int) -> Union[PreferenceRow, InvalidRow]:
    """TRL's SFT formats, `messages` (the last one the assistant's) or `prompt` + `completion`, as a
    demonstration: a row whose `chosen` is the completion and whose `rejected` is empty (only the sft loss,
    which reads the chosen side alone, trains on it)."""
    if "messages" in record:
        messages = record["messages"]
        if not (is_messages(messages) and len(messages) >= 2 and messages[-1]["role"] == "assistant"):
            return InvalidRow(source, row, "messages", "must be a list of {role, content} messages ending in the "
                                                       "assistant's, after at least one other")
        if message_problem(messages):
            return InvalidRow(source, row, "messages", message_problem(messages))
        prompt, completion = messages[:-1], messages[-1:]
    else:
        for name in ("prompt", "completion"):
            if record.get(name) is None:
                return InvalidRow(source, row, name, _missing(record))
        prompt, completion = record["prompt"], record["completion"]
    if not (isinstance(prompt, str) or is_messages(prompt)):
        return InvalidRow(source, row, "prompt", "must be a string or a list of {role, content} messages")
    if isinstance(prompt, list) and message_problem(prompt):
        return InvalidRow(source, row, "prompt", message_problem(prompt))
    text = _assistant_text(completion)
    if text is None:
        return InvalidRow(source, row, "completion", "must be a string or a single assistant message")
    extras = {k: v for k, v in record.items() if k not in ("prompt", "completion", "messages")}
    return PreferenceRow(prompt, text, "", source, row, {**extras, ROW_KIND: "demonstration"})


def _parse_kto(record: dict, source: str, row: int) -> Union[PreferenceRow, InvalidRow]:
    """TRL's unpaired (KTO) format: `prompt`, `completion` (strings or messages) and a boolean `label`
    (desirable or not), as a row with no rejected response and the label in `extras`."""
    parsed = _parse_sft({k: v for k, v in record.items() if k != "label"}, source, row)
    if isinstance(parsed, InvalidRow):
        return parsed
    if "label" not in record:
        return InvalidRow(source, row, "label", _missing(record))
    label = record["label"]
    if not isinstance(label, bool) and label not in (0, 1):
        return InvalidRow(source, row, "label", f"must be true (desirable) or false (undesirable), got {label!r}")
    parsed.extras.update({ROW_KIND: "unpaired", KTO_DESIRABLE: float(label)})
    return parsed


def row_kind(row) -> str:
    """"pair", "demonstration" (SFT data: no rejected response) or "unpaired" (KTO data: one labelled completion)."""
    return row.extras.get(ROW_KIND, "pair")


def validate_row(row: PreferenceRow) -> Optional[InvalidRow]:
    if not row.prompt or (isinstance(row.prompt, str) and not row.prompt.strip()):
        return InvalidRow(row.source, row.row, "prompt", "empty prompt")
    if not row.chosen.strip():
        return InvalidRow(row.source, row.row, "chosen" if row_kind(row) == "pair" else "completion", "empty response")
    if row_kind(row) != "pair":
        return None
    if not row.rejected.strip():
        return InvalidRow(row.source, row.row, "rejected", "empty response")
    if row.chosen == row.rejected:
        return InvalidRow(row.source, row.row, "rejected", "chosen and rejected are identical")
    if row.chosen.strip() == row.rejected.strip():  # the chat template strips responses: identical tokens
        return InvalidRow(row.source, row.row, "rejected", "chosen and rejected are identical apart from "
                                                           "leading/trailing whitespace")
    return None


def handle_invalid(invalid: list[InvalidRow], policy: str, what: str) -> None:
    """Raise for the first invalid row (policy `error`) or log all of them (policy `skip`)."""
    if not invalid:
        return
    if policy == "error":
        first = invalid[0]
        more = f" ({len(invalid) - 1} more rows are invalid too.)" if len(invalid) > 1 else ""
        raise DataError(f"invalid row in {what}: {first}.{more} Fix the data, or set `data.invalid_rows: skip` to "
                        f"leave such rows out (they are counted and listed in the log).")
    from posttrain.logs import get_logger

    log = get_logger()
    log.warning("%s: skipped %d invalid rows", what, len(invalid))
    for item in invalid[:20]:
        log.warning("  skipped %s", item)
    if len(invalid) > 20:
        log.warning("  ... and %d more (all listed in the run's skipped_rows.jsonl)", len(invalid) - 20)


def write_skipped_rows(invalid: list[InvalidRow], path: Optional[Path], what: str) -> None:
    """Append the invalid rows to `path` as JSON Lines (the run's skipped_rows.jsonl), one object per row."""
    if path is None or not invalid:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        for item in invalid:
            handle.write(json.dumps({"split": what, "source": item.source, "row": item.row, "field": item.field,
                                     "reason": item.reason}) + "\n")


def parse_records(path: str, split: str, choose_parser: Callable, what: str, limit: Optional[int] = None,
                  config: Optional[str] = None) -> tuple[list, list[InvalidRow]]:
    """Read every record of `path` (a local file or directory, else a Hub dataset id with its `config`) and
    parse it with the parser that `choose_parser(record, source, row)` picks from the first record. A parser
    returns a valid item or an InvalidRow. Returns (valid items, invalid rows); stops after `limit` valid
    items. `what` names the contents in the empty-file error ("preference pairs")."""
    p = Path(path).expanduser()
    if p.exists():
        source, raw_rows = str(p), iter_raw_rows(p, split)
    elif is_hub_id(path):
        source, raw_rows = f"{path} (Hub dataset, split {split})", iter_hub_rows(path, split, config)
    else:
        raise DataError(f"data path {path!r} does not exist (working directory {Path.cwd()}).")
    items: list = []
    invalid: list[InvalidRow] = []
    parser = None
    records = 0
    for number, record in raw_rows:
        records += 1
        if not isinstance(record, dict):
            invalid.append(InvalidRow(source, number, "(row)", f"expected a JSON object, got {type(record).__name__}"))
            continue
        problem = record_problem(record)
        if problem:
            invalid.append(InvalidRow(source, number, *problem))
            continue
        if parser is None:
            parser = choose_parser(record, source, number)
        parsed = parser(record, source, number)
        (invalid if isinstance(parsed, InvalidRow) else items).append(parsed)
        if limit is not None and len(items) >= limit:
            break
    if records == 0:
        raise DataError(f"{source}: the data set is empty (no rows). Point `path:` at a file with {what}.")
    return items, invalid


def load_preference_rows(path: str, fmt: str = "auto", split: str = "train", limit: Optional[int] = None,
                         config: Optional[str] = None) -> tuple[list[PreferenceRow], list[InvalidRow]]:
    """Read and validate every row of `path`. Returns (valid rows, invalid rows)."""
    def choose(record, source, number):
        kind = detect_format(record, source, number) if fmt == "auto" else fmt
        base = {"hh": _parse_hh, "sft": _parse_sft, "kto": _parse_kto}.get(kind, _parse_trl)

        def parse(rec, src, row):
            parsed = base(rec, src, row)
            return (validate_row(parsed) or parsed) if isinstance(parsed, PreferenceRow) else parsed
        return parse

    return parse_records(path, split, choose, "preference pairs", limit, config)
