"""Hosted judges (`api:anthropic:<model>`, `api:openai:<model>`) on the official SDKs.

The `anthropic` and `openai` packages are the optional extra `pip install 'jax_introspect[api]'`;
without them `check_provider` (run by `grading.check_grader` before any model loads) and
`make_grader` raise GradingError naming that command.

- Anthropic Messages API through `anthropic.Anthropic` (SDK 2.x: API version 2026-10-21, key in
  `Authorization: Bearer`); key from ANTHROPIC_API_KEY; default base_url https://api.anthropic.com.
  That API version rejects `temperature`, so none is sent.
- OpenAI chat completions (or any server speaking it, e.g. vLLM) through `openai.OpenAI`, at
  temperature 0; key from OPENAI_API_KEY; default base_url https://api.openai.com/v1.
  A base_url with or without the trailing /v1 is accepted for both.

Each grader prompt is one user message. HTTP failures are the SDK's to retry (`max_retries`:
429, 408, 409 and 5xx, timeouts and connection errors, with its exponential backoff or the
server's Retry-After); other HTTP errors (400, 401, 403, 404, ...) fail at once. A reply that
arrives but cannot be used (not JSON, missing fields, no YES/NO answer) is asked again, up to
`max_retries` times. A failure raises GradingError naming the trial, the criterion and the cause,
with `.partial` = the grades of the requests before it (in order). The key is read from the
environment only, is handed to the SDK only, and is scrubbed from every message this module
produces.

`SdkJudge` holds what every hosted judge shares (client, key, SDK errors, order, workers);
`ApiJudge` asks the paper's prompts; `replication_judge.ApiReplicationJudge` makes the 405B
replication's structured call.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib
import json
import os
from typing import Callable, Optional, Sequence, TypeVar

from jax_introspect.experiment.grading import GradeRequest, Grader, GradingError, progress_bar
from jax_introspect.experiment.grading.llm_judge import PromptJudge, judge_prompts, parse_yes_no, tail

INSTALL_HINT = "pip install 'jax_introspect[api]'"
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Provider:
    sdk: str  # the SDK's module name
    client: str  # its synchronous client class
    base_error: str  # the root of its exception classes
    env: str  # the only place the key is read from
    base_url: str
    path: str  # where the SDK posts, relative to base_url (for messages only)


PROVIDERS = {
    "anthropic": Provider("anthropic", "Anthropic", "AnthropicError", "ANTHROPIC_API_KEY",
                          "https://api.anthropic.com", "/v1/messages"),
    "openai": Provider("openai", "OpenAI", "OpenAIError", "OPENAI_API_KEY",
                       "https://api.openai.com/v1", "/chat/completions"),
}


class UnusableReply(Exception):
    """A reply that arrived but cannot be used (not JSON, no text, no answer); worth asking again."""


def provider_spec(provider: str) -> Provider:
    if provider not in PROVIDERS:
        raise ValueError(f"unknown API provider {provider!r}; known: {sorted(PROVIDERS)}")
    return PROVIDERS[provider]


def import_sdk(provider: str):
    """The provider's SDK module, or GradingError naming the install command."""
    spec = provider_spec(provider)
    try:
        return importlib.import_module(spec.sdk)
    except ImportError as e:
        raise GradingError(f"the api:{provider} grader needs the {spec.sdk} SDK, an optional extra: "
                           f"{INSTALL_HINT}") from e


def check_provider(provider: str) -> str:
    """The provider's API key from the environment, after checking its SDK is installed; else an
    error naming the fix (the package to install or the variable to set)."""
    import_sdk(provider)
    env = provider_spec(provider).env
    key = os.environ.get(env, "").strip()
    if not key:
        raise GradingError(f"the api:{provider} grader reads its API key from the environment variable {env}, "
                           f"which is not set: export {env}=... or choose another grader")
    return key


