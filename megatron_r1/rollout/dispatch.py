"""One rollout across the engine groups: each generates and scores its share, and the rows move
as tensors to the ranks that train them.

Layer L2. Every rank knows the rollout's prompts (a seeded draw); each engine group's leader
generates the completions of its contiguous block of prompts (rollout/placement.py) and scores
those of rule kinds with its own reward workers. What every rank then learns is small: one
float64 [R, few] table, summed over ranks, of each row's prompt and completion lengths, rule
reward values, truncation, and how many ids each reward model reads of it. Reward models run on
the trainer's ranks (their inputs move there like the rows, below); then every rank computes
the same totals and group advantages from the table, so the metrics need no gathering. The
rows themselves, i.e. ids, the sampler's log-probs and per-row scalars, travel with three
all_to_all_single calls (a fourth with the engine's MoE routing when the trainer replays it,
grpo.routing_replay=r3), each rank receiving only the rows its data-parallel rank trains
(every mini-batch of the rollout). Nothing is pickled.

Shapes: P prompts, G outputs per prompt, R = P x G rows (row p * G + j is output j of prompt p),
K per-row scalars.
"""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist

from megatron_r1.config.schema import RULE_COMPONENTS
from megatron_r1.data.preference import reward_input_ids
from megatron_r1.data.prompts import PromptExample
from megatron_r1.data.template import TemplateName, render_prompt
from megatron_r1.evaluation import reward_sample
from megatron_r1.grpo.advantage import group_advantages
from megatron_r1.grpo.rollout_batch import RolloutTensors, pack_sequences
from megatron_r1.reward.format import has_r1_zero_format
from megatron_r1.reward.kinds import RewardRouting, scored_text
from megatron_r1.reward.scoring import RewardScorer
from megatron_r1.reward.types import Language
from megatron_r1.rollout.placement import Placement, split_prompts
from megatron_r1.rollout.types import Completion, RolloutEngine, SamplingConfig


def scalar_names(components: Sequence[str]) -> tuple[str, ...]:
    """The per-row scalars, in their column order: what training and the store need."""
    return ("advantage", "reward", *(f"reward_{c}" for c in components))


@dataclass(frozen=True)
class ModelReader:
    """How one reward model reads the rows it scores (built from its checkpoint on every rank,
    used on the engine groups' leaders, which hold the completions' texts)."""

    name: str
    scores: Literal["answer", "response"]
    """RewardModelSpec.scores: the final summary or the whole response."""
    tokenizer: Any
    """The reward model's own tokenizer (its checkpoint's hf_assets/)."""
    max_length: int
    """Ids it reads per row at most (megatron_r1.data.preference.reward_input_ids)."""
    template: TemplateName
    """The template its training rendered prompts with (data.template of `megatron-r1 rm`)."""
    fallback_margin: float = 1.0
    """RewardModelSpec.fallback_margin: how far below the rollout's lowest score of this model
    a row it cannot score lands."""


@dataclass
class HeldRows:
    """The rows one engine group's leader produced (kept there until they are stored)."""

    rows: list[int] = field(default_factory=list)
    """Global row indices."""
    ids: list[torch.Tensor] = field(default_factory=list)
    """int64 [prompt + completion] per row."""
    sampler_logp: list[torch.Tensor] = field(default_factory=list)
    """float32 [completion] per row: the sampler's log-prob of each generated id."""
    scalars: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.float64))
    """float64 [rows, K] in `scalar_names` order."""
    routing: list[torch.Tensor] = field(default_factory=list)
    """int16 [prompt + completion - 1, moe_layers, top_k] per row: the experts the engine
    routed each model input to (Completion.routing); empty unless captured."""
    model_ids: list[dict[int, torch.Tensor]] = field(default_factory=list)
    """Per reward model, {row: int64 ids it reads} for the held rows it scores."""


