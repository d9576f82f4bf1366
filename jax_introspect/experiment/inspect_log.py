"""Runs as Inspect logs (`inspect_ai.log`), and a static viewer of them that opens from disk.

    paths = export(run, log_dir)            # one .eval file per run (ours or a judged 405B file)
    make_bundle(log_dir, viewer_dir)        # `inspect view bundle`, made to open from file://
    log = read_eval_log(paths[0])           # inspect_ai's own reader gives every trial back

One `EvalSample` per graded trial (the same trials the report counts, read by `runs.load_run`): the
chat messages as the model saw them (parsed from the templated prompt text; for the 405B file, its
setup/trial prompts), the response as the assistant turn and the output, a `Score` per criterion
and for strict introspection (both definitions) with the grader's notes as explanation, and the
trial's metadata: protocol, kind, word, layer, strength, vector method, injection window, anchor and
start token, seed, trial id and index, n_tokens, finished, grader. The log's results carry each
measure's rate on injected and on control trials.

inspect-ai is an optional dependency (`pip install 'jax_introspect[inspect]'`): this module imports
it only inside its functions; `unavailable()` says why it cannot be used, or None.
"""
from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import io
import json
import os
import re
import shutil
from typing import Optional

from jax_introspect.experiment import results as results_lib
from jax_introspect.experiment.runs import CRITERIA, FORMAT_405B, ReportError, Run, replication_prompt

INSTALL_HINT = "pip install 'jax_introspect[inspect]'"
LOGS_DIR = "inspect_logs"      # in a report folder: the .eval files
VIEWER_DIR = "inspect_viewer"  # in a report folder: the static viewer (index.html)
STRICT_LINDSEY = "strict_lindsey"
SCORES = CRITERIA + (results_lib.STRICT, STRICT_LINDSEY)
EMBEDDED_JS = "embedded.js"


class InspectUnavailable(ReportError):
    """inspect_ai cannot be imported; the message names the install command."""


def unavailable() -> Optional[str]:
    """None when inspect_ai can be used, else why not (with the install command)."""
    try:
        import inspect_ai.log  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"inspect_ai is not importable ({type(e).__name__}: {e}); install it with {INSTALL_HINT}"
    return None


def _require() -> None:
    reason = unavailable()
    if reason:
        raise InspectUnavailable(reason)


# ----------------------------------------------------------------------------------------------
# Messages as the model saw them

_LLAMA3 = re.compile(r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n\n(.*?)(?:<\|eot_id\|>|$)", re.S)
_CHATML = re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>|$)", re.S)


def parse_chat(prompt: str) -> Optional[list]:
    """[(role, content), ...] of a Llama-3 or ChatML templated prompt, the final empty assistant
    header (the generation prompt) left out; None when the text is in neither template."""
    for pattern in (_LLAMA3, _CHATML):
        turns = [(m.group(1), m.group(2)) for m in pattern.finditer(prompt)]
        if turns:
            if turns[-1][0] == "assistant" and not turns[-1][1]:
                turns = turns[:-1]
            return turns
    return None


def _messages(turns: list, model: str):
    from inspect_ai.model import ChatMessageAssistant, ChatMessageSystem, ChatMessageUser
    kinds = {"system": ChatMessageSystem, "user": ChatMessageUser}
    out = []
    for role, content in turns:
        if role == "assistant":
            out.append(ChatMessageAssistant(content=content, model=model))
        else:
            out.append(kinds.get(role, ChatMessageUser)(content=content))
    return out


# ----------------------------------------------------------------------------------------------
# Per-trial fields, from either format


def _protocol_window(protocol: str) -> dict:
    from jax_introspect.experiment import protocols
    try:
        data = protocols.protocol(protocol)
    except ValueError:
        return {"injection_window": None, "injection_anchor": None}
    return {"injection_window": data.get("window"), "injection_anchor": data.get("anchor")}


