"""Hosted judges over HTTP (`api:anthropic:<model>`, `api:openai:<model>`), standard library only.

- Anthropic Messages API: POST {base_url}/v1/messages, headers `x-api-key` and
  `anthropic-version: 2023-06-01`; key from ANTHROPIC_API_KEY; default base_url
  https://api.anthropic.com.
- OpenAI chat completions (or any server speaking it, e.g. vLLM): POST
  {base_url}/v1/chat/completions, header `Authorization: Bearer <key>`; key from OPENAI_API_KEY;
  default base_url https://api.openai.com. A base_url ending in /v1 is accepted as well.

Each grader prompt is one user message, temperature 0. A call is retried, with exponential
backoff (`backoff_s` * 2^attempt, at most 60 s, or the server's Retry-After when longer), on HTTP
429 and 5xx, timeouts and connection errors, malformed replies (bad JSON, missing fields) and
replies without a YES/NO answer; other HTTP errors (400, 401, 403, 404, ...) fail at once. After
`max_retries` retries `grade` raises GradingError naming the trial, the criterion and the last
failure, with `.partial` = the grades of the requests before it (in order). The key is read from
the environment only, is sent only in its header, and is scrubbed from every message this
module produces.
"""
from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import random
import socket
import time
import urllib.error
import urllib.request
from typing import Optional, Sequence

from jax_introspect.experiment.grading import GradeRequest, GradingError, progress_bar
from jax_introspect.experiment.grading.llm_judge import PromptJudge, judge_prompts, parse_yes_no, tail

PROVIDERS = {
    "anthropic": {"env": "ANTHROPIC_API_KEY", "base_url": "https://api.anthropic.com", "path": "/v1/messages"},
    "openai": {"env": "OPENAI_API_KEY", "base_url": "https://api.openai.com", "path": "/v1/chat/completions"},
}
ANTHROPIC_VERSION = "2023-06-01"
MAX_BACKOFF_S = 60.0


class _Retryable(Exception):
    """A failed attempt worth repeating; the message says why (never holds the key)."""

    def __init__(self, message: str, retry_after: float = 0.0):
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(error: urllib.error.HTTPError) -> float:
    try:
        return min(MAX_BACKOFF_S, max(0.0, float(error.headers.get("Retry-After", 0) or 0)))
    except (TypeError, ValueError):
        return 0.0