@dataclass
class Generated:
    """A rollout right after generation: rows on the leaders, lengths, rewards and metrics
    everywhere."""

    held: HeldRows
    prompt_len_R: torch.Tensor
    completion_len_R: torch.Tensor
    holder_R: list[int]
    """The leader rank holding each row."""
    metrics: dict[str, float]
    routing_shape: tuple[int, int] | None = None
    """(moe_layers, top_k) when the rows carry the engine's routing, else None."""
    kinds_R: list[str] = field(default_factory=list)
    """Each row's prompt kind."""
    values_RC: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.float64))
    """float64 [R, C]: every reward component's value of every row (0 where it does not apply
    or failed), in RewardRouting.names order."""
    model_len_RM: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.int64))
    """int64 [R, M]: ids reward model m reads of row r (0: it does not score the row)."""

    @property
    def length_R(self) -> torch.Tensor:
        """Positions each row uses in the trainer's layout (prompt + completion - 1)."""
        return (self.prompt_len_R + self.completion_len_R - 1).clamp(min=1)


ModelScores = Callable[[Generated], torch.Tensor]
"""Scores every row some reward model reads (Generated.model_len_RM > 0): float64 [R, M] on
every rank, NaN where the model failed. Collective; the trainer's reward models
(megatron_r1.reward_serving)."""


@dataclass(frozen=True)
class LocalRows:
    """The rows this rank trains, as training tensors (row i here is global row rows[i])."""

    rollout: RolloutTensors
    rows: list[int]
    scalars: torch.Tensor
    """float64 [local rows, K]."""
    routing_RSLK: torch.Tensor | None = None
    """int16 [local rows, width, moe_layers, top_k]: the engine's routing of every model
    input (zeros on padding), when captured."""

    def local_index(self) -> dict[int, int]:
        return {r: i for i, r in enumerate(self.rows)}


@dataclass(frozen=True)
class EngineWait:
    """Where every rank waits for the engine groups' leaders to finish generating.

    Ranks without an engine (and leaders done early) would otherwise wait inside the first
    collective after generation, an NCCL all-reduce on GPUs, for the whole generation: NCCL's
    watchdog aborts the job after parallel.timeout_minutes, and a rollout of R1's 32K-token
    responses runs longer. Here they wait on the host instead: a monitored barrier in a gloo
    group created with its own timeout (rollout.engine_wait_minutes, parallel.init.
    new_wait_group). No NCCL operation is pending while a generation runs, so the NCCL timeout
    bounds only the collectives that follow, which start once every leader is done. Chosen
    over heartbeats: vLLM's LLM.generate reports nothing until requests finish, so a
    heartbeat could only say that the leader's process is alive, which the launcher already
    knows. The barrier costs one round trip per generation.
    """

    group: dist.ProcessGroup | None
    """The gloo group of every rank (None at world size 1: nothing to wait for)."""
    minutes: float
    """Its timeout (rollout.engine_wait_minutes)."""

    def __call__(self, what: str) -> None:
        """Block until every rank arrives (collective over the group).

        Raises:
            RuntimeError: after `minutes`, naming the ranks that never arrived (gloo's
                monitored barrier, on rank 0) and rollout.engine_wait_minutes.
        """
        if self.group is None:
            return
        try:
            dist.monitored_barrier(group=self.group, wait_all_ranks=True,
                                   timeout=datetime.timedelta(minutes=self.minutes))
        except RuntimeError as err:
            raise RuntimeError(f"waited rollout.engine_wait_minutes={self.minutes:g} for the "
                               f"engine groups to finish {what}: {err}") from err