class _StartTokens:
    """The first injected token of a trial's prompt (`protocols.window_start`): 0 for a window over all
    positions; for an anchor window, found with the run's tokenizer when its checkpoint is at hand
    (None otherwise)."""

    def __init__(self, checkpoint: Optional[str]):
        self.checkpoint, self._tokenizer, self._tried, self._cache = checkpoint, None, False, {}

    def __call__(self, protocol: str, prompt: str, window: dict) -> Optional[int]:
        from jax_introspect.experiment import protocols
        if window["injection_window"] == "all_positions":
            return protocols.ALL_POSITIONS
        if window["injection_window"] != "anchor" or not prompt:
            return None
        key = (protocol, prompt)
        if key not in self._cache:
            tokenizer = self._load()
            try:
                self._cache[key] = (None if tokenizer is None else protocols.window_start(
                    tokenizer, prompt, "anchor", window["injection_anchor"]))
            except Exception:  # an unexpected prompt text: the start stays unknown, the log is still written
                self._cache[key] = None
        return self._cache[key]

    def _load(self):
        if not self._tried:
            self._tried = True
            if self.checkpoint and os.path.isdir(str(self.checkpoint)):
                try:
                    from jax_introspect import checkpoint
                    self._tokenizer = checkpoint.load_tokenizer(self.checkpoint)
                except Exception:
                    self._tokenizer = None
        return self._tokenizer


def _ours(run: Run) -> list:
    """(row, record) of each counted trial: the first record of its trial id, as `runs` counts it."""
    jsonl = run.path if run.path.endswith(".jsonl") else os.path.join(run.path, results_lib.RESULTS_FILE)
    first = {}
    for record in results_lib.read_records(jsonl):
        first.setdefault(record.trial_id, record)
    return [(row, first[row.trial_id]) for row in run.rows]


def _trial_fields(run: Run) -> list:
    """One dict per counted trial: turns, response, grades (with notes) and metadata."""
    out = []
    if run.format == FORMAT_405B:
        with open(run.path, encoding="utf-8") as f:
            data = json.load(f)
        entries = data["results"]
        setup, trial = data.get("lindsey_setup", ""), data.get("lindsey_trial", "")
        for row in run.rows:
            index = int(row.trial_id.rsplit("/", 1)[1])
            entry = entries[index]
            prompt = replication_prompt(row.protocol)
            turns = ([("user", setup), ("assistant", "Ok."), ("user", trial)] if prompt == "lindsey"
                     else [("user", data.get("alt_prompt", ""))])
            window = _protocol_window(row.protocol)
            judge = entry.get("judge") or {}
            out.append({
                "row": row, "turns": turns, "response": entry.get("response", ""),
                "notes": judge.get("notes") or "", "finished": None,
                "metadata": {
                    "kind": row.kind, "protocol": row.protocol, "word": row.word, "layer": row.layer,
                    "strength": row.strength, "vector_method": data.get("vector_method"),
                    "norm_match": data.get("norm_match"), **window,
                    "injection_start_token": 0 if window["injection_window"] == "all_positions" else None,
                    "seed": None, "trial_id": row.trial_id, "trial_index": row.trial_index, "n_tokens": None,
                    "finished": None, "grader": row.grader, "strict_definition": row.strict_definition,
                    "source_label": entry.get("label"), "source_index": index,
                    "first_word": entry.get("first_word"), "temperature": data.get("temperature"),
                    "max_new_tokens": data.get("max_new_tokens"),
                }})
        return out
    config = run.metadata.get("config") or {}
    start_tokens = _StartTokens(config.get("checkpoint") if isinstance(config, dict) else None)
    for row, record in _ours(run):
        window = _protocol_window(record.protocol)
        turns = parse_chat(record.prompt)
        if turns is None:  # an unknown template: the question alone, the full text in the metadata
            turns = [("user", record.question)]
        out.append({
            "row": row, "turns": turns, "response": record.response,
            "notes": str(record.grades.get("notes") or ""), "finished": record.finished,
            "metadata": {
                "kind": row.kind, "protocol": row.protocol, "word": row.word, "layer": row.layer,
                "strength": row.strength, "vector_method": record.vector_method, **window,
                "injection_start_token": start_tokens(record.protocol, record.prompt, window),
                "seed": record.seed, "trial_id": record.trial_id, "trial_index": record.trial_index,
                "n_tokens": record.n_tokens, "finished": record.finished, "grader": row.grader,
                "strict_definition": row.strict_definition, "config_hash": record.config_hash,
                "prompt_text": record.prompt, "timing": record.timing,
            }})
    return out


