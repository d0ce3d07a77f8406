"""The VLM judge in this process: a transformers image-text-to-text model (Qwen2.5-VL, Qwen3-VL, ...) asked
the same questions as the served judge (`uniref.rewards.judge`), batched."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from uniref.rewards.judge import AXES, JudgeBase, JudgeError, Query
from uniref.rewards.prompts import JudgeReplyError, parse_score

__all__ = ["LocalVLMJudge"]


class LocalVLMJudge(JudgeBase):
    """A judge run in-process through ``AutoModelForImageTextToText`` + ``AutoProcessor``.

    Args:
        path: a local model folder (nothing is downloaded); its name is the judge's id.
        axes, mode: see `uniref.rewards.judge.JudgeBase`. ``"yesno"`` reads P(Yes) from one forward pass
            (the next-token probabilities of the first token of "Yes" and of "No"); ``"score"`` generates
            a VIEScore JSON reply greedily and parses it.
        device, dtype: where and in what precision the model runs.
        batch_size: questions per forward pass (left-padded).
        max_new_tokens: the reply length in ``"score"`` mode.
        model, processor: already loaded objects to use instead of loading them from `path` (a processor
            object is also how to pass one that `AutoProcessor` cannot build in this environment).
    """

    def __init__(
        self,
        path: str | None = None,
        axes: Sequence[str] = AXES,
        mode: str = "yesno",
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        batch_size: int = 8,
        max_new_tokens: int = 256,
        model=None,
        processor=None,
    ):
        super().__init__(axes, mode)
        if path is None and (model is None or processor is None):
            raise ValueError("vlm_judge_local needs path (a local model folder) or both model and processor")
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if model is None:
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, local_files_only=True)
        if processor is None:
            processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.to(device=device, dtype=dtype).eval()
        self.processor, self.device = processor, torch.device(device)
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.judge_id = str(path or getattr(model.config, "_name_or_path", type(model).__name__))
        tok = processor.tokenizer
        tok.padding_side = "left"  # the next token of every row is then at the last position
        self._yes_no = [tok.encode(w, add_special_tokens=False)[0] for w in ("Yes", "No")]
        if self._yes_no[0] == self._yes_no[1]:
            raise ValueError("the tokenizer gives 'Yes' and 'No' the same first token; use mode='score'")
        if getattr(processor, "chat_template", None) is None:
            raise ValueError(f"the processor of {self.judge_id} has no chat template; save one with the model")

    def _inputs(self, queries: list[Query]):
        texts = [
            self.processor.apply_chat_template(
                [
                    {
                        "role": "user",
                        "content": [*({"type": "image"} for _ in q.images), {"type": "text", "text": q.text}],
                    }
                ],
                add_generation_prompt=True,
                tokenize=False,
            )
            for q in queries
        ]
        images = [im for q in queries for im in q.images]
        return self.processor(text=texts, images=images, padding=True, return_tensors="pt").to(self.device)

    @torch.inference_mode()
    def _batch(self, queries: list[Query]) -> list[float]:
        if self.mode == "score":
            return self.ask(queries, lambda text: parse_score(text) / 10.0)
        inputs = self._inputs(queries)
        logits = self.model(**inputs).logits[:, -1, self._yes_no].float()
        return logits.softmax(-1)[:, 0].tolist()

    @torch.inference_mode()
    def ask(self, queries: list[Query], parse) -> list:
        """Each question's generated reply (greedy, ``max_new_tokens``) read by ``parse: str -> value``; a
        reply it cannot read (`JudgeReplyError`) is an error naming this judge and the reply."""
        values = []
        for i in range(0, len(queries), self.batch_size):
            inputs = self._inputs(queries[i : i + self.batch_size])
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            for reply in self.processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True):
                try:
                    values.append(parse(reply))
                except JudgeReplyError as e:
                    raise JudgeError(
                        f"vlm_judge_local: {self.judge_id} gave no valid judgement ({e}); reply: {reply[:300]!r}"
                    ) from None
        return values

    def score_queries(self, queries: list[Query]) -> list[float]:
        return [
            v for i in range(0, len(queries), self.batch_size) for v in self._batch(queries[i : i + self.batch_size])
        ]