def comm_device() -> torch.device:
    """Where collectives take their tensors: the current GPU under NCCL, else the host."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_over_ranks(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM
                      ) -> torch.Tensor:
    """A host tensor all-reduced over every rank (through comm_device), back on the host."""
    if dist.get_world_size() == 1:
        return tensor
    moved = tensor.to(comm_device())
    dist.all_reduce(moved, op=op)
    return moved.cpu()


# ------------------------------------------------------------------ generation
def generate_rollout(engine: RolloutEngine | None, scorer: RewardScorer | None,
                     placement: Placement, prompts: Sequence[PromptExample],
                     sampling: SamplingConfig, *, rewards: RewardRouting,
                     target_language: Language, std_normalize: bool,
                     routing_shape: tuple[int, int] | None = None,
                     readers: Sequence[ModelReader] = (),
                     score_models: ModelScores | None = None,
                     wait: EngineWait | None = None) -> Generated:
    """Generate and rule-score on every engine group its block of `prompts` (engine and
    scorer exist on the leaders only), score with the reward models (`score_models`, on the
    trainer's ranks), then compute the rewards and group advantages. Collective.

    Each row's component values and lengths are known on exactly one leader and summed over
    ranks into one table, so that every rank computes the same totals and advantages (a
    prompt's G rows are one group whatever engine produced them) and the metrics need no
    further reduction.

    Args:
        rewards: which components score which prompt kinds (rule rewards first, then one per
            reader, in that order).
        routing_shape: (moe_layers, top_k) of the engine's routing that every completion must
            carry (the engine captures it), or None.
        readers: how each reward model reads its rows; `score_models` scores them.
        wait: where every rank waits for the leaders' generation and rule scoring before the
            first collective (EngineWait); None: inside that collective.
    """
    rank = dist.get_rank()
    n, total = sampling.n, len(prompts) * sampling.n
    rule, models = len(RULE_COMPONENTS), len(readers)
    if len(rewards.names) != rule + models or (models and score_models is None):
        raise ValueError(f"reward components {rewards.names} do not match the rule rewards "
                         f"{RULE_COMPONENTS} and {models} reward model(s)")
    blocks = split_prompts(len(prompts), len(placement.groups))
    holder_R = [g.leader for g, block in zip(placement.groups, blocks) for _ in block
                for _ in range(n)]
    kinds_R = [prompts[r // n].kind for r in range(total)]
    held = HeldRows(scalars=torch.zeros(0, len(scalar_names(rewards.names)), dtype=torch.float64),
                    model_ids=[{} for _ in readers])
    # per row: prompt length, completion length, rule values, truncated, ids per reward model
    table = torch.zeros(total, 3 + rule + models, dtype=torch.float64)
    failures = torch.zeros(2, rule + models, dtype=torch.float64)  # errors, timeouts
    maxima = torch.zeros(2, dtype=torch.float64)  # time/generate_s, reward/time_s
    block = blocks[placement.group_of(rank).index]
    if engine is not None and len(block):  # more engine groups than prompts: some idle
        assert scorer is not None, "an engine group's leader scores its own completions"
        start = time.perf_counter()
        engine.wake_up()
        groups = engine.generate([prompts[p].prompt_ids for p in block], sampling,
                                 prompt_indices=list(block))
        engine.sleep()
        maxima[0] = time.perf_counter() - start
        completions = [c for g in groups for c in g]
        held.rows = [p * n + j for p in block for j in range(n)]
        held.ids = [torch.tensor([*prompts[r // n].prompt_ids, *c.token_ids], dtype=torch.int64)
                    for r, c in zip(held.rows, completions)]
        held.sampler_logp = [torch.tensor(c.logprobs, dtype=torch.float32) for c in completions]
        if routing_shape is not None:
            held.routing = [_checked_routing(c, len(ids) - 1, routing_shape, r)
                            for r, c, ids in zip(held.rows, completions, held.ids)]
        for r, c in zip(held.rows, completions):
            table[r, :2] = torch.tensor([len(prompts[r // n].prompt_ids), len(c.token_ids)])
            table[r, 2 + rule] = float(c.finish_reason == "length")
        maxima[1] = _rule_scores(scorer, prompts, held.rows, completions, n, rewards, table,
                                 failures, target_language)
        for m, reader in enumerate(readers):
            applies = rewards.kinds[rule + m]
            for r, c in zip(held.rows, completions):
                if kinds_R[r] not in applies:
                    continue
                text = scored_text(c.text, reader.scores)
                if text is None:  # nothing to read: a counted fallback (scores_with_fallback)
                    failures[0, rule + m] += 1
                    continue
                prompt = render_prompt(prompts[r // n].question, reader.template)
                ids = reward_input_ids(reader.tokenizer, prompt, text, reader.max_length)
                held.model_ids[m][r] = torch.tensor(ids, dtype=torch.int64)
                table[r, 3 + rule + m] = len(ids)
    if wait is not None:
        wait("a rollout")  # on the host, not inside the all-reduce below
    table = reduce_over_ranks(table)  # each row is known on exactly one leader
    failures = reduce_over_ranks(failures)
    maxima = reduce_over_ranks(maxima, dist.ReduceOp.MAX)
    generated = Generated(
        held=held, prompt_len_R=table[:, 0].to(torch.int64),
        completion_len_R=table[:, 1].to(torch.int64), holder_R=holder_R, metrics={},
        routing_shape=routing_shape, kinds_R=kinds_R,
        values_RC=torch.cat([table[:, 2:2 + rule],
                             torch.zeros(total, models, dtype=torch.float64)], dim=1),
        model_len_RM=table[:, 3 + rule:].to(torch.int64))
    start = time.perf_counter()
    if models:
        read_RM = generated.model_len_RM > 0
        scores_RM = torch.full(read_RM.shape, math.nan, dtype=torch.float64)
        if bool(read_RM.any()):
            assert score_models is not None
            scores_RM = score_models(generated)
        failures[0, rule:] += (read_RM & ~torch.isfinite(scores_RM)).sum(dim=0).double()
        applies_RM = torch.tensor([[kind in rewards.kinds[rule + m] for m in range(models)]
                                   for kind in kinds_R], dtype=torch.bool).view(total, models)
        generated.values_RC[:, rule:] = scores_with_fallback(
            scores_RM, read_RM, applies_RM, [r.fallback_margin for r in readers])
    model_seconds = time.perf_counter() - start
    _finish(generated, rewards, n, std_normalize, failures, maxima,
            truncated=float(table[:, 2 + rule].mean()))
    if models:
        generated.metrics["time/reward_models_s"] = model_seconds
    return generated


def scores_with_fallback(scores_RM: torch.Tensor, read_RM: torch.Tensor,
                         applies_RM: torch.Tensor, margin_M: Sequence[float]) -> torch.Tensor:
    """The reward models' component values of every row: the score where the model read the
    row and its score is finite; for a row of the model's kinds it could not score (nothing to
    read, or a NaN/inf score) the lowest finite score it gave this rollout minus its margin
    (-margin when it scored no row), a penalty on the model's own scale; 0 for rows of other
    kinds (which its component does not enter).

    Args:
        scores_RM: float64 [R, M] scores (anything where read_RM is False).
        read_RM, applies_RM: bool [R, M]: the model read the row / scores the row's kind.
        margin_M: per model, RewardModelSpec.fallback_margin.
    """
    ok_RM = read_RM & torch.isfinite(scores_RM)
    lowest_M = torch.where(ok_RM, scores_RM, math.inf).amin(dim=0)
    lowest_M = torch.where(torch.isfinite(lowest_M), lowest_M, 0.0)
    fallback_M = lowest_M - torch.tensor(list(margin_M), dtype=torch.float64)
    failed_RM = applies_RM & ~ok_RM
    return torch.where(ok_RM, scores_RM,
                       torch.where(failed_RM, fallback_M.expand_as(scores_RM), 0.0))


def _rule_scores(scorer: RewardScorer, prompts: Sequence[PromptExample], rows: list[int],
                 completions: list[Completion], n: int, rewards: RewardRouting,
                 table: torch.Tensor, failures: torch.Tensor, target_language: Language) -> float:
    """Rule-score the held rows into `table` (values) and `failures` (errors, timeouts):
    rows of rule kinds through the scorer's workers (every rule reward), the others' format
    here (a regular expression: nothing to sandbox or time out); returns the scorer's wall
    time."""
    names = [c.name for c in scorer.components]
    assert tuple(names) == RULE_COMPONENTS, names
    fmt = names.index("format")
    kinds = [prompts[r // n].kind for r in rows]
    for r, kind, completion in zip(rows, kinds, completions):
        if kind not in rewards.rule_kinds and kind in rewards.kinds[fmt]:
            table[r, 2 + fmt] = float(has_r1_zero_format(completion.text))
    mine = [i for i, kind in enumerate(kinds) if kind in rewards.rule_kinds]
    if not mine:
        return 0.0
    result = scorer.score([completions[i].text for i in mine],
                          [reward_sample(prompts[rows[i] // n], target_language) for i in mine])
    where = torch.tensor([rows[i] for i in mine])
    for c, name in enumerate(names):
        table[where, 2 + c] = result.components_N[name].double()
        failures[0, c] += result.metrics[f"reward/{name}_errors"]
        failures[1, c] += result.metrics[f"reward/{name}_timeouts"]
    return result.metrics["reward/time_s"]


def _finish(generated: Generated, rewards: RewardRouting, group_size: int,
            std_normalize: bool, failures: torch.Tensor, maxima: torch.Tensor,
            truncated: float) -> None:
    """Totals, group advantages, the held rows' scalars and the rollout's metrics, from the
    table every rank holds (so every rank computes the same values)."""
    values_RC, kinds_R = generated.values_RC, generated.kinds_R
    total_R = rewards.total_R(values_RC, kinds_R)
    accuracy = RULE_COMPONENTS.index("accuracy")
    rule_R = torch.tensor([k in rewards.rule_kinds for k in kinds_R])
    adv = group_advantages(total_R, values_RC[:, accuracy] > 0.5, group_size,
                           std_normalize=std_normalize)
    held = generated.held
    if held.rows:
        where = torch.tensor(held.rows)
        held.scalars = torch.cat([adv.advantages_R[where].double().unsqueeze(1),
                                  total_R[where].double().unsqueeze(1), values_RC[where]], dim=1)
    metrics = rewards.metrics(values_RC, total_R, kinds_R)
    for c, name in enumerate(rewards.names):
        metrics[f"reward/{name}_errors"] = float(failures[0, c])
        metrics[f"reward/{name}_timeouts"] = float(failures[1, c])
    metrics.update(adv.metrics)
    # solved-all / solved-none judge the groups the accuracy reward scores (its groups only)
    correct_PG = (values_RC[:, accuracy] > 0.5).view(-1, group_size)
    ruled_P = rule_R.view(-1, group_size)[:, 0]
    for key, solved in (("groups/solved_all", correct_PG.all(dim=1)),
                        ("groups/solved_none", (~correct_PG).all(dim=1))):
        metrics[key] = float(solved[ruled_P].double().mean()) if ruled_P.any() else 0.0
    metrics["response/length_mean"] = float(generated.completion_len_R.double().mean())
    metrics["response/truncated"] = truncated
    metrics["time/generate_s"], metrics["reward/time_s"] = maxima.tolist()
    generated.metrics = metrics


def _checked_routing(completion: Completion, positions: int, shape: tuple[int, int],
                     row: int) -> torch.Tensor:
    """A completion's routing, checked against what the trainer will replay."""
    routing = completion.routing
    want = (positions, *shape)
    if routing is None or tuple(routing.shape) != want:
        got = None if routing is None else tuple(routing.shape)
        raise ValueError(f"rollout row {row}: the engine's routing has shape {got}, expected "
                         f"{want} (prompt + completion - 1 positions, MoE layers, top_k)")
    return routing.to(torch.int16)


# ------------------------------------------------------------------ rows to ranks
@dataclass(frozen=True)
class Received:
    """What exchange_rows delivers to one rank, row i being global row rows[i]."""

    rows: list[int]
    """In the order received: by source rank, then as wanted."""
    ids: list[torch.Tensor]
    sampler_logp: list[torch.Tensor]
    scalars: torch.Tensor
    """float64 [rows, K]."""
    routing: list[torch.Tensor] | None
    """int16 [prompt + completion - 1, moe_layers, top_k] per row when the rows carry it."""


def exchange_rows(generated: Generated, wanted: Sequence[Sequence[int]]) -> Received:
    """Send every rank the rows it wants (wanted[rank], global indices, in that order) from the
    leaders holding them. Collective; sizes follow from the known lengths, so no counts are
    exchanged first."""
    rank, size = dist.get_rank(), dist.get_world_size()
    held = generated.held
    where = {r: i for i, r in enumerate(held.rows)}
    k = held.scalars.shape[1]
    plen, clen, holder = (generated.prompt_len_R.tolist(), generated.completion_len_R.tolist(),
                          generated.holder_R)
    send = [[r for r in wanted[d] if holder[r] == rank] for d in range(size)]
    recv = [[r for r in wanted[rank] if holder[r] == s] for s in range(size)]
    outgoing = [r for rows in send for r in rows]
    incoming = [r for rows in recv for r in rows]

    def move(parts: list[torch.Tensor], dtype: torch.dtype, width: list[int]) -> torch.Tensor:
        return _all_to_all(parts, dtype, send, recv, width)

    ids = move([held.ids[where[r]] for r in outgoing], torch.int64,
               [p + c for p, c in zip(plen, clen)])
    logp = move([held.sampler_logp[where[r]] for r in outgoing], torch.float32, clen)
    scalars = move([held.scalars[where[r]] for r in outgoing], torch.float64, [k] * len(plen))
    routing_rows = None
    if generated.routing_shape is not None:
        layers, top_k = generated.routing_shape
        positions = [max(p + c - 1, 0) for p, c in zip(plen, clen)]
        # as bytes: neither gloo nor NCCL moves int16
        per_position = layers * top_k * 2
        routing = move([held.routing[where[r]].reshape(-1).view(torch.uint8) for r in outgoing],
                       torch.uint8, [n * per_position for n in positions]).view(torch.int16)
        routing_rows = [part.view(-1, layers, top_k) for part in
                        routing.split([positions[r] * layers * top_k for r in incoming])]
    return Received(rows=incoming, ids=list(ids.split([plen[r] + clen[r] for r in incoming])),
                    sampler_logp=list(logp.split([clen[r] for r in incoming])),
                    scalars=scalars.view(len(incoming), k), routing=routing_rows)


def _all_to_all(parts: list[torch.Tensor], dtype: torch.dtype, send: list[list[int]],
                recv: list[list[int]], width: Sequence[int]) -> torch.Tensor:
    """The concatenation of `parts` (this rank's outgoing rows, destination by destination)
    scattered to the ranks; returns the incoming rows, source by source. Row r is width[r]
    values wide, known on every rank, so no counts travel first."""
    out_splits = [sum(width[r] for r in rows) for rows in recv]
    in_splits = [sum(width[r] for r in rows) for rows in send]
    data = torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)
    if dist.get_world_size() == 1:
        return data
    device = comm_device()
    out = torch.empty(sum(out_splits), dtype=dtype, device=device)
    dist.all_to_all_single(out, data.to(device), out_splits, in_splits)
    return out.cpu()


