"""VLM judges: the questions each record asks, and the served judge behind ``/v1/chat/completions``.

Each record asks (for the axes chosen): one ``instruction`` question over all its references and the output,
one ``consistency`` question per reference (the output against that reference alone; the per-reference
scores are aggregated into ``consistency_mean`` and ``consistency_min``), and one ``quality`` question over
the output alone. Scores 0-10 are divided by 10, so every axis lies in [0, 1].

The served judge is how RL trainers for image models call large judges (Flow-GRPO, Flow-Factory, Edit-R1's
``reward_server.py``, EditScore): a separate vLLM / SGLang process, many requests in flight at once.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from uniref.rewards.prompts import (
    TEMPLATES,
    YESNO_TEMPLATES,
    JudgeReplyError,
    parse_score,
    yes_probability,
)
from uniref.rewards.records import Record, check_images, image_hash, png_bytes, to_pil

__all__ = ["AXES", "JudgeBase", "JudgeError", "Query", "VLMJudge"]

AXES = ("instruction", "consistency", "quality")
_NAMES = {
    "instruction": ("instruction",),
    "consistency": ("consistency_mean", "consistency_min"),
    "quality": ("quality",),
}


class JudgeError(RuntimeError):
    """The judge gave no valid judgement after every retry."""


@dataclass
class Query:
    """One question to the judge: a template name, its filled text and its images (references first,
    the output last)."""

    template: str
    text: str
    images: list[Image.Image]


def _fill(template: str, **fields) -> str:
    """The template with its ``{field}`` slots filled (the JSON braces of the reply format stay as they are;
    the prompt is inserted last so braces in it are never read as slots)."""
    for key in sorted(fields, key=lambda k: k == "prompt"):
        template = template.replace("{" + key + "}", str(fields[key]))
    return template


class JudgeBase:
    """The questions and the assembly of answers into ``(N, S)`` rewards, shared by served and local judges.

    Args:
        axes: a subset of ``("instruction", "consistency", "quality")``.
        mode: ``"score"`` (VIEScore JSON replies, 0-10) or ``"yesno"`` (P(Yes) from log-probabilities).
    """

    judge_id = ""  # the judge's model name, part of every cache key and printed beside every number

    def __init__(self, axes: Sequence[str] = AXES, mode: str = "score"):
        axes = tuple(axes)
        bad = [a for a in axes if a not in AXES]
        if bad or not axes:
            raise ValueError(f"axes must be a non-empty subset of {AXES}, got {list(axes)}")
        if mode not in ("score", "yesno"):
            raise ValueError(f"mode must be 'score' or 'yesno', got {mode!r}")
        self.axes, self.mode = axes, mode
        self.names: tuple[str, ...] = tuple(n for a in axes for n in _NAMES[a])

    def queries(self, record: Record, output: Image.Image, index: int = 0) -> list[Query]:
        """The record's questions, in axis order (consistency: one per reference)."""
        templates = TEMPLATES if self.mode == "score" else YESNO_TEMPLATES
        refs = record.references
        out = []
        for axis in self.axes:
            if axis == "instruction":
                out.append(Query(axis, _fill(templates[axis], n_refs=len(refs), prompt=record.prompt), [*refs, output]))
            elif axis == "consistency":
                if not refs:
                    raise ValueError(f"records[{index}] has no references; drop 'consistency' from axes")
                text = _fill(templates[axis], prompt=record.prompt)
                out += [Query(axis, text, [ref, output]) for ref in refs]
            else:
                out.append(Query(axis, templates[axis], [output]))
        return out

    def score_queries(self, queries: list[Query]) -> list[float]:
        """Each question's value in [0, 1], in order."""
        raise NotImplementedError

    def __call__(self, records: Sequence, images: torch.Tensor) -> torch.Tensor:
        """Scores N outputs.

        Args:
            records: N records (``.prompt``, ``.references``; see `uniref.rewards.records`).
            images: float ``(N, 3, H, W)`` in [0, 1].

        Returns:
            float32 ``(N, len(self.names))`` in [0, 1].
        """
        recs = check_images(records, images)
        per_record = [self.queries(r, to_pil(img, f"images[{i}]"), i) for i, (r, img) in enumerate(zip(recs, images))]
        values = self.score_queries([q for qs in per_record for q in qs])
        rows, k = [], 0
        for qs in per_record:
            got = {}
            for q in qs:
                got.setdefault(q.template, []).append(values[k])
                k += 1
            row = []
            for axis in self.axes:
                v = got[axis]
                row += [sum(v) / len(v), min(v)] if axis == "consistency" else v
            rows.append(row)
        return torch.tensor(rows, dtype=torch.float32).reshape(len(recs), len(self.names))