# ----------------------------------------------------------------------------------------------
# The log


def _values(row) -> dict:
    """A trial's value of each score: the four criteria and both definitions of strict introspection."""
    values = {c: bool(row.grades[c]) for c in CRITERIA}
    values[results_lib.STRICT] = all(values[c] for c in CRITERIA)
    values[STRICT_LINDSEY] = values["coherent"] and values["immediate"]
    return values


def _scores(row, notes: str, response: str) -> dict:
    from inspect_ai.scorer import Score
    values = _values(row)
    why = {results_lib.STRICT: "coherent, affirmative, identifies and immediate all hold (the 405B replication's "
                               "definition)",
           STRICT_LINDSEY: "coherent and immediate (AFFIRMATIVE + CORRECT ID) hold (Lindsey 2026's definition)"}
    meta = {"grader": row.grader, "strict_definition": row.strict_definition}
    answer = response if len(response) <= 300 else response[:300] + "…"
    return {name: Score(value=values[name], answer=answer,
                        explanation=(notes or None) if name in CRITERIA else f"{why[name]}" + (
                            f". Grader's notes: {notes}" if notes else ""),
                        metadata=meta)
            for name in SCORES}


def _results(fields: list):
    from inspect_ai.log import EvalMetric, EvalResults, EvalScore
    scores = []
    for name in SCORES:
        metrics = {}
        for kind in ("injected", "control"):
            rows = [f["row"] for f in fields if f["row"].kind == kind]
            if rows:
                values = [_values(r)[name] for r in rows]
                metrics[kind] = EvalMetric(name=kind, value=sum(values) / len(values))
        scores.append(EvalScore(name=name, scorer=name, scored_samples=len(fields), unscored_samples=0,
                                metrics=metrics))
    return EvalResults(total_samples=len(fields), completed_samples=len(fields), scores=scores)


def _created(run: Run, fields: list) -> str:
    """When the run's trials were made: the first record's time (ours), the file's timestamp (405B),
    else the file's modification time."""
    stamp = None
    if run.format == FORMAT_405B:
        stamp_text = str((run.metadata.get("config") or {}).get("timestamp") or "")
        try:
            stamp = datetime.datetime.strptime(stamp_text, "%Y%m%d_%H%M%S").replace(tzinfo=datetime.timezone.utc)
        except ValueError:
            stamp = None
    else:
        times = [f["metadata"]["timing"].get("unix_time") for f in fields if isinstance(f["metadata"].get("timing"), dict)]
        times = [t for t in times if isinstance(t, (int, float))]
        if times:
            stamp = datetime.datetime.fromtimestamp(min(times), datetime.timezone.utc)
    if stamp is None:
        stamp = datetime.datetime.fromtimestamp(os.path.getmtime(run.path), datetime.timezone.utc)
    return stamp.isoformat()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"