def sdk_base_url(provider: str, base_url: Optional[str]) -> str:
    """The base URL in the form the SDK wants: Anthropic's SDK appends /v1/messages, OpenAI's
    /chat/completions (so its base ends in /v1)."""
    base = (base_url or provider_spec(provider).base_url).rstrip("/")
    bare = base[:-3] if base.endswith("/v1") else base
    return bare if provider == "anthropic" else bare + "/v1"


def anthropic_text(message) -> str:
    """The text of a Messages reply. The SDK builds its objects without validating them, so a
    reply missing fields arrives with None in their place."""
    blocks = getattr(message, "content", None)
    texts = [getattr(b, "text", None) for b in blocks if getattr(b, "type", None) == "text"] \
        if isinstance(blocks, list) else []
    if not texts or not all(isinstance(t, str) for t in texts):
        raise UnusableReply("malformed reply: no text block")
    return "".join(texts)


def openai_text(completion) -> str:
    """The text of a chat completion (see anthropic_text on missing fields)."""
    choices = getattr(completion, "choices", None)
    message = getattr(choices[0], "message", None) if isinstance(choices, list) and choices else None
    text = getattr(message, "content", None)
    if not isinstance(text, str):
        raise UnusableReply("malformed reply: no choices[0].message.content text")
    return text


def attempts_made(error) -> int:
    """How many attempts the SDK made before raising `error`: it numbers each attempt's request
    with the x-stainless-retry-count header."""
    request = getattr(error, "request", None)
    try:
        return int(request.headers.get("x-stainless-retry-count", 0)) + 1
    except (AttributeError, TypeError, ValueError):
        return 1


class SdkJudge(Grader):
    """A judge behind a provider's SDK: the client, the key kept out of every message, SDK errors
    turned into GradingError, and grading in request order (optionally on a thread pool).
    Subclasses implement `_grade_one(request) -> grade dict or None`."""

    def __init__(self, provider: str, model: str, base_url: Optional[str] = None, timeout_s: float = 120.0,
                 max_retries: int = 5, max_tokens: int = 1024, workers: int = 1, name: Optional[str] = None):
        key = check_provider(provider)
        if max_retries < 0 or timeout_s <= 0 or workers < 1 or max_tokens < 1:
            raise ValueError("need max_retries >= 0, timeout_s > 0, workers >= 1 and max_tokens >= 1")
        self.provider, self.model = provider, model
        self.name = name or f"api:{provider}:{model}"
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.max_tokens = int(max_tokens)
        self.workers = int(workers)
        self.__key = key
        spec, self._sdk = provider_spec(provider), import_sdk(provider)
        base = sdk_base_url(provider, base_url)
        self.url = base + spec.path
        # One client for all workers (its HTTP pool is thread-safe); base_url is always given so
        # ANTHROPIC_BASE_URL / OPENAI_BASE_URL never redirect the key.
        self._client = getattr(self._sdk, spec.client)(api_key=key, base_url=base, timeout=self.timeout_s,
                                                        max_retries=self.max_retries)
        self._sdk_error = getattr(self._sdk, spec.base_error)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} at {self.url}>"

    # ---- one call -----------------------------------------------------------------------------

    def _scrub(self, text) -> str:
        return str(text).replace(self.__key, "[API key]")

    def _safe_cause(self, error: BaseException) -> Optional[BaseException]:
        """The error to chain as the cause, or None when its text holds the key (a server echoing
        it back), so that no traceback prints it."""
        return None if self.__key in str(error) else error

    def _describe_sdk_error(self, error) -> str:
        """What went wrong, for an error the SDK raised once its retries were spent (or at once,
        for an error it does not retry)."""
        attempts = attempts_made(error)
        tried = f"{attempts} attempt{'s' if attempts > 1 else ''}"
        if isinstance(error, self._sdk.APIStatusError):
            body = error.body if error.body is not None else error.response.text
            return f"HTTP {error.status_code} from {self.url} ({tried}): {tail(str(body), 200)}"
        if isinstance(error, self._sdk.APITimeoutError):
            return f"timed out after {self.timeout_s:g} s ({tried})"
        if isinstance(error, self._sdk.APIConnectionError):
            reason = f"{type(error.__cause__).__name__}: {error.__cause__}" if error.__cause__ else str(error)
            return f"connection to {self.url} failed ({tried}): {reason}"
        return f"{type(error).__name__}: {error}"

    def _call(self, what: str, request: Callable[[], T]) -> T:
        """One SDK call (the SDK retries HTTP failures itself). A body that is not JSON is an
        UnusableReply (worth asking again); an SDK error, its retries spent, is a GradingError."""
        try:
            return request()
        except json.JSONDecodeError as e:  # the SDK parses the body with json and lets this through
            raise UnusableReply(f"malformed reply: not JSON ({tail(e.doc, 60)!r})") from e
        except self._sdk_error as e:
            raise GradingError(self._scrub(f"{what}: {self._describe_sdk_error(e)}")) from self._safe_cause(e)

    # ---- grading ------------------------------------------------------------------------------

    def _grade_one(self, request: GradeRequest) -> Optional[dict]:
        raise NotImplementedError

    def grade(self, requests: Sequence[GradeRequest], progress: bool = False) -> list[Optional[dict]]:
        """Grades (or None, see `Grader.grade`) in request order. On failure raises GradingError
        whose `.partial` holds the entries of all requests before the failed one (so they can be
        saved)."""
        grades: list[Optional[dict]] = []
        bar = progress_bar(len(requests), progress, self.name)
        pool = concurrent.futures.ThreadPoolExecutor(self.workers) if self.workers > 1 else None
        try:
            if pool is None:
                results = (self._grade_one(r) for r in requests)
            else:
                futures = [pool.submit(self._grade_one, r) for r in requests]
                results = (f.result() for f in futures)
            for request in requests:
                try:
                    grades.append(next(results))
                except GradingError as e:  # raised again with its cause, plus the grades done so far
                    e.partial, e.trial_id = list(grades), request.trial_id
                    raise
                bar.update(1)
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        return grades


