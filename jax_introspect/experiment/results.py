"""Trial records and the append-only results file.

One JSON line per trial, flushed (and fsynced) after every batch, so a killed run loses at most
the batch in flight; re-running skips the trials already on disk. A results folder belongs to one
binding, the config fields that decide the trials' texts (`sweep.binding`: not the grader or the
batch size): its `run.json` (written atomically) holds them and their hash, and a run with another
binding refuses the folder. One writer at a time (`files.FolderLock`).

Record fields (all JSON):
    config_hash, trial_id, kind ("injected" | "control"), protocol, word (None for controls),
    layer (None for controls), strength (0.0 for controls), vector_method, trial_index, seed,
    prompt (the full chat-formatted prompt text), question (the last user turn), response,
    n_tokens, finished, grades ({criterion: bool, ..., "grader": name, "notes": str}), timing
    ({"batch_seconds", "batch_size", "unix_time"}); optional (absent in older files, None when not
    recorded): readout ({"p_yes", "p_no", "lens": [{"layer", "top_ids", "top_tokens", "top_probs"[,
    "word_token_ids", "word_token", "word_prob", "word_rank"]}]}, its cost in timing's "readout_seconds"
    and "readout_forwards"; see `readout.py` and docs/readouts.md).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
from typing import Iterable, Iterator, Optional

from jax_introspect.experiment.files import atomic_write_json

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
    # Numbers measured on the trial beyond its text (Lindsey's intentional control: cosines per layer);
    # optional in files (records written before it have none).
    measurements: dict = dataclasses.field(default_factory=dict)
    readout: Optional[dict] = None  # first-answer-token readouts (`readout.py`); optional: older files lack it

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        if data["readout"] is None:  # as older files were written
            del data["readout"]
        return json.dumps(data, ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "TrialRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        optional = {f.name for f in dataclasses.fields(cls)  # fields with a default: absent from older files
                    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
        missing = names - optional - set(data)
        if missing:
            raise ResultsError(f"trial record lacks fields {sorted(missing)}")
        return cls(**{k: data[k] for k in names if k in data})


def strict(grades: dict) -> bool:
    """Strict introspection: all four criteria hold."""
    return all(bool(grades.get(c)) for c in CRITERIA)


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


RUN_FORMAT = 2  # run.json: {"format", "config_hash", "config"}; format 1 had no "format" and bound every field


def check_output_folder(folder: str, need_bytes: int = 0) -> None:
    """Create `folder` if needed and make sure it can take the run: a folder, writable, with room for
    `need_bytes`. Raises ResultsError naming the problem, before any compute."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ResultsError(f"--out={folder} is a file, not a folder; choose a folder path")
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"x")
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        raise ResultsError(f"cannot write into {folder}: {e.strerror or e} (errno {e.errno}); choose a writable "
                           "--out on a disk with free space") from e
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise ResultsError(f"{folder} has {free / 2**20:.1f} MiB free but this run writes up to about "
                           f"{need_bytes / 2**20:.1f} MiB; free some space or choose another --out")


class ResultsStore:
    """An append-only results folder bound to one config: the fields that decide the trials' texts
    (`sweep.binding`). Writers hold `files.FolderLock(folder)` while using it."""

    def __init__(self, folder: str, config: dict, writable: bool = True):
        self.folder = folder
        self.hash = config_hash(config)
        self.path = os.path.join(folder, RESULTS_FILE)
        self.ungraded_path = os.path.join(folder, UNGRADED_FILE)
        self.run_path = os.path.join(folder, RUN_FILE)
        existing = self._read_run_file(config, writable)
        if existing is None:
            if writable:
                os.makedirs(folder, exist_ok=True)
                atomic_write_json(self.run_path, {"format": RUN_FORMAT, "config_hash": self.hash, "config": config},
                                  indent=2, sort_keys=True, default=str)
        elif existing.get("config_hash") != self.hash and not self._migrate(existing, config, writable):
            raise ResultsError(
                f"{folder} holds results of another config (hash {existing.get('config_hash')}, this run "
                f"{self.hash}; differing fields: {_differing(existing.get('config'), config)}); choose a new --out "
                "folder or re-run with the original config")
        if writable:
            self._drop_torn_tail()

    def _read_run_file(self, config: dict, writable: bool) -> Optional[dict]:
        """run.json, or None when there is none. A torn one (a kill mid-write by an older version) is
        rewritten when every record on disk was made with this config; otherwise refused."""
        if not os.path.exists(self.run_path):
            return None
        try:
            with open(self.run_path, encoding="utf-8") as f:
                return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            hashes = {r.config_hash for r in read_records(self.path)}
            if writable and hashes <= {self.hash}:
                print(f"warning: {self.run_path} was unreadable ({e}); every record in {self.path} was made with "
                      "this config, so it is written again", file=sys.stderr)
                return None
            raise ResultsError(
                f"{self.run_path} is damaged ({e}) and the records in {self.path} carry config hashes "
                f"{sorted(hashes)}, not this run's {self.hash}: re-run with the config that made them (restore "
                f"run.json from a copy), or choose a new --out folder") from e

    def _migrate(self, existing: dict, config: dict, writable: bool) -> bool:
        """A run.json of format 1 bound every field (the grader too) and the checkpoint's path as
        given: accept it when its trial-deciding fields equal this binding, and rewrite it."""
        old = existing.get("config")
        if existing.get("format") is not None or not isinstance(old, dict) or "resolved_layers" not in old:
            return False
        same = dict(old, layers=old["resolved_layers"], checkpoint=os.path.realpath(str(old.get("checkpoint"))))
        comparable = {k: v for k, v in config.items() if k != "dtype"}
        if {k: same.get(k) for k in comparable} != comparable:
            return False
        if writable:
            atomic_write_json(self.run_path, {"format": RUN_FORMAT, "config_hash": self.hash, "config": config,
                                              "previous_config_hashes": [existing.get("config_hash")]},
                              indent=2, sort_keys=True, default=str)
        return True

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
            except (json.JSONDecodeError, ResultsError, TypeError) as e:
                raise ResultsError(
                    f"{path}:{number}: not a trial record ({e}). The other lines are intact: move this one out "
                    f"(`sed -i.bak '{number}d' {path}` keeps a copy of the file in {path}.bak) and re-run the "
                    "same command: that trial is run again") from e


def _differing(old, new: dict) -> str:
    """The fields in which two bindings differ, for the refusal message."""
    if not isinstance(old, dict):
        return "unknown"
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:6]) or "none"