def eval_log(run: Run):
    """The run as an `inspect_ai.log.EvalLog` (status success, one sample per counted trial)."""
    _require()
    from inspect_ai.log import EvalConfig, EvalDataset, EvalLog, EvalSample, EvalSpec, EvalStats
    from inspect_ai.model import ChatMessageAssistant, ModelOutput
    fields = _trial_fields(run)
    model_name = str(run.metadata.get("model") or "unknown")
    model = f"{'replication_405b' if run.format == FORMAT_405B else 'jax_introspect'}/{model_name}"
    samples = []
    for f in fields:
        row, response = f["row"], f["response"]
        prompt_messages = _messages(f["turns"], model)
        stop = "stop" if f["finished"] in (True, None) else "max_tokens"
        samples.append(EvalSample(
            id=row.trial_id, epoch=1, input=prompt_messages,
            target=row.word if row.kind == "injected" and row.word else "",
            messages=prompt_messages + [ChatMessageAssistant(content=response, model=model)],
            output=ModelOutput.from_content(model=model, content=response, stop_reason=stop),
            scores=_scores(row, f["notes"], response), metadata=f["metadata"]))
    created = _created(run, fields)
    digest = hashlib.sha256(f"{run.metadata.get('source')}|{created}|{len(fields)}".encode()).hexdigest()[:22]
    meta = {k: v for k, v in run.metadata.items() if k != "config"}
    meta["config"] = run.metadata.get("config")
    spec = EvalSpec(
        eval_id=digest, run_id=digest, created=created, task=_safe(run.name),
        task_display_name=f"introspection: {run.name}",
        task_description=f"Concept-injection introspection trials of {run.path} ({run.format})",
        dataset=EvalDataset(name=", ".join(run.metadata.get("protocols", [])) or run.name,
                            location=str(run.metadata.get("source")), samples=len(samples),
                            sample_ids=[s.id for s in samples], shuffled=False),
        model=model, config=EvalConfig(), metadata=json.loads(json.dumps(meta, default=str)),
        tags=[run.format])
    return EvalLog(version=2, status="success", eval=spec, results=_results(fields),
                   stats=EvalStats(started_at=created, completed_at=created), samples=samples)


def log_file_name(run: Run, log) -> str:
    """Inspect's own naming: <created>_<task>_<id>.eval."""
    stamp = log.eval.created.replace(":", "-")
    stamp = re.sub(r"\.\d+", "", stamp)
    return f"{stamp}_{_safe(run.name)}_{log.eval.eval_id}.eval"


def export(run: Run, log_dir: str) -> str:
    """Write `run` as an .eval file into `log_dir`; return its path."""
    _require()
    from inspect_ai.log import write_eval_log
    log = eval_log(run)
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, log_file_name(run, log))
    write_eval_log(log, path, format="eval")
    return path


# ----------------------------------------------------------------------------------------------
# A viewer bundle that opens from disk

# `inspect view bundle` writes a viewer for an HTTP server: opened from disk (file://) a browser runs none
# of it, as Chromium loads no ES module (the viewer's code) from a file:// page and no browser fetch()es
# a file:// URL (its logs). So the bundle is rewritten to need neither:
#   * modules.js (a classic script, which a file:// page may load) holds the viewer's modules as text, in
#     dependency order, `import.meta.url` and worker URLs rewritten; offline.js turns each into a blob:
#     URL (its imports of "./x.js" pointing at x's blob) and imports the entry one;
#   * logs/embedded.js holds every file of logs/ base64-encoded, and offline.js answers the viewer's
#     fetch() of them (Range requests too) as a server would, and of the blob: URLs it made (the viewer
#     fetches its worker scripts to start them from blobs);
#   * workers start as classic workers (the viewer's worker scripts are self-contained), which a page
#     opened from disk may start from blob: URLs;
#   * the page's Content-Security-Policy gains `blob:` for scripts and workers, nothing else.
# Served over HTTP the same files work as they are.
MODULES_JS = "modules.js"
OFFLINE_JS = "offline.js"
_MODULE_REF = re.compile(r"""(["'])\./([\w.-]+\.js)\1""")
_WORKER_URL = re.compile(r"""new URL\((["'])([\w.-]+\.worker\.js)\1, import\.meta\.url\)""")

