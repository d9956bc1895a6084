"""PHEE (pharmacovigilance event extraction) -> structured-output preference pairs in TRL's format.

Input: PHEE's `train.json` / `dev.json` (JSON Lines; one sentence a line with `id`, `context` and
`annotations[0].events`). Output: JSON Lines rows

    {"prompt": ..., "chosen": ..., "rejected": ..., "id": ..., "edit_kinds": [...],
     "edits_chosen": [[start, end], ...], "edits_rejected": [[start, end], ...]}

**prompt**: asks for the sentence's events as JSON and shows the schema (`PROMPT_TEMPLATE`).

**chosen**: the gold events of the first annotation, simplified to

    [{"arguments": {ROLE: SPAN TEXT, ...}, "event_type": EVENT TYPE}, ...]

serialised as `json.dumps(events, sort_keys=True, ensure_ascii=False, separators=(", ", ": "))`
(events in annotation order; keys sorted, so "arguments" comes before "event_type" and roles are
alphabetical). Roles are PHEE's argument names; a sub-argument is named `Parent.Child`
(`Treatment.Drug`, `Subject.Age`: PHEE has `Disorder` under both Subject and Treatment). The
attributes Speculated, Negated and Severity are kept as roles with their cue text (their value,
e.g. Severity "High", is dropped). A span made of several pieces (a discontinuous entity) is
joined with " ... ", several entities of one role with "; ".

**rejected**: the same structure with 1 to 3 word-level edits (the number uniform in 1..3, seeded
by `--seed` and the row's id), each on a different field, and the result re-serialised the same
way, so it still parses with the same schema (same number of events, known event types, string
role -> string span maps):

- `event_type`: the other event type (Adverse_event <-> Potential_therapeutic_event);
- `role`: an argument's role label replaced by a role of the same level it does not already have
  (a top-level role by a top-level role, `Subject.X` by `Subject.Y`, `Treatment.X` by `Treatment.Y`);
- `span_shift`: a single-piece span moved by one word in the sentence (extended, shrunk or slid
  by one word to the left or right), keeping only shifts whose text differs;
- `swap`: the span texts of two arguments of one event with different texts are exchanged.

Each edit's kind is drawn uniformly among the kinds still possible, then one candidate uniformly.
`edits_chosen[k]` / `edits_rejected[k]` are the character ranges (inside the JSON string quotes)
of the k-th edited field in chosen and in rejected: for `role` the role label (key), otherwise the
value (a swap contributes two ranges on each side). These are what a claims script measures on.

Rows for which no edit exists (no events) are not written; they are counted and listed in the
report printed at the end (and written with `--report`).

    python -m posttrain.data.phee --input ../shared/data/phee/train.json --output ../phee_pairs/train.jsonl --seed 0

Write the output outside the repository; generated data is never committed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
from pathlib import Path
from typing import Optional

from posttrain.errors import DataError

EVENT_TYPES = ("Adverse_event", "Potential_therapeutic_event")
TOP_ROLES = ("Effect", "Negated", "Severity", "Speculated", "Subject", "Treatment", "Trigger")
SUB_ROLES = {
    "Subject": ("Age", "Disorder", "Gender", "Population", "Race"),
    "Treatment": ("Disorder", "Dosage", "Drug", "Duration", "Freq", "Route", "Time_elapsed"),
}
ROLES = TOP_ROLES + tuple(f"{parent}.{child}" for parent, children in SUB_ROLES.items() for child in children)
EDIT_KINDS = ("event_type", "role", "span_shift", "swap")
PIECE_SEP = " ... "
ENTITY_SEP = "; "

PROMPT_TEMPLATE = (
    "Extract the pharmacovigilance events of the sentence below as JSON.\n"
    "Answer with a JSON list of events. Each event is an object "
    '{{"arguments": {{ROLE: TEXT, ...}}, "event_type": TYPE}} where TYPE is "Adverse_event" or '
    '"Potential_therapeutic_event", ROLE is one of {roles}, and TEXT is copied from the sentence.\n\n'
    "Sentence: {sentence}"
)

_WORD = re.compile(r"\w+(?:[-'’]\w+)*")


def prompt_for(sentence: str) -> str:
    return PROMPT_TEMPLATE.format(roles=", ".join(ROLES), sentence=sentence)


# --------------------------------------------------------------------------------------------
# Gold events -> internal structure


def _span_text(arg: dict) -> str:
    return ENTITY_SEP.join(PIECE_SEP.join(pieces) for pieces in arg.get("text", []))


def _single_piece_start(arg: dict) -> Optional[int]:
    text, start = arg.get("text", []), arg.get("start", [])
    if len(text) == 1 and len(text[0]) == 1 and len(start) == 1 and len(start[0]) == 1:
        return int(start[0][0])
    return None


def gold_events(record: dict) -> list[dict]:
    """Internal form: [{"event_type", "args": [{"id", "role", "text", "start"}]}] (start: the span's
    character offset in the sentence when it is a single piece, else None)."""
    annotations = record.get("annotations") or []
    if not annotations:
        return []
    events = []
    next_id = 0
    for event in annotations[0].get("events", []):
        args = []
        for role, arg in event.items():
            if not isinstance(arg, dict):
                continue
            args.append({"id": next_id, "role": role, "text": _span_text(arg), "start": _single_piece_start(arg)})
            next_id += 1
            for child, sub in arg.items():
                if isinstance(sub, dict):
                    args.append({"id": next_id, "role": f"{role}.{child}", "text": _span_text(sub),
                                 "start": _single_piece_start(sub)})
                    next_id += 1
        events.append({"event_type": event.get("event_type", ""), "args": args})
    return events


def public_form(events: list[dict]) -> list[dict]:
    return [{"arguments": {a["role"]: a["text"] for a in e["args"]}, "event_type": e["event_type"]} for e in events]


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def serialise(events: list[dict]) -> tuple[str, dict]:
    """The documented JSON text and, per field, the character range of its content:
    ("type", event) -> event_type value; ("key", id) -> role label; ("value", id) -> span text."""
    spans: dict = {}
    out = "["
    for k, event in enumerate(events):
        if k:
            out += ", "
        out += '{"arguments": {'
        for j, arg in enumerate(sorted(event["args"], key=lambda a: a["role"])):
            if j:
                out += ", "
            key = _dumps(arg["role"])
            spans[("key", arg["id"])] = (len(out) + 1, len(out) + len(key) - 1)
            out += key + ": "
            value = _dumps(arg["text"])
            spans[("value", arg["id"])] = (len(out) + 1, len(out) + len(value) - 1)
            out += value
        out += '}, "event_type": '
        value = _dumps(event["event_type"])
        spans[("type", k)] = (len(out) + 1, len(out) + len(value) - 1)
        out += value + "}"
    out += "]"
    expected = json.dumps(public_form(events), sort_keys=True, ensure_ascii=False, separators=(", ", ": "))
    assert out == expected, (out, expected)
    return out, spans


def check_schema(text: str) -> list[dict]:
    """Parse a chosen/rejected string and check it against the schema; returns the parsed events."""
    events = json.loads(text)
    if not isinstance(events, list):
        raise ValueError("not a JSON list")
    for event in events:
        if not isinstance(event, dict) or set(event) != {"arguments", "event_type"}:
            raise ValueError(f"event {event!r} must have exactly the keys arguments and event_type")
        if event["event_type"] not in EVENT_TYPES:
            raise ValueError(f"unknown event_type {event['event_type']!r}")
        args = event["arguments"]
        if not isinstance(args, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in args.items()):
            raise ValueError("arguments must map role strings to span strings")
        unknown = [k for k in args if k not in ROLES]
        if unknown:
            raise ValueError(f"unknown roles {unknown}")
    return events


# --------------------------------------------------------------------------------------------
# Edits


def _role_level(role: str) -> str:
    return role.split(".", 1)[0] if "." in role else ""


def _role_candidates(event: dict, arg: dict) -> list[str]:
    level = _role_level(arg["role"])
    present = {a["role"] for a in event["args"]}
    pool = [r for r in ROLES if _role_level(r) == level] if level or arg["role"] in TOP_ROLES else []
    return [r for r in pool if r not in present]


def _shift_candidates(sentence: str, arg: dict) -> list[str]:
    start = arg["start"]
    if start is None or sentence[start:start + len(arg["text"])] != arg["text"] or not arg["text"]:
        return []
    end = start + len(arg["text"])
    words = [(m.start(), m.end()) for m in _WORD.finditer(sentence)]
    inside = [k for k, (a, b) in enumerate(words) if a < end and start < b]
    if not inside:
        return []
    first, last = inside[0], inside[-1]
    options = []

    def window(lo: int, hi: int, keep_start: bool, keep_end: bool):
        if lo < 0 or hi >= len(words) or lo > hi:
            return
        a = start if keep_start else words[lo][0]
        b = end if keep_end else words[hi][1]
        if b > a:
            options.append(sentence[a:b])

    window(first, last + 1, True, False)  # extend right
    window(first - 1, last, False, True)  # extend left
    if last > first:
        window(first + 1, last, False, True)  # drop the first word
        window(first, last - 1, True, False)  # drop the last word
    window(first + 1, last + 1, False, False)  # slide right
    window(first - 1, last - 1, False, False)  # slide left
    seen, out = set(), []
    for text in options:
        if text != arg["text"] and text.strip() and text not in seen:
            seen.add(text)
            out.append(text)
    return out


def _candidates(events: list[dict], sentence: str, used: set) -> dict[str, list]:
    cands: dict[str, list] = {kind: [] for kind in EDIT_KINDS}
    for k, event in enumerate(events):
        if ("type", k) not in used and event["event_type"] in EVENT_TYPES:
            cands["event_type"].append(k)
        free = [a for a in event["args"] if a["id"] not in used]
        for arg in free:
            for role in _role_candidates(event, arg):
                cands["role"].append((k, arg["id"], role))
            for text in _shift_candidates(sentence, arg):
                cands["span_shift"].append((k, arg["id"], text))
        for i, a in enumerate(free):
            for b in free[i + 1:]:
                if a["text"] != b["text"]:
                    cands["swap"].append((k, a["id"], b["id"]))
    return cands


def make_rejected(events: list[dict], sentence: str, rng: random.Random) -> tuple[list[dict], list[tuple]]:
    """A copy of `events` with 1-3 edits on distinct fields; returns (edited events, edit list)."""
    edited = [{"event_type": e["event_type"], "args": [dict(a) for a in e["args"]]} for e in events]
    by_id = {a["id"]: a for e in edited for a in e["args"]}
    wanted = rng.randint(1, 3)
    used: set = set()
    edits: list[tuple] = []
    while len(edits) < wanted:
        cands = _candidates(edited, sentence, used)
        kinds = [kind for kind in EDIT_KINDS if cands[kind]]
        if not kinds:
            break
        kind = rng.choice(kinds)
        choice = rng.choice(cands[kind])
        if kind == "event_type":
            event = edited[choice]
            event["event_type"] = EVENT_TYPES[1 - EVENT_TYPES.index(event["event_type"])]
            used.add(("type", choice))
            edits.append(("event_type", choice))
        elif kind == "role":
            _, arg_id, role = choice
            by_id[arg_id]["role"] = role
            used.add(arg_id)
            edits.append(("role", arg_id))
        elif kind == "span_shift":
            _, arg_id, text = choice
            by_id[arg_id]["text"] = text
            used.add(arg_id)
            edits.append(("span_shift", arg_id))
        else:
            _, a, b = choice
            by_id[a]["text"], by_id[b]["text"] = by_id[b]["text"], by_id[a]["text"]
            used.update((a, b))
            edits.append(("swap", a, b))
    return edited, edits


def _edit_spans(edit: tuple, spans: dict) -> list[list[int]]:
    kind = edit[0]
    if kind == "event_type":
        return [list(spans[("type", edit[1])])]
    if kind == "role":
        return [list(spans[("key", edit[1])])]
    if kind == "span_shift":
        return [list(spans[("value", edit[1])])]
    return [list(spans[("value", edit[1])]), list(spans[("value", edit[2])])]


def build_row(record: dict, seed: int) -> Optional[dict]:
    """The preference row of one PHEE record, or None when no edit is possible."""
    sentence = record["context"]
    events = gold_events(record)
    if not events:
        return None
    rng = random.Random(int(hashlib.sha256(f"{seed}/{record.get('id', '')}/{sentence}".encode()).hexdigest()[:16], 16))
    edited, edits = make_rejected(events, sentence, rng)
    if not edits:
        return None
    chosen, spans_c = serialise(events)
    rejected, spans_r = serialise(edited)
    if chosen == rejected:  # cannot happen (edits touch distinct fields and always change them)
        return None
    edits_c = [s for e in edits for s in _edit_spans(e, spans_c)]
    edits_r = [s for e in edits for s in _edit_spans(e, spans_r)]
    return {"prompt": prompt_for(sentence), "chosen": chosen, "rejected": rejected, "id": record.get("id"),
            "edit_kinds": [e[0] for e in edits], "edits_chosen": edits_c, "edits_rejected": edits_r}


def read_phee(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such PHEE file.")
    records = []
    for number, line in enumerate(p.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}, line {number}: invalid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno}); PHEE files hold one sentence a line.") \
                from None
        if not isinstance(record, dict) or not isinstance(record.get("context"), str):
            raise DataError(f"{p}, line {number}: expected an object with a 'context' string (PHEE format).")
        records.append(record)
    return records


def build_pairs(records: list[dict], seed: int = 0) -> tuple[list[dict], dict]:
    """(rows, report). The report counts rows read and written, the rows without a valid edit (with
    their ids), and edits by kind and by number per row."""
    rows, skipped = [], []
    kinds = {kind: 0 for kind in EDIT_KINDS}
    per_row = {1: 0, 2: 0, 3: 0}
    for record in records:
        row = build_row(record, seed)
        if row is None:
            skipped.append(record.get("id"))
            continue
        rows.append(row)
        for kind in row["edit_kinds"]:
            kinds[kind] += 1
        per_row[len(row["edit_kinds"])] += 1
    report = {"records": len(records), "rows_written": len(rows), "no_valid_edit": len(skipped),
              "no_valid_edit_ids": skipped, "edits_by_kind": kinds, "rows_by_number_of_edits": per_row,
              "seed": seed}
    return rows, report


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posttrain.data.phee", description=(
        "Build prompt/chosen/rejected JSONL (TRL format) from PHEE train.json / dev.json: chosen is the gold "
        "event JSON, rejected the same JSON with 1-3 seeded word-level edits."))
    parser.add_argument("--input", required=True, help="PHEE JSON Lines file (train.json or dev.json)")
    parser.add_argument("--output", required=True, help="output JSONL (write it outside the repository)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="only the first N sentences")
    parser.add_argument("--report", default=None, help="also write the report (JSON) here")
    args = parser.parse_args(argv)
    try:
        records = read_phee(args.input)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.limit is not None:
        records = records[:args.limit]
    rows, report = build_pairs(records, args.seed)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    report["input"], report["output"] = str(args.input), str(out)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['rows_written']} pairs written to {out} from {report['records']} sentences; "
          f"{report['no_valid_edit']} sentences had no valid edit and were not written"
          + (f" (ids: {', '.join(map(str, report['no_valid_edit_ids'][:20]))}"
             f"{' ...' if report['no_valid_edit'] > 20 else ''})" if report['no_valid_edit'] else "")
          + f"; edits by kind {report['edits_by_kind']}, rows by number of edits {report['rows_by_number_of_edits']}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
