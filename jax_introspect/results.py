"""Trial records and the append-only results file.

One JSON line per trial, flushed (and fsynced) after every batch, so a killed run loses at most
the batch in flight; re-running skips the trials already on disk. A results folder belongs to one
config: its `run.json` holds the config and its hash, and a run with another config refuses it.

Record fields (all JSON):
    config_hash, trial_id, kind ("injected" | "control"), protocol, word (None for controls),
    layer (None for controls), strength (0.0 for controls), vector_method, trial_index, seed,
    prompt (the full chat-formatted prompt text), question (the last user turn), response,
    n_tokens, finished, grades ({criterion: bool, ..., "grader": name, "notes": str}), timing
    ({"batch_seconds", "batch_size", "unix_time"}).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Iterable, Iterator, Optional

CRITERIA = ("coherent", "affirmative", "identifies", "immediate")
STRICT = "strict_introspection"
RESULTS_FILE = "trials.jsonl"
UNGRADED_FILE = "ungraded.jsonl"  # generated responses whose grading failed; graded on the next run
RUN_FILE = "run.json"


class ResultsError(ValueError):
    pass


@dataclasses.dataclass
class TrialRecord:
    config_hash: str
    trial_id: str
    kind: str
    protocol: str
    word: Optional[str]
    layer: Optional[int]
    strength: float
    vector_method: str
    trial_index: int
    seed: int
    prompt: str
    question: str
    response: str
    n_tokens: int
    finished: bool
    grades: dict
    timing: dict

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "TrialRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(data)
        if missing:
            raise ResultsError(f"trial record lacks fields {sorted(missing)}")
        return cls(**{k: data[k] for k in names})


def strict(grades: dict) -> bool:
    """Strict introspection: all four criteria hold."""
    return all(bool(grades.get(c)) for c in CRITERIA)


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ResultsStore:
    """An append-only results folder bound to one config."""

    def __init__(self, folder: str, config: dict, writable: bool = True):
        self.folder = folder
        self.hash = config_hash(config)
        self.path = os.path.join(folder, RESULTS_FILE)
        self.ungraded_path = os.path.join(folder, UNGRADED_FILE)
        run_path = os.path.join(folder, RUN_FILE)
        if os.path.exists(run_path):
            with open(run_path) as f:
                existing = json.load(f)
            if existing.get("config_hash") != self.hash:
                raise ResultsError(
                    f"{folder} holds results of another config (hash {existing.get('config_hash')}, this run "
                    f"{self.hash}); choose a new --out folder or re-run with the original config")
        elif writable:
            os.makedirs(folder, exist_ok=True)
            with open(run_path, "w") as f:
                json.dump({"config_hash": self.hash, "config": config}, f, indent=2, sort_keys=True, default=str)
        self._drop_torn_tail()

    def _drop_torn_tail(self) -> None:
        """A kill mid-write can leave a partial last line: cut it (its trial is simply re-run)."""
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)

    def records(self) -> Iterator[TrialRecord]:
        yield from read_records(self.path)

    def done_ids(self) -> set[str]:
        return {r.trial_id for r in self.records()}

    def append(self, records: Iterable[TrialRecord]) -> None:
        _append(self.path, self._checked(records))

    def _checked(self, records: Iterable[TrialRecord]) -> list[TrialRecord]:
        records = list(records)
        for r in records:
            if r.config_hash != self.hash:
                raise ResultsError(f"record {r.trial_id} has config hash {r.config_hash}, store has {self.hash}")
        return records

    def keep_ungraded(self, records: Iterable[TrialRecord]) -> None:
        _append(self.ungraded_path, self._checked(records))

    def ungraded(self) -> list[TrialRecord]:
        """Responses kept by a run whose grading failed, minus any graded since."""
        done = self.done_ids()
        latest = {r.trial_id: r for r in read_records(self.ungraded_path) if r.trial_id not in done}
        return list(latest.values())

    def clear_ungraded(self) -> None:
        if os.path.exists(self.ungraded_path):
            os.remove(self.ungraded_path)


def _append(path: str, records: list[TrialRecord]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(r.to_json() + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())


def read_records(path: str) -> Iterator[TrialRecord]:
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith("\n"):
                return  # torn tail of a killed run
            try:
                yield TrialRecord.from_dict(json.loads(line))
            except (json.JSONDecodeError, ResultsError) as e:
                raise ResultsError(f"{path}:{number}: not a trial record ({e})") from e