OFFLINE = r"""// jax_introspect: runs this Inspect viewer from disk (file://) with no server; see inspect_log.py.
(function () {
  var files = window.__JAX_INTROSPECT_LOGS__ || {};
  var logs = new URL("logs/", document.baseURI).href;
  var cache = {}, texts = {}, blobs = globalThis.__JAX_INTROSPECT_BLOBS__ = {};
  globalThis.__JAX_INTROSPECT_ASSETS_URL__ = new URL("assets/index.js", document.baseURI).href;
  function bytes(name) {
    if (!cache[name]) {
      var s = atob(files[name]), b = new Uint8Array(s.length);
      for (var i = 0; i < s.length; i++) b[i] = s.charCodeAt(i);
      cache[name] = b;
    }
    return cache[name];
  }
  function logResponse(name, init) {
    if (!Object.prototype.hasOwnProperty.call(files, name)) return new Response("not found", {status: 404});
    var data = bytes(name), method = ((init && init.method) || "GET").toUpperCase();
    var type = /\.json$/.test(name) ? "application/json" : "application/zip";
    var all = {"Content-Length": String(data.length), "Accept-Ranges": "bytes", "Content-Type": type};
    if (method === "HEAD") return new Response(null, {status: 200, headers: all});
    var m = /bytes=(\d+)-(\d*)/.exec(new Headers((init && init.headers) || {}).get("Range") || "");
    if (!m) return new Response(data.slice(), {status: 200, headers: all});
    var start = Number(m[1]), end = m[2] ? Math.min(Number(m[2]), data.length - 1) : data.length - 1;
    return new Response(data.slice(start, end + 1), {status: 206, headers: {
      "Content-Range": "bytes " + start + "-" + end + "/" + data.length, "Accept-Ranges": "bytes",
      "Content-Length": String(end - start + 1), "Content-Type": type}});
  }
  var pageFetch = window.fetch.bind(window);
  window.fetch = function (input, init) {
    var url = typeof input === "string" ? input : (input && input.url) || String(input);
    if (Object.prototype.hasOwnProperty.call(texts, url)) {
      return Promise.resolve(new Response(texts[url], {status: 200, headers: {"Content-Type": "text/javascript"}}));
    }
    var href;
    try { href = new URL(url, document.baseURI).href; } catch (e) { return pageFetch(input, init); }
    if (href.indexOf(logs) !== 0) return pageFetch(input, init);
    return Promise.resolve(logResponse(decodeURIComponent(href.slice(logs.length).split(/[?#]/)[0]), init));
  };
  var PageWorker = window.Worker;
  window.Worker = function (url, options) {
    return new PageWorker(url, Object.assign({}, options || {}, {type: "classic"}));
  };
  (window.__JAX_INTROSPECT_MODULES__ || []).forEach(function (module) {
    var text = module[1].replace(/(["'])\.\/([\w.-]+\.js)\1/g, function (all, quote, name) {
      return blobs[name] ? quote + blobs[name] + quote : all;
    });
    blobs[module[0]] = URL.createObjectURL(new Blob([text], {type: "text/javascript"}));
    texts[blobs[module[0]]] = text;
  });
  function start() {
    import(blobs["index.js"]).catch(function (e) { console.error("jax_introspect: the viewer did not load", e); });
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start); else start();
})();
"""


def _module_order(modules: dict) -> list:
    """Module names, each after the modules it imports (statically, dynamically or as a worker)."""
    deps = {name: {m.group(2) for m in _MODULE_REF.finditer(text) if m.group(2) in modules and m.group(2) != name}
            | {m.group(2) for m in _WORKER_URL.finditer(text) if m.group(2) in modules}
            for name, text in modules.items()}
    order, state = [], {}

    def visit(name, path):
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise ReportError(f"the Inspect viewer's modules import each other in a cycle ({' -> '.join(path)}); "
                              "this inspect_ai version cannot be made to open from disk")
        state[name] = "visiting"
        for dep in sorted(deps[name]):
            visit(dep, path + [dep])
        state[name] = "done"
        order.append(name)

    for name in sorted(modules):
        visit(name, [name])
    return order


