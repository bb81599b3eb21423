"""The scheduler half of the vLLM backend: ``scheduler_cls="memento.vllm.scheduler.MementoScheduler"``.

It subclasses vLLM 0.32's v1 :class:`~vllm.v1.core.sched.scheduler.Scheduler` and changes four
things, each through a method vLLM already calls (no vLLM file is edited or patched):

* every request gets a :class:`~memento.vllm.eviction.RequestEvictions` fed with its prompt at
  admission and with each sampled token (``_update_request_with_output``), so masking.py's tracker
  decides every eviction;
* at the start of each step, events due for a running request (``num_computed_tokens == at``) are
  applied: the pages past the compacted end go back to vLLM's block pool at once, and the
  compaction (token moves inside the request's pages) rides to the worker on the
  ``SchedulerOutput`` (``memento_plan``) together with every scheduled request's shift
  (evicted-token count), which the worker subtracts to turn logical positions into physical slots;
* prefill chunks stop at eviction points (``_reserve_prefill_lookahead``, the per-request chunk
  cap vLLM applies to running and waiting requests alike), so a prompt holding closed blocks, and
  the recompute after a preemption, rebuild exactly the evicted state: a kept memento's KV is
  recomputed while its block is still there, then the block goes again;
* the KV cache manager sees a request's physical length (logical minus evicted) when it sizes
  allocations (:class:`PhysicalKVCacheManager`), so freed pages really admit more work.

A preemption frees every page and resets the request's eviction state; the recompute replays the
events. vLLM's own token accounting (``num_computed_tokens``, ``max_tokens``, usage) stays logical
throughout, like RoPE positions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
from vllm.v1.request import Request, RequestStatus

from memento.chat import tracked_prefix
from memento.format import MementoFormatError, SpecialTokenIds
from memento.masking import SequenceTracker
from memento.vllm.config import (
    PLAN_ATTR,
    SCHEDULER_CLS,
    WORKER_CLS,
    MementoSettings,
    kv_groups_problem,
    names_subclass,
)
from memento.vllm.eviction import Compaction, RequestEvictions

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's logger: its handlers and level apply

FORMAT_ERROR = "memento_format_error"
"""``stop_reason`` of a request stopped because its memento structure broke."""


@dataclass
class StepPlan:
    """What the worker does for memento before a step's forward pass."""

    compactions: dict[str, Compaction] = field(default_factory=dict)
    shifts: dict[str, int] = field(default_factory=dict)
    """Evicted tokens of each scheduled request with any: physical index = logical - shift."""


@dataclass
class MementoStats:
    """Totals over the engine's life (read in-process as ``scheduler.memento_stats``)."""

    evictions: int = 0
    evicted_tokens: int = 0
    moved_tokens: int = 0  # KV tokens slid down by compactions
    freed_blocks: int = 0  # pages returned to the pool by evictions
    recomputes: int = 0  # preemptions of requests, each rebuilt later by recompute
    format_errors: int = 0
    steps: int = 0
    live_tokens_peak: int = 0  # sum over requests of physical KV tokens, after each step's schedule
    live_tokens_auc: int = 0
    used_blocks_peak: int = 0
    used_blocks_auc: int = 0
    finished_requests: int = 0
    request_peak_sum: int = 0  # sum over finished requests of each one's peak physical KV tokens


class _PhysicalRequest:
    """A request as the KV cache manager must count it: computed and total tokens without the evicted."""

    def __init__(self, request: Request, num_computed_tokens: int, num_tokens: int) -> None:
        self._request = request
        self.num_computed_tokens = num_computed_tokens
        self.num_tokens = num_tokens

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


class PhysicalKVCacheManager:
    """vLLM's KV cache manager, with allocations sized by physical (post-eviction) lengths."""

    def __init__(self, inner: Any, states: dict[str, RequestEvictions]) -> None:
        self._inner = inner
        self._states = states

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def allocate_slots(self, request: Request, num_new_tokens: int, *args: Any, **kwargs: Any):
        state = self._states.get(request.request_id)
        if state is not None and (state.shift or state.pending):
            # The admission check sizes a waiting request by its full length: count it as it will be
            # once the known events are replayed.
            request = _PhysicalRequest(
                request,
                request.num_computed_tokens - state.shift,
                request.num_tokens - state.final_shift(),
            )
        return self._inner.allocate_slots(request, num_new_tokens, *args, **kwargs)


