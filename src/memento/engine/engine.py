"""The engine loop: requests in, scheduled steps through the model, tokens and KV accounting out.

``LLMEngine`` owns the pieces (pool, scheduler, runner) and advances every request one step at a
time: requests may be added between steps (continuous batching). ``LLM`` is the one-call API on top.
"""

from __future__ import annotations

import itertools
import logging
import operator
import time
from collections.abc import Callable, Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from memento.chat import tracked_prefix
from memento.engine.kv_pool import KVGeometry, KVPool
from memento.engine.model_runner import ModelRunner
from memento.engine.sampling import SampledToken, SamplingParams, sample_tokens
from memento.engine.scheduler import Scheduler
from memento.engine.sequence import KVStats, Sequence
from memento.format import MementoFormatError, SpecialTokenIds
from memento.masking import CHAT_MEMENTO, BlockCap, MaskConfig, RowLayout, SequenceTracker, check_block_cap
from memento.modeling import check_attention_implementation

logger = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """Engine knobs. ``mask`` is masking.py's whole setting (``keep_last_n=-1`` is vanilla: nothing evicted)."""

    kv_budget_tokens: int = 32768
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    mask: MaskConfig = CHAT_MEMENTO
    assistant_prefix: list[int] | None = None  # default: from the tokenizer's chat template
    max_block_tokens: int | None = None  # force <|block_end|> once a block has this many tokens
    watermark: float = 0.01  # share of the pool kept free when admitting while others run
    keep_logits: bool = False  # keep every sampled step's logits on the outputs (tests, analysis)
    stop_on_format_error: bool | None = None
    """Finish a sequence whose memento structure breaks (finish_reason "format_error"); default:
    :meth:`MaskConfig.stops_on_format_error`. When not stopping, evictions stop at the defect."""

    def __post_init__(self) -> None:
        for name in ("kv_budget_tokens", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        check_block_cap(self.max_block_tokens)
        if not 0 <= self.watermark < 1:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark!r}")
        if not isinstance(self.mask, MaskConfig):
            raise ValueError(f"mask must be a MaskConfig, not {type(self.mask).__name__}")

    @classmethod
    def from_options(cls, **options: Any) -> EngineConfig:
        """From keyword options in which the mask knobs may come loose (``keep_last_n=-1``) or whole (``mask=``)."""
        mask, rest = CHAT_MEMENTO.split_knobs(options)
        return cls(mask=mask, **rest)


@dataclass
class CompletionOutput:
    """One sample of a request."""

    index: int
    token_ids: list[int]
    text: str | None
    finish_reason: str | None
    stop_reason: int | str | None = None
    error: str | None = None
    logprobs: list[float | None] | None = None
    top_logprobs: list[dict[int, float] | None] | None = None
    cap_forced: list[int] = field(default_factory=list)
    """Indices into ``token_ids`` of the ``<|block_end|>`` tokens the block cap forced: the model did
    not sample them (RL keeps them out of the policy gradient)."""
    kv: KVStats = field(default_factory=KVStats)
    logits: list[torch.Tensor] | None = None  # per sampled step, when EngineConfig.keep_logits

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's prompt and its ``n`` samples; ``finished`` once every sample is."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[float | None] | None = None
    """With ``SamplingParams.prompt_logprobs``: each prompt token's logprob given the tokens before it,
    under the memento mask (None for the first token, which nothing predicts)."""
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    """The top ``prompt_logprobs`` alternatives at each prompt position, and the prompt's own token."""

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)


@dataclass
class EngineStats:
    """Totals over the engine's life: pool occupancy per step, evictions, preemptions, time split."""

    steps: int = 0
    prefill_steps: int = 0
    decode_steps: int = 0
    generated_tokens: int = 0
    pool_used: list[int] = field(default_factory=list)  # slots in use after each step
    evictions: int = 0
    evicted_tokens: int = 0
    preemptions: int = 0
    aborted: int = 0  # finished "kv_budget": bigger than the whole pool
    failed: int = 0  # sequences finished "error": an exception while stepping them alone
    cancelled: int = 0  # requests stopped by abort_request (e.g. a client that went away)
    forward_seconds: float = 0.0
    release_seconds: float = 0.0  # returning evicted slots: the engine's "compaction"
    step_seconds: float = 0.0

    @property
    def peak_kv(self) -> int:
        """The pool's peak in tokens: its curve ``pool_used`` measured as :class:`KVStats` measures a sequence's."""
        return KVStats(self.pool_used).peak

    @property
    def auc_kv(self) -> int:
        """The pool's area in token-steps (see :attr:`peak_kv`)."""
        return KVStats(self.pool_used).auc