def _edit_index(html: str, css: list) -> str:
    """index.html without its module script and preloads, loading the offline scripts instead."""
    def replace(pattern, new, text, what):
        text, n = re.subn(pattern, new, text, flags=re.S)
        if not n:
            raise ReportError(f"the Inspect viewer's index.html has no {what}; this inspect_ai version bundles "
                              f"differently from {INSPECT_EXTRA_PIN} (pip install 'jax_introspect[inspect]')")
        return text
    html = replace(r'\s*<script type="module" crossorigin src="\./assets/index\.js"></script>', "", html,
                   "module script")
    html = re.sub(r'\s*<link rel="modulepreload"[^>]*>', "", html)
    html = html.replace('<link rel="stylesheet" crossorigin ', '<link rel="stylesheet" ')
    html = replace(r"script-src 'self'", "script-src 'self' blob:", html, "script-src policy")
    html = replace(r"worker-src 'self'", "worker-src 'self' blob:", html, "worker-src policy")
    # The bundle names the folder it was made from (a staging folder here): the relative dir is enough.
    html = replace(r'<script id="log_dir_context" type="application/json">.*?</script>',
                   '<script id="log_dir_context" type="application/json">{"log_dir": "logs"}</script>', html,
                   "log_dir_context")
    links = "".join(f'    <link rel="stylesheet" href="./assets/{name}">\n' for name in css if f"./assets/{name}" not in html)
    scripts = (f'    <script src="./logs/{EMBEDDED_JS}"></script>\n    <script src="./{MODULES_JS}"></script>\n'
               f'    <script src="./{OFFLINE_JS}"></script>\n')
    return replace(r"</head>", links + scripts + "  </head>", html, "</head>")


INSPECT_EXTRA_PIN = "inspect-ai==0.3.285"


def make_bundle(log_dir: str, viewer_dir: str) -> str:
    """`inspect view bundle` of `log_dir` into `viewer_dir` (replaced), rewritten to open from disk with
    no server (see above). Returns index.html's path."""
    _require()
    from inspect_ai.log._bundle import bundle_log_dir  # what `inspect view bundle` calls
    if os.path.exists(viewer_dir):
        shutil.rmtree(viewer_dir)
    with contextlib.redirect_stdout(io.StringIO()):  # its progress display
        bundle_log_dir(log_dir=log_dir, output_dir=viewer_dir, overwrite=True)
    logs = os.path.join(viewer_dir, "logs")
    files = {}
    for name in sorted(os.listdir(logs)):
        with open(os.path.join(logs, name), "rb") as f:
            files[name] = base64.b64encode(f.read()).decode("ascii")
    with open(os.path.join(logs, EMBEDDED_JS), "w") as f:
        f.write("window.__JAX_INTROSPECT_LOGS__ = " + json.dumps(files) + ";\n")

    assets = os.path.join(viewer_dir, "assets")
    modules = {}
    for name in sorted(os.listdir(assets)):
        if name.endswith(".js"):
            with open(os.path.join(assets, name), encoding="utf-8") as f:
                modules[name] = f.read()
    if "index.js" not in modules:
        raise ReportError(f"{assets}: no index.js; this inspect_ai version bundles differently from {INSPECT_EXTRA_PIN}")
    ordered = []
    for name in _module_order(modules):
        text = _WORKER_URL.sub(lambda m: f'new URL(globalThis.__JAX_INTROSPECT_BLOBS__["{m.group(2)}"])', modules[name])
        ordered.append([name, text.replace("import.meta.url", "globalThis.__JAX_INTROSPECT_ASSETS_URL__")])
    with open(os.path.join(viewer_dir, MODULES_JS), "w", encoding="utf-8") as f:
        f.write("window.__JAX_INTROSPECT_MODULES__ = " + json.dumps(ordered) + ";\n")
    for name in modules:  # now in modules.js
        os.remove(os.path.join(assets, name))
    with open(os.path.join(viewer_dir, OFFLINE_JS), "w") as f:
        f.write(OFFLINE)
    index = os.path.join(viewer_dir, "index.html")
    with open(index, encoding="utf-8") as f:
        html = f.read()
    html = _edit_index(html, sorted(n for n in os.listdir(assets) if n.endswith(".css")))
    with open(index, "w", encoding="utf-8") as f:
        f.write(html)
    return index


def write_logs(runs: list, folder: str) -> dict:
    """The report folder's Inspect files: each run's .eval under folder/inspect_logs and the viewer
    under folder/inspect_viewer. Returns {"logs": [relative paths], "viewer": relative index.html}."""
    log_dir = os.path.join(folder, LOGS_DIR)
    paths = [export(run, log_dir) for run in runs]
    index = make_bundle(log_dir, os.path.join(folder, VIEWER_DIR))
    return {"logs": [os.path.relpath(p, folder) for p in paths], "viewer": os.path.relpath(index, folder)}