def exchange_model_ids(generated: Generated, model: int,
                       wanted: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """The ids reward model `model` reads of the rows this rank wants (wanted[rank], rows it
    reads, in that order, repeats allowed), from the leaders holding them. Collective."""
    rank, size = dist.get_rank(), dist.get_world_size()
    held, holder = generated.held.model_ids[model], generated.holder_R
    width = generated.model_len_RM[:, model].tolist()
    unique = [list(dict.fromkeys(rows)) for rows in wanted]  # a row travels once per rank
    send = [[r for r in unique[d] if holder[r] == rank] for d in range(size)]
    recv = [[r for r in unique[rank] if holder[r] == s] for s in range(size)]
    data = _all_to_all([held[r] for rows in send for r in rows], torch.int64, send, recv, width)
    parts = dict(zip([r for rows in recv for r in rows],
                     data.split([width[r] for rows in recv for r in rows])))
    return [parts[r] for r in wanted[rank]]


def receive_rows(generated: Generated, wanted: Sequence[Sequence[int]], *, width: int,
                 group_size: int, pad_id: int) -> LocalRows:
    """exchange_rows, laid out as this rank's training tensors (rows padded to `width`: the
    rollout's longest, so that every rank's micro-batches may take one shape)."""
    got = exchange_rows(generated, wanted)
    plen = generated.prompt_len_R
    rollout = pack_sequences(got.ids, [int(plen[r]) for r in got.rows], got.sampler_logp,
                             [r // group_size for r in got.rows], width=width, pad_id=pad_id)
    routing_RSLK = None
    if got.routing is not None and generated.routing_shape is not None:
        routing_RSLK = torch.zeros(len(got.rows), rollout.tokens_RS.shape[1],
                                   *generated.routing_shape, dtype=torch.int16)
        for i, ids_TLK in enumerate(got.routing):
            routing_RSLK[i, :ids_TLK.shape[0]] = ids_TLK
    return LocalRows(rollout=rollout, rows=got.rows, scalars=got.scalars,
                     routing_RSLK=routing_RSLK)