class ApiJudge(SdkJudge, PromptJudge):
    """`api:<provider>:<model>`: the paper's grader prompts, one user message each, YES/NO parsed."""

    def _reply(self, prompt: str, what: str) -> str:
        """One SDK call -> the reply text."""
        messages = [{"role": "user", "content": prompt}]
        if self.provider == "anthropic":
            return anthropic_text(self._call(what, lambda: self._client.messages.create(
                model=self.model, max_tokens=self.max_tokens, messages=messages)))
        return openai_text(self._call(what, lambda: self._client.chat.completions.create(
            model=self.model, max_tokens=self.max_tokens, temperature=0, messages=messages)))

    def _answer(self, prompt: str, what: str) -> bool:
        text = self._reply(prompt, what)
        answer = parse_yes_no(text)
        if answer is None:
            raise UnusableReply(f"no YES/NO answer at the end of the reply ({tail(text)!r})")
        return answer

    def ask(self, prompt: str, what: str) -> bool:
        """The judge's YES/NO to one prompt. An unusable reply is asked again up to max_retries
        times; an SDK error (its own retries spent) is a GradingError at once."""
        for _ in range(self.max_retries + 1):
            try:
                return self._answer(prompt, what)
            except UnusableReply as e:
                last = e
        raise GradingError(self._scrub(f"{what}: no usable reply in {self.max_retries + 1} attempts; "
                                       f"last: {last}")) from self._safe_cause(last)

    def _grade_one(self, request: GradeRequest) -> dict:
        verdicts = {c: self.ask(p, f"trial {request.trial_id} ({c}, {self.name})") for c, p in judge_prompts(request)}
        return self._assemble(request, verdicts)