TokenCallback = Callable[[str, int, int, "SampledToken"], None]
"""Streaming hook: (request_id, sample index, token id, sampled token with logprobs)."""


class LLMEngine:
    """Many requests, one KV pool, physical eviction of closed blocks."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any | None = None,
        config: EngineConfig | None = None,
        *,
        specials: SpecialTokenIds | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.model = model.eval()
        self.tokenizer = tokenizer
        impl = check_attention_implementation(model)
        self.geometry = KVGeometry.from_config(model.config, next(model.parameters()).dtype)
        device = next(model.parameters()).device
        self.pool = KVPool(self.geometry, self.config.kv_budget_tokens, device=device)
        self.runner = ModelRunner(model, self.pool, impl)
        watermark = int(self.config.watermark * self.config.kv_budget_tokens)
        self.scheduler = Scheduler(
            self.pool, self.config.max_num_seqs, self.config.max_num_batched_tokens, watermark=watermark
        )
        self.max_model_len = self.config.max_model_len or int(getattr(model.config, "max_position_embeddings", 1 << 30))
        self.specials = self._special_ids(specials)
        self.mask = self.config.mask
        self.stop_on_format_error = self.mask.stops_on_format_error(self.config.stop_on_format_error)
        self.assistant_prefix = tracked_prefix(self.mask, self.config.assistant_prefix, self.tokenizer)
        self.eos_token_ids = self._eos_ids()
        self.stats = EngineStats()
        self._requests: dict[str, RequestOutput] = {}
        self._sequences: dict[str, list[Sequence]] = {}
        self._ids = itertools.count()
        self._seq_ids = itertools.count()
        self._generator = torch.Generator().manual_seed(0)

    # -- construction helpers --------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, path: str | Path, config: EngineConfig | None = None, *, dtype: str | torch.dtype = "auto", device="cpu"
    ) -> LLMEngine:
        """Load an HF checkpoint (model + tokenizer) from a local directory."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        model_type = getattr(AutoConfig.from_pretrained(path), "model_type", None)
        from memento.engine.model_runner import SUPPORTED_MODEL_TYPES

        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported architecture {model_type!r} in {path}: the engine supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(model, tokenizer, config)

    def _special_ids(self, specials: SpecialTokenIds | None) -> SpecialTokenIds:
        if specials is not None:
            return specials
        if self.tokenizer is None:
            raise ValueError("the engine needs the memento token ids: give it a tokenizer or specials=")
        return SpecialTokenIds.from_tokenizer(self.tokenizer)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        generation = getattr(self.model, "generation_config", None)
        for source in (getattr(generation, "eos_token_id", None), getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, list | tuple):
                ids.update(int(t) for t in source)
        return ids

    # -- requests ----------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | Seq[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        forced_tokens: Seq[int] | None = None,
    ) -> str:
        """Queue a prompt (text or token ids). Bad input raises ValueError; nothing else is touched."""
        params = params or SamplingParams()
        prompt_ids = self.check_request(prompt, params)
        if forced_tokens is not None:
            forced_tokens = self._token_ids(forced_tokens, "forced_tokens")
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        sequences = []
        for index in range(params.n):
            try:
                seq = Sequence(
                    next(self._seq_ids),
                    request_id,
                    index,
                    prompt_ids,
                    params,
                    self._new_layout(),
                    BlockCap(self.specials, self.config.max_block_tokens),
                    forced_tokens=list(forced_tokens) if forced_tokens is not None else None,
                )
            except MementoFormatError as err:
                raise ValueError(f"the prompt's memento structure is malformed: {err}") from err
            seed = (
                params.seed + index
                if params.seed is not None
                else int(torch.randint(0, 2**62, (1,), generator=self._generator))
            )
            seq.generator = torch.Generator().manual_seed(seed)
            sequences.append(seq)
        outputs = [
            CompletionOutput(index=s.sample_index, token_ids=s.output_ids, text=None, finish_reason=None)
            for s in sequences
        ]
        self._requests[request_id] = RequestOutput(request_id, prompt_ids, outputs)
        self._sequences[request_id] = sequences
        for seq in sequences:
            self.stats.evictions += seq.stats.evictions  # blocks the prompt itself closes
            self.stats.evicted_tokens += seq.stats.evicted_tokens
            self.scheduler.add(seq)
        return request_id

    def check_request(self, prompt: str | Seq[int], params: SamplingParams) -> list[int]:
        """The prompt's token ids if the request can run here; a ValueError saying why not otherwise.

        Reads only the configuration (safe from another thread while the engine steps).
        """
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, not {type(params).__name__}")
        prompt_ids = self._prompt_ids(prompt)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; use stop_token_ids for a token-only engine")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens; the context holds {self.max_model_len} "
                "(no room for one generated token)"
            )
        if len(prompt_ids) > self.pool.capacity:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens but the KV budget is {self.pool.capacity} tokens "
                "(raise kv_budget_tokens)"
            )
        return prompt_ids

    def _prompt_ids(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; give token ids")
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            ids = list(prompt)
        return self._token_ids(ids, "the prompt")

    def _token_ids(self, ids: Seq[int], what: str) -> list[int]:
        """Non-empty, integer and inside the vocabulary, or a ValueError naming ``what``."""
        try:
            ids = [operator.index(t) for t in ids]  # ints, numpy ints, 0-d integer tensors
        except TypeError:
            raise ValueError(f"{what} must hold integer token ids") from None
        if not ids:
            raise ValueError(f"{what} is empty")
        vocab = self.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{what} has token ids out of the vocabulary (0..{vocab - 1}): {bad[:5]}")
        return ids

    def _new_layout(self) -> RowLayout:
        tracker = SequenceTracker(
            self.specials, self.mask, self.assistant_prefix, stop_on_format_error=self.stop_on_format_error
        )
        return RowLayout(tracker)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_waiting(self) -> int:
        """Sequences queued for admission (preempted ones included)."""
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        """Sequences holding KV slots."""
        return len(self.scheduler.running)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now: unfinished samples end with ``abort`` and every KV slot they hold is freed.

        Call it between steps (the engine is not thread-safe). Returns the request's output so far,
        or None for an unknown or already collected request.
        """
        sequences = self._sequences.get(request_id)
        if sequences is None:
            return None
        for seq in sequences:
            if not seq.finished:
                seq.finish("abort")
        self.scheduler.remove(sequences)
        self.stats.cancelled += 1
        return self._collect(request_id)

    # -- the step ----------------------------------------------------------------------------

    def step(self, on_token: TokenCallback | None = None) -> list[RequestOutput]:
        """Run one scheduled forward pass; return the requests that finished in it."""
        start = time.perf_counter()
        step = self.scheduler.schedule()
        self.stats.preemptions += len(step.preempted)
        touched = {s.request_id for s in step.aborted}
        self.stats.aborted += len(step.aborted)
        if step.work:
            self.stats.steps += 1
            if step.kind == "prefill":
                self.stats.prefill_steps += 1
            else:
                self.stats.decode_steps += 1
            plan = []
            for seq, count in step.work:
                plan.append((seq, seq.pending_rows(count), self.pool.allocate(count)))
            scoring = [b for b, (seq, rows, _) in enumerate(plan) if seq.scores_prompt_rows(rows)]
            t0 = time.perf_counter()
            result = self.runner.run(plan, keep=max((len(plan[b][1]) for b in scoring), default=1))
            self.stats.forward_seconds += time.perf_counter() - t0
            for b in scoring:
                seq, rows, _ = plan[b]
                assert result.tail_logits is not None
                seq.score_prompt(rows, result.tail_logits[b, result.tail_logits.shape[1] - len(rows) :])
            ready: list[tuple[int, Sequence]] = []
            for b, (seq, rows, slots) in enumerate(plan):
                try:
                    seq.mark_computed(rows, slots)
                    self._release(seq)
                    if seq.num_pending == 0:
                        seq.stats.live_kv.append(result.live_keys[b])
                        ready.append((b, seq))
                except Exception as err:
                    self._fail(seq, "its KV bookkeeping", err, touched)
            if ready:
                rows_idx = torch.tensor([b for b, _ in ready])
                logits = result.logits[rows_idx.to(result.logits.device)].cpu()
                seqs = [s for _, s in ready]
                for i, (seq, token) in enumerate(zip(seqs, self._sample(logits, seqs, touched), strict=True)):
                    if token is None:
                        continue  # its sampling failed: finished with "error"
                    try:
                        self._accept(seq, token, logits[i], on_token)
                    except Exception as err:
                        self._fail(seq, "taking its token", err, touched)
                    touched.add(seq.request_id)
        for seq in self.scheduler.remove_finished():
            touched.add(seq.request_id)
        self.stats.pool_used.append(self.pool.num_used)
        self.stats.step_seconds += time.perf_counter() - start
        return [self._collect(rid) for rid in sorted(touched) if self._done(rid)]

    def _fail(self, seq: Sequence, what: str, err: Exception, touched: set[str]) -> None:
        """Fault isolation: an exception while stepping one sequence finishes that sequence alone
        (``finish_reason="error"``, the reason in ``error``; its KV is freed with the finished ones)
        and the loop goes on for the rest. A failure of the forward pass itself is not caught: it
        may have left shared state (the pool, the model) broken, so it stops the engine."""
        logger.error("request %s: %s failed; that request alone is stopped", seq.request_id, what, exc_info=err)
        seq.finish("error", f"{what} failed: {type(err).__name__}: {err}")
        self.stats.failed += 1
        touched.add(seq.request_id)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], touched: set[str]) -> list[SampledToken | None]:
        """The batch's tokens; when the batch call fails, row by row, so only the failing rows fail."""
        params, generators = [s.params for s in seqs], [s.generator for s in seqs]
        penalised = any(p.repetition_penalty != 1.0 for p in params)
        histories = [s.all_token_ids() for s in seqs] if penalised else None
        try:
            return list(sample_tokens(logits, params, generators, histories))
        except Exception:
            out: list[SampledToken | None] = []
            for i, seq in enumerate(seqs):
                try:
                    history = histories[i : i + 1] if histories is not None else None
                    out.append(sample_tokens(logits[i : i + 1], params[i : i + 1], generators[i : i + 1], history)[0])
                except Exception as err:
                    self._fail(seq, "sampling", err, touched)
                    out.append(None)
            return out

    def _release(self, seq: Sequence) -> None:
        t0 = time.perf_counter()
        self.pool.free(seq.release_dead())
        if self.runner.freeing_window is not None:
            self.pool.free(seq.release_out_of_window(self.runner.freeing_window))
        self.stats.release_seconds += time.perf_counter() - t0

    def _accept(self, seq: Sequence, sampled: SampledToken, logits: torch.Tensor, on_token) -> None:
        """Append the sampled (or forced, or cap-forced) token; finish the sequence or feed it on.

        A token put in place of the sampled one reports the model's logprob of *that* token (what a
        trainer scoring the sequence computes), not the logprob of the token it replaced.
        """
        token = sampled.token_id
        if seq.forced_tokens is not None:
            token = seq.forced_tokens[len(seq.output_ids)]
        elif seq.block_cap.must_end:
            token = self.specials.block_end
            seq.cap_forced.append(len(seq.output_ids))
        if token != sampled.token_id and sampled.logprob is not None:
            sampled.logprob = float(torch.log_softmax(logits.float(), dim=-1)[token])
        sampled.token_id = token
        evictions_before, evicted_before = seq.stats.evictions, seq.stats.evicted_tokens
        seq.append_output(token)
        seq.logprobs.append(sampled.logprob)
        seq.top_logprobs.append(sampled.top_logprobs)
        if self.config.keep_logits:
            seq.kept_logits.append(logits)
        self.stats.generated_tokens += 1
        if on_token is not None:
            on_token(seq.request_id, seq.sample_index, token, sampled)
        params = seq.params
        if token in params.stop_token_ids:
            seq.finish("stop")
            seq.stop_reason = token
        elif token in self.eos_token_ids and not params.ignore_eos:
            seq.finish("eos")  # stop_reason stays None, as in vLLM
        elif params.stop and self._hit_stop_string(seq):
            seq.finish("stop")
        elif (
            len(seq.output_ids) >= params.max_tokens
            or (seq.forced_tokens is not None and len(seq.output_ids) >= len(seq.forced_tokens))
            or seq.num_tokens >= self.max_model_len
        ):
            seq.finish("length")
        else:
            try:
                seq.feed_last_output()
            except MementoFormatError as err:
                seq.finish("format_error", str(err))
            else:
                self._release(seq)
        self.stats.evictions += seq.stats.evictions - evictions_before
        self.stats.evicted_tokens += seq.stats.evicted_tokens - evicted_before

    def _hit_stop_string(self, seq: Sequence) -> bool:
        longest = max(len(s) for s in seq.params.stop)
        tail = self.tokenizer.decode(seq.output_ids[-(longest + 8) :])
        for stop in seq.params.stop:
            if stop in tail:
                seq.stop_reason = stop
                return True
        return False

    def _done(self, request_id: str) -> bool:
        return all(s.finished for s in self._sequences[request_id])

    def _collect(self, request_id: str) -> RequestOutput:
        """Fill the request's outputs from its sequences (text decoded, stop strings trimmed)."""
        request = self._requests[request_id]
        first = self._sequences[request_id][0]
        if first.prompt_logprobs is not None:
            request.prompt_logprobs = list(first.prompt_logprobs)
            request.prompt_top_logprobs = list(first.prompt_top_logprobs or [])
        for seq, out in zip(self._sequences[request_id], request.outputs, strict=True):
            out.token_ids = list(seq.output_ids)
            out.finish_reason = seq.finish_reason
            out.stop_reason = seq.stop_reason
            out.error = seq.error
            out.kv = seq.stats
            out.cap_forced = list(seq.cap_forced)
            if seq.params.logprobs is not None:
                out.logprobs = list(seq.logprobs)
                out.top_logprobs = list(seq.top_logprobs)
            if self.config.keep_logits:
                out.logits = list(seq.kept_logits)
            if self.tokenizer is not None:
                text = self.tokenizer.decode(seq.output_ids)
                if isinstance(seq.stop_reason, str):
                    cut = text.find(seq.stop_reason)
                    if cut >= 0:
                        text = text[: cut + (len(seq.stop_reason) if seq.params.include_stop_str_in_output else 0)]
                out.text = text
        if request.finished:
            self._requests.pop(request_id)
            self._sequences.pop(request_id)
        return request

    # -- whole runs --------------------------------------------------------------------------

    def run_to_completion(self, on_token: TokenCallback | None = None) -> list[RequestOutput]:
        finished = []
        while self.has_unfinished():
            finished.extend(self.step(on_token))
        return finished


class LLM:
    """``LLM(model_dir).generate(prompts, SamplingParams(...))``: the engine in one call.

    ``config`` are :class:`EngineConfig` fields; the mask knobs may be given loose
    (``LLM(path, keep_last_n=-1)``) or whole (``mask=MaskConfig(...)``).
    """

    def __init__(self, model: str | Path | Any, tokenizer: Any | None = None, **config: Any) -> None:
        dtype = config.pop("dtype", "auto")
        device = config.pop("device", "cpu")
        engine_config = EngineConfig.from_options(**config)
        if isinstance(model, str | Path):
            self.engine = LLMEngine.from_pretrained(model, engine_config, dtype=dtype, device=device)
        else:
            self.engine = LLMEngine(model, tokenizer, engine_config)

    def generate(
        self,
        prompts: str | Seq[int] | Iterable[str | Seq[int]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        on_token: TokenCallback | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, Seq) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"{len(params_list)} sampling params for {len(prompts)} prompts")
        ids = [self.engine.add_request(p, sp) for p, sp in zip(prompts, params_list, strict=True)]
        done = {r.request_id: r for r in self.engine.run_to_completion(on_token)}
        return [done[i] for i in ids]