def check_engine_config(vllm_config: Any, kv_cache_config: Any) -> None:
    """Refuse configurations the backend cannot run, saying what to change."""
    cache, sched, parallel = vllm_config.cache_config, vllm_config.scheduler_config, vllm_config.parallel_config
    problems = []
    if cache.enable_prefix_caching:
        problems.append(
            "prefix caching is on: evicted KV must never be shared through the prefix cache "
            "(enable_prefix_caching=False, or --no-enable-prefix-caching)"
        )
    if sched.async_scheduling:
        problems.append(
            "async scheduling is on: an eviction changes the next step's KV layout, so steps must be "
            "scheduled one at a time (async_scheduling=False, or --no-async-scheduling)"
        )
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding is not supported (remove the speculative config)")
    if parallel.pipeline_parallel_size > 1:
        problems.append("pipeline parallelism is not supported (pipeline_parallel_size=1)")
    worker = parallel.worker_cls
    if not names_subclass(worker, WORKER_CLS):
        problems.append(
            f"worker_cls is {worker!r}: the eviction needs the memento worker to move KV "
            f"(worker_cls={WORKER_CLS!r}, or --worker-cls {WORKER_CLS})"
        )
    group_problem = kv_groups_problem(kv_cache_config.kv_cache_groups)
    if group_problem:
        problems.append(group_problem)
    if problems:
        raise ValueError("memento's vLLM backend cannot start: " + "; ".join(problems))


def load_specials_and_prefix(vllm_config: Any, settings: MementoSettings) -> tuple[SpecialTokenIds, list[int] | None]:
    """The memento token ids from the model's tokenizer and the assistant prefix, or a clear error."""
    from transformers import AutoTokenizer

    model_config = vllm_config.model_config
    tokenizer = AutoTokenizer.from_pretrained(model_config.tokenizer, trust_remote_code=model_config.trust_remote_code)
    try:
        specials = SpecialTokenIds.from_tokenizer(tokenizer)
    except (KeyError, ValueError) as err:
        raise ValueError(
            f"memento's vLLM backend cannot start: the tokenizer at {model_config.tokenizer!r} has no memento "
            f"tokens ({err}). Serve a memento model (trained with the four special tokens), point --tokenizer at "
            "its tokenizer, or run without the memento scheduler/worker classes."
        ) from None
    try:
        prefix = tracked_prefix(settings.mask, settings.assistant_prefix, tokenizer)
    except Exception as err:
        raise ValueError(
            "memento's vLLM backend cannot start: require_assistant_section needs the ids that open "
            f"the assistant turn, and the tokenizer's chat template gives none ({err}). Set "
            "assistant_prefix in additional_config['memento'], or require_assistant_section=false."
        ) from None
    return specials, prefix