def check_provider(provider: str) -> str:
    """The provider's API key from the environment, or an error naming the variable to set."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown API provider {provider!r}; known: {sorted(PROVIDERS)}")
    env = PROVIDERS[provider]["env"]
    key = os.environ.get(env, "").strip()
    if not key:
        raise GradingError(f"the api:{provider} grader reads its API key from the environment variable {env}, "
                           f"which is not set: export {env}=... or choose another grader")
    return key


class ApiJudge(PromptJudge):
    def __init__(self, provider: str, model: str, base_url: Optional[str] = None, timeout_s: float = 120.0,
                 max_retries: int = 5, backoff_s: float = 2.0, max_tokens: int = 1024, workers: int = 1):
        key = check_provider(provider)
        spec = PROVIDERS[provider]
        if max_retries < 0 or timeout_s <= 0 or workers < 1:
            raise ValueError("need max_retries >= 0, timeout_s > 0 and workers >= 1")
        self.provider, self.model = provider, model
        self.name = f"api:{provider}:{model}"
        base = (base_url or spec["base_url"]).rstrip("/")
        if base.endswith("/v1"):
            base = base[:-3]
        self.url = base + spec["path"]
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.max_tokens = int(max_tokens)
        self.workers = int(workers)
        self.__key = key

    def __repr__(self) -> str:
        return f"<ApiJudge {self.name} at {self.url}>"

    # ---- one HTTP call ------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        return str(text).replace(self.__key, "[API key]") if self.__key else str(text)

    def _request(self, prompt: str) -> urllib.request.Request:
        message = [{"role": "user", "content": prompt}]
        if self.provider == "anthropic":
            body = {"model": self.model, "max_tokens": self.max_tokens, "temperature": 0, "messages": message}
            headers = {"x-api-key": self.__key, "anthropic-version": ANTHROPIC_VERSION}
        else:
            body = {"model": self.model, "max_tokens": self.max_tokens, "temperature": 0, "messages": message}
            headers = {"Authorization": f"Bearer {self.__key}"}
        headers["content-type"] = "application/json"
        return urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")

    def _reply_text(self, payload: dict) -> str:
        if self.provider == "anthropic":
            blocks = payload.get("content")
            if not isinstance(blocks, list):
                raise _Retryable("malformed reply: no 'content' list")
            texts = [b.get("text") for b in blocks if isinstance(b, dict) and b.get("type") == "text"]
            if not texts or not all(isinstance(t, str) for t in texts):
                raise _Retryable("malformed reply: no text block")
            return "".join(texts)
        try:
            text = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise _Retryable("malformed reply: no choices[0].message.content") from None
        if not isinstance(text, str):
            raise _Retryable("malformed reply: message content is not text")
        return text

    def _attempt(self, prompt: str) -> tuple[bool, str]:
        try:
            with urllib.request.urlopen(self._request(prompt), timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = tail(e.read().decode("utf-8", "replace"), 200) if e.fp is not None else ""
            if e.code == 429 or e.code >= 500:
                raise _Retryable(f"HTTP {e.code} {detail}".strip(), _retry_after(e)) from None
            raise GradingError(f"HTTP {e.code} from {self.url}: {detail}") from None
        except (socket.timeout, TimeoutError):
            raise _Retryable(f"timed out after {self.timeout_s:g} s") from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise _Retryable(f"timed out after {self.timeout_s:g} s") from None
            raise _Retryable(f"connection failed: {reason}") from None
        except (http.client.HTTPException, ConnectionError, OSError) as e:
            raise _Retryable(f"connection failed: {type(e).__name__}: {e}") from None
        try:
            payload = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _Retryable(f"malformed reply: not JSON ({tail(raw.decode('utf-8', 'replace'), 60)!r})") from None
        if not isinstance(payload, dict):
            raise _Retryable("malformed reply: not a JSON object")
        text = self._reply_text(payload)
        answer = parse_yes_no(text)
        if answer is None:
            raise _Retryable(f"no YES/NO answer at the end of the reply ({tail(text)!r})")
        return answer, text

    def ask(self, prompt: str, what: str) -> bool:
        """The judge's YES/NO to one prompt, retried; GradingError after max_retries retries."""
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            retry_after = 0.0
            try:
                return self._attempt(prompt)[0]
            except _Retryable as e:
                last, retry_after = self._scrub(e), e.retry_after
            except GradingError as e:
                raise GradingError(f"{what}: {self._scrub(e)}") from None
            if attempt < self.max_retries:
                delay = max(retry_after, min(MAX_BACKOFF_S, self.backoff_s * 2 ** attempt))
                time.sleep(delay * (1 + 0.1 * random.random()))
        raise GradingError(f"{what}: failed after {self.max_retries + 1} attempts; last failure: {last}")

    # ---- grading ------------------------------------------------------------------------------

    def _grade_one(self, request: GradeRequest) -> dict:
        verdicts = {c: self.ask(p, f"trial {request.trial_id} ({c}, {self.name})") for c, p in judge_prompts(request)}
        return self._assemble(request, verdicts)

    def grade(self, requests: Sequence[GradeRequest], progress: bool = False) -> list[dict]:
        """Grades in request order. On failure raises GradingError whose `.partial` holds the
        grades of all requests before the failed one (so they can be saved)."""
        grades: list[dict] = []
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
                except GradingError as e:
                    raise GradingError(self._scrub(e), partial=grades, trial_id=request.trial_id) from None
                except Exception as e:  # never lose the grades done so far
                    raise GradingError(f"trial {request.trial_id} ({self.name}): {type(e).__name__}: "
                                       f"{self._scrub(e)}", partial=grades, trial_id=request.trial_id) from None
                bar.update(1)
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        return grades