def _run(coro_factory):
    """Runs a coroutine to completion from synchronous code, also when the caller already runs an event
    loop (a notebook): then in a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro_factory())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(coro_factory())).result()


class _DiskCache:
    """One small JSON file per judged question, written atomically; keyed by a sha256."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str):
        path = self._path(key)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())["value"]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # a damaged entry is asked again and rewritten

    def put(self, key: str, value, reply: str) -> None:
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"value": value, "reply": reply}, f)
        os.replace(tmp, path)


_NO_RETRY = {400, 401, 403, 404, 405, 413, 422}  # the request itself is wrong: asking again cannot help


class VLMJudge(JudgeBase):
    """A judge served behind an OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, SGLang, ...).

    Args:
        base_url: the server's root, e.g. ``http://127.0.0.1:8000/v1`` (``/chat/completions`` is appended).
        model: the served model's name (sent in every request and part of the cache key).
        axes, mode: see `JudgeBase`.
        api_key_env: the name of an environment variable holding the API key (never the key itself);
            None sends no key (a local vLLM needs none).
        max_concurrency: requests in flight at once. Every question of one call (all records, all axes) is
            issued together, so a served judge batches them as its scheduler sees fit.
        timeout: seconds per request, from sending it to the whole reply.
        retries: further attempts after a failed one (connection error, timeout, 429/5xx, a reply that is not
            a valid judgement), waiting ``backoff * 2**attempt`` seconds before each.
        cache_dir: a folder for the disk cache (None: no cache); a question already judged by this model
            (same images, same filled prompt) is not sent again.
        max_tokens, temperature: sampling of the reply (greedy by default, so scores repeat).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        axes: Sequence[str] = AXES,
        mode: str = "score",
        api_key_env: str | None = None,
        max_concurrency: int = 16,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 1.0,
        cache_dir: str | None = None,
        max_tokens: int = 512,
        temperature: float = 0.0,
        **unknown,
    ):
        if "api_key" in unknown:
            raise TypeError(
                "vlm_judge takes no api_key; put the key in an environment variable and pass its name as api_key_env"
            )
        if unknown:
            raise TypeError(f"vlm_judge got unknown arguments {sorted(unknown)}")
        super().__init__(axes, mode)
        try:
            import httpx  # noqa: F401
        except ImportError:
            raise ImportError("vlm_judge needs httpx: pip install 'uniref[judge]'") from None
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL such as http://127.0.0.1:8000/v1, got {base_url!r}")
        if max_concurrency < 1 or timeout <= 0 or retries < 0:
            raise ValueError("max_concurrency must be >= 1, timeout > 0 and retries >= 0")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.judge_id = model, model
        self.headers = {}
        if api_key_env is not None:
            key = os.environ.get(api_key_env)
            if not key:
                raise ValueError(f"api_key_env names {api_key_env!r}, which is not set in the environment")
            self.headers["Authorization"] = f"Bearer {key}"
        self.max_concurrency, self.timeout, self.retries, self.backoff = max_concurrency, timeout, retries, backoff
        self.max_tokens, self.temperature = max_tokens, temperature
        self.cache = _DiskCache(cache_dir) if cache_dir is not None else None
        self.requests_sent = 0  # HTTP requests made, retries included
        self._urls: dict[int, tuple[Image.Image, str]] = {}  # holds the image so its id is not reused

    def cache_key(self, query: Query, parser: str = "") -> str:
        """sha256 over (judge model, mode, reply parser, filled prompt, image hashes)."""
        parts = [self.model, self.mode, parser, query.text, *[image_hash(im) for im in query.images]]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def _data_url(self, image: Image.Image) -> str:
        # one output appears in several questions of a call: encode it once (the memo lives for one call)
        key = id(image)
        if key not in self._urls:
            self._urls[key] = (image, "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode())
        return self._urls[key][1]

    def payload(self, query: Query) -> dict:
        """The chat-completions request body: the images as base64 PNG ``image_url`` parts, then the text."""
        content = [{"type": "image_url", "image_url": {"url": self._data_url(im)}} for im in query.images]
        content.append({"type": "text", "text": query.text})
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        if self.mode == "yesno":
            body.update(max_tokens=1, logprobs=True, top_logprobs=20)
        return body

    def value(self, reply: dict) -> float:
        """A chat-completions reply's value in [0, 1]: ``parse_score / 10``, or P(Yes) in yes/no mode."""
        try:
            choice = reply["choices"][0]
            text = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise JudgeReplyError("the reply has no choices[0].message.content") from None
        if self.mode == "score":
            return parse_score(text) / 10.0
        top = ((choice.get("logprobs") or {}).get("content") or [{}])[0].get("top_logprobs")
        if top:
            return yes_probability(top)
        word = (text or "").strip().strip(".").lower()
        if word not in ("yes", "no"):
            raise JudgeReplyError(f"expected Yes or No, got {text!r}")
        return 1.0 if word == "yes" else 0.0

    async def _ask(self, client, sem: asyncio.Semaphore, query: Query, parse, parser: str):
        import httpx

        body = self.payload(query)
        last = "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            async with sem:
                self.requests_sent += 1
                try:
                    # httpx's timeout bounds each phase (connect, each read); wait_for bounds the whole request
                    resp = await asyncio.wait_for(
                        client.post(self.url, json=body, headers=self.headers, timeout=self.timeout), self.timeout
                    )
                except (TimeoutError, httpx.TimeoutException):
                    last = f"no reply within {self.timeout} s"
                    continue
                except httpx.HTTPError as e:
                    last = f"{type(e).__name__}: {e}"
                    continue
            if resp.status_code != 200:
                last = f"HTTP {resp.status_code}: {resp.text[:500]}"
                if resp.status_code in _NO_RETRY:
                    break
                continue
            try:
                reply = resp.json()
            except ValueError:
                last = f"the response body is not JSON: {resp.text[:500]!r}"
                continue
            try:
                value = parse(reply)
            except JudgeReplyError as e:
                last = f"{e} (body: {resp.text[:500]})"
                continue
            if self.cache is not None:
                self.cache.put(self.cache_key(query, parser), value, resp.text[:2000])
            return value
        raise JudgeError(
            f"vlm_judge: {self.url} (model {self.model!r}) gave no valid judgement after "
            f"{attempt + 1} attempt(s); last reply: {last}"
        )

    def score_queries(self, queries: list[Query]) -> list[float]:
        return [float(v) for v in self._gather(queries, self.value, "")]

    def ask(self, queries: list[Query], parse) -> list:
        """Each question's parsed reply text, with this judge's concurrency, retries, timeout and cache.

        Args:
            queries: the questions.
            parse: ``str -> JSON-serializable value``; raises `JudgeReplyError` on a reply it cannot read
                (the question is then asked again, up to the retries). Its qualified name is part of the
                cache key.
        """

        def from_reply(reply: dict):
            try:
                text = reply["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                raise JudgeReplyError("the reply has no choices[0].message.content") from None
            return parse(text)

        return self._gather(queries, from_reply, f"{parse.__module__}.{parse.__qualname__}")

    def _gather(self, queries: list[Query], parse, parser: str) -> list:
        values: list = [None] * len(queries)
        todo = []
        for i, q in enumerate(queries):
            hit = self.cache.get(self.cache_key(q, parser)) if self.cache is not None else None
            if hit is None:
                todo.append(i)
            else:
                values[i] = hit
        if todo:

            async def main():
                import httpx

                sem = asyncio.Semaphore(self.max_concurrency)
                limits = httpx.Limits(max_connections=self.max_concurrency)
                async with httpx.AsyncClient(limits=limits, trust_env=False) as client:
                    tasks = [asyncio.ensure_future(self._ask(client, sem, queries[i], parse, parser)) for i in todo]
                    try:
                        return await asyncio.gather(*tasks)
                    finally:  # the first failure stops the step; the rest are not left running
                        for t in tasks:
                            t.cancel()

            try:
                for i, v in zip(todo, _run(main)):
                    values[i] = v
            finally:
                self._urls.clear()
        return values