class MementoScheduler(Scheduler):
    """vLLM's scheduler with memento eviction (see the module docstring)."""

    def __init__(self, vllm_config: Any, kv_cache_config: Any, *args: Any, **kwargs: Any) -> None:
        self.memento = MementoSettings.from_vllm_config(vllm_config)
        check_engine_config(vllm_config, kv_cache_config)
        self._specials, self._assistant_prefix = load_specials_and_prefix(vllm_config, self.memento)
        self._mask = self.memento.mask
        super().__init__(vllm_config, kv_cache_config, *args, **kwargs)
        self._states: dict[str, RequestEvictions] = {}
        self.kv_cache_manager = PhysicalKVCacheManager(self.kv_cache_manager, self._states)
        self._page_manager = self.kv_cache_manager.coordinator.single_type_managers[0]
        self._rejected: dict[str, str] = {}  # request id -> why its prompt was refused
        self._to_report: list[Request] = []  # refused requests whose error output is still due
        self._preempted_now: set[str] = set()
        self._request_peaks: dict[str, int] = {}
        self.memento_stats = MementoStats()
        logger.info("memento vLLM backend on: %s (%s)", self.memento, SCHEDULER_CLS)

    # -- requests ----------------------------------------------------------------------------

    def _new_state(self) -> RequestEvictions:
        tracker = SequenceTracker(
            self._specials, self._mask, self._assistant_prefix, stop_on_format_error=self.memento.strict
        )
        return RequestEvictions(tracker)

    def add_request(self, request: Request) -> None:
        # Vanilla mode tracks nothing unless asked to stop on broken structure.
        if (self.memento.mask.evicts or self.memento.strict) and request.request_id not in self.requests:
            state = self._new_state()
            if request.prompt_token_ids is None:
                self._rejected[request.request_id] = "the memento backend needs token ids, not prompt embeddings"
            else:
                try:
                    state.feed(request.prompt_token_ids)
                except MementoFormatError as err:
                    self._rejected[request.request_id] = f"the prompt's memento structure is malformed: {err}"
            self._states[request.request_id] = state
        super().add_request(request)

    def _update_request_with_output(
        self, request: Request, new_token_ids: list[int], is_stale: bool = False
    ) -> tuple[list[int], bool]:
        new_token_ids, stopped = super()._update_request_with_output(request, new_token_ids, is_stale)
        state = self._states.get(request.request_id)
        if state is not None and not stopped and new_token_ids:
            try:
                state.feed(new_token_ids)
            except MementoFormatError as err:
                logger.debug("request %s stopped: %s", request.request_id, err)
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = FORMAT_ERROR
                self.memento_stats.format_errors += 1
                stopped = True
        return new_token_ids, stopped

    def _preempt_request(self, request: Request, timestamp: float, drop_stale_output: bool = False) -> None:
        super()._preempt_request(request, timestamp, drop_stale_output)
        self._preempted_now.add(request.request_id)
        self.memento_stats.recomputes += 1
        state = self._states.get(request.request_id)
        if state is not None:
            state.reset(request.all_token_ids)  # all KV gone: the recompute replays every eviction

    def _free_request(self, request: Request, delay_free_blocks: bool = False):
        self._states.pop(request.request_id, None)
        peak = self._request_peaks.pop(request.request_id, None)
        if peak is not None:
            self.memento_stats.finished_requests += 1
            self.memento_stats.request_peak_sum += peak
        return super()._free_request(request, delay_free_blocks)

    # -- the step ----------------------------------------------------------------------------

    def _reserve_prefill_lookahead(self, request: Request, num_computed_tokens: int, num_new_tokens: int) -> int:
        num_new_tokens = super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)
        state = self._states.get(request.request_id)
        if state is not None:
            stop = state.next_stop(num_computed_tokens)
            if stop is not None and num_computed_tokens + num_new_tokens > stop:
                num_new_tokens = stop - num_computed_tokens  # the chunk ends where a block goes
        return num_new_tokens

    def schedule(self, *args: Any, **kwargs: Any):
        self._refuse_rejected()
        self._preempted_now = set()
        compactions = self._apply_due_evictions()
        output = super().schedule(*args, **kwargs)
        plan = StepPlan(
            compactions={rid: c for rid, c in compactions.items() if rid not in self._preempted_now},
            shifts={
                rid: self._states[rid].shift
                for rid in output.num_scheduled_tokens
                if rid in self._states and self._states[rid].shift
            },
        )
        setattr(output, PLAN_ATTR, plan)
        self._record_step()
        return output

    def _apply_due_evictions(self) -> dict[str, Compaction]:
        compactions: dict[str, Compaction] = {}
        stats = self.memento_stats
        for request in self.running:
            state = self._states.get(request.request_id)
            if state is None or not state.due(request.num_computed_tokens):
                continue
            count = state.applied
            before = count.evictions, count.evicted_tokens
            applied = state.apply_due(request.num_computed_tokens)
            assert applied is not None
            stats.evictions += count.evictions - before[0]
            stats.evicted_tokens += count.evicted_tokens - before[1]
            stats.moved_tokens += applied.compaction.moved_tokens
            stats.freed_blocks += self._free_pages_past(request.request_id, applied.compaction.num_tokens)
            if applied.rewind_to is not None:
                request.num_computed_tokens = applied.rewind_to  # restart: recompute the memento
            compactions[request.request_id] = applied.compaction
        return compactions

    def _free_pages_past(self, request_id: str, num_tokens: int) -> int:
        """Return the request's pages beyond ``num_tokens`` physical tokens to the pool."""
        manager = self._page_manager
        blocks = manager.req_to_blocks.get(request_id)
        if not blocks:
            return 0
        keep = -(-num_tokens // manager.block_size)
        freed = blocks[keep:]
        if freed:
            del blocks[keep:]
            manager.block_pool.free_blocks(reversed(freed))
        return len(freed)

    def _refuse_rejected(self) -> None:
        if not self._rejected:
            return
        for request in self.finish_requests(list(self._rejected), RequestStatus.FINISHED_ERROR):
            request.stop_reason = self._rejected.get(request.request_id)
            self._to_report.append(request)
        self._rejected.clear()

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> dict[int, EngineCoreOutputs]:
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for request in self._to_report:
            logger.warning("request %s refused: %s", request.request_id, request.stop_reason)
            out = EngineCoreOutput(
                request_id=request.request_id,
                new_token_ids=[],
                finish_reason=request.get_finished_reason(),
                stop_reason=request.stop_reason,
                events=request.take_events(),
                trace_headers=request.trace_headers,
            )
            outputs.setdefault(request.client_index, EngineCoreOutputs()).outputs.append(out)
        self._to_report = []
        return outputs

    def _record_step(self) -> None:
        stats = self.memento_stats
        live = 0
        peaks = self._request_peaks
        for request in self.running:
            state = self._states.get(request.request_id)
            tokens = request.num_computed_tokens - (state.shift if state is not None else 0)
            live += tokens
            if tokens > peaks.get(request.request_id, 0):
                peaks[request.request_id] = tokens
        pool = self.kv_cache_manager.block_pool
        used = pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()  # the null block is never free
        stats.steps += 1
        stats.live_tokens_peak = max(stats.live_tokens_peak, live)
        stats.live_tokens_auc += live
        stats.used_blocks_peak = max(stats.used_blocks_peak, used)
        stats.used_blocks_auc += used
