"""One rollout across the engine groups: each generates and scores its share, and the rows move
as tensors to the ranks that train them.

Layer L2. Every rank knows the rollout's prompts (a seeded draw); each engine group's leader
generates the completions of its contiguous block of prompts (rollout/placement.py), scores
them with its own reward workers and computes their group advantages (a prompt's G outputs
never leave their engine, so the group statistics are local). What every rank then learns is
small: each row's prompt and completion lengths (two int64 [R] tensors, summed over ranks), and
the rollout's metrics, reduced (sums, maxima) rather than gathered. The rows themselves, i.e.
ids, the sampler's log-probs and per-row scalars, travel with three all_to_all_single calls
(a fourth with the engine's MoE routing when the trainer replays it, grpo.routing_replay=r3),
each rank receiving only the rows its data-parallel rank trains (every mini-batch of the
rollout). Nothing is pickled.

Shapes: P prompts, G outputs per prompt, R = P x G rows (row p * G + j is output j of prompt p),
K per-row scalars.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_r1.data.prompts import PromptExample
from megatron_r1.evaluation import reward_sample
from megatron_r1.grpo.advantage import GroupAdvantages, group_advantages
from megatron_r1.grpo.rollout_batch import RolloutTensors, pack_sequences
from megatron_r1.reward.scoring import RewardBatch, RewardScorer
from megatron_r1.reward.types import Language
from megatron_r1.rollout.placement import Placement, split_prompts
from megatron_r1.rollout.types import Completion, RolloutEngine, SamplingConfig


def scalar_names(components: Sequence[str]) -> tuple[str, ...]:
    """The per-row scalars, in their column order: what training and the store need."""
    return ("advantage", "reward", *(f"reward_{c}" for c in components))


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


@dataclass
class Generated:
    """A rollout right after generation: rows on the leaders, lengths and metrics everywhere."""

    held: HeldRows
    prompt_len_R: torch.Tensor
    completion_len_R: torch.Tensor
    holder_R: list[int]
    """The leader rank holding each row."""
    metrics: dict[str, float]
    routing_shape: tuple[int, int] | None = None
    """(moe_layers, top_k) when the rows carry the engine's routing, else None."""

    @property
    def length_R(self) -> torch.Tensor:
        """Positions each row uses in the trainer's layout (prompt + completion - 1)."""
        return (self.prompt_len_R + self.completion_len_R - 1).clamp(min=1)


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


def comm_device() -> torch.device:
    """Where collectives take their tensors: the current GPU under NCCL, else the host."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------ generation
def generate_rollout(engine: RolloutEngine | None, scorer: RewardScorer | None,
                     placement: Placement, prompts: Sequence[PromptExample],
                     sampling: SamplingConfig, *, components: Sequence[str],
                     target_language: Language, std_normalize: bool,
                     routing_shape: tuple[int, int] | None = None) -> Generated:
    """Generate, score and compute advantages on every engine group for its block of
    `prompts` (engine and scorer exist on the leaders only). Collective.

    Args:
        routing_shape: (moe_layers, top_k) of the engine's routing that every completion must
            carry (the engine captures it), or None.
    """
    rank, size = dist.get_rank(), dist.get_world_size()
    n, total = sampling.n, len(prompts) * sampling.n
    blocks = split_prompts(len(prompts), len(placement.groups))
    holder_R = [g.leader for g, block in zip(placement.groups, blocks) for _ in block
                for _ in range(n)]
    held = HeldRows(scalars=torch.zeros(0, len(scalar_names(components)), dtype=torch.float64))
    stats = _Stats(components)
    prompt_len_R = torch.zeros(total, dtype=torch.int64)
    completion_len_R = torch.zeros(total, dtype=torch.int64)
    block = blocks[placement.group_of(rank).index]
    if engine is not None and len(block):  # more engine groups than prompts: some idle
        assert scorer is not None, "an engine group's leader scores its own completions"
        start = time.perf_counter()
        engine.wake_up()
        groups = engine.generate([prompts[p].prompt_ids for p in block], sampling,
                                 prompt_indices=list(block))
        engine.sleep()
        stats.maxima["time/generate_s"] = time.perf_counter() - start
        completions = [c for g in groups for c in g]
        rewards = scorer.score([c.text for c in completions],
                               [reward_sample(prompts[p], target_language)
                                for p in block for _ in range(n)])
        correct = rewards.components_N["accuracy"] > 0.5
        adv = group_advantages(rewards.total_N, correct, n, std_normalize=std_normalize)
        held.rows = [p * n + j for p in block for j in range(n)]
        held.ids = [torch.tensor([*prompts[r // n].prompt_ids, *c.token_ids], dtype=torch.int64)
                    for r, c in zip(held.rows, completions)]
        held.sampler_logp = [torch.tensor(c.logprobs, dtype=torch.float32) for c in completions]
        if routing_shape is not None:
            held.routing = [_checked_routing(c, len(ids) - 1, routing_shape, r)
                            for r, c, ids in zip(held.rows, completions, held.ids)]
        held.scalars = torch.stack(
            [adv.advantages_R.double(), rewards.total_N.double(),
             *(rewards.components_N[c].double() for c in components)], dim=1)
        for r, c in zip(held.rows, completions):
            prompt_len_R[r], completion_len_R[r] = len(prompts[r // n].prompt_ids), len(c.token_ids)
        stats.observe(rewards, adv, completions, n)
    if size > 1:
        lengths = torch.stack([prompt_len_R, completion_len_R]).to(comm_device())
        dist.all_reduce(lengths)  # each row is known on exactly one leader
        prompt_len_R, completion_len_R = lengths.cpu()
    return Generated(held=held, prompt_len_R=prompt_len_R, completion_len_R=completion_len_R,
                     holder_R=holder_R, metrics=stats.reduce(total, len(prompts)),
                     routing_shape=routing_shape)


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


class _Stats:
    """The rollout's metrics as sums and maxima over its rows, reduced over the leaders."""

    def __init__(self, components: Sequence[str]) -> None:
        self.sums: dict[str, float] = {
            **{f"reward/{c}_{what}": 0.0 for c in components
               for what in ("mean", "errors", "timeouts")},
            "reward/total_mean": 0.0, "response/length_mean": 0.0, "response/truncated": 0.0,
            "advantage/mean": 0.0, "advantage/sum_sq": 0.0, "advantage/zero_groups": 0.0,
            "groups/solved_all": 0.0, "groups/solved_none": 0.0}
        self.maxima: dict[str, float] = {"advantage/abs_max": 0.0, "reward/time_s": 0.0,
                                         "time/generate_s": 0.0}
        self.components = list(components)

    def observe(self, rewards: RewardBatch, adv: GroupAdvantages,
                completions: Sequence[Completion], group_size: int) -> None:
        """Add one leader's rows: the scorer's and group_advantages' own metrics (means over
        these rows or groups, weighted back into sums; counts as they are)."""
        rows = len(completions)
        groups = rows // group_size
        for key in self.sums:
            if key in rewards.metrics:  # reward/<c>_mean, _errors, _timeouts, total_mean
                weight = rows if key.endswith("_mean") else 1
                self.sums[key] += rewards.metrics[key] * weight
            elif key in adv.metrics:  # advantage/mean per row; the others per group
                self.sums[key] += adv.metrics[key] * (rows if key == "advantage/mean"
                                                      else groups)
        self.sums["advantage/sum_sq"] += float(adv.advantages_R.double().square().sum())
        self.sums["response/length_mean"] += float(sum(len(c.token_ids) for c in completions))
        self.sums["response/truncated"] += float(sum(c.finish_reason == "length"
                                                     for c in completions))
        self.maxima["advantage/abs_max"] = adv.metrics["advantage/abs_max"]
        self.maxima["reward/time_s"] = rewards.metrics["reward/time_s"]

    def reduce(self, rows: int, groups: int) -> dict[str, float]:
        sums = torch.tensor(list(self.sums.values()), dtype=torch.float64)
        maxima = torch.tensor(list(self.maxima.values()), dtype=torch.float64)
        if dist.get_world_size() > 1:
            sums, maxima = sums.to(comm_device()), maxima.to(comm_device())
            dist.all_reduce(sums)
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
        total = dict(zip(self.sums, sums.tolist()))
        out = {k: v / (groups if k.startswith(("groups/", "advantage/zero")) else rows)
               for k, v in total.items() if not k.endswith(("_errors", "_timeouts", "sum_sq"))}
        out.update({k: v for k, v in total.items() if k.endswith(("_errors", "_timeouts"))})
        mean = total["advantage/mean"] / rows
        var = (total["advantage/sum_sq"] - rows * mean * mean) / max(rows - 1, 1)
        out["advantage/std"] = max(var, 0.0) ** 0.5  # sample std, as group_advantages
        out.update(dict(zip(self.maxima, maxima.tolist())))
        return out


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
        out_splits = [sum(width[r] for r in rows) for rows in recv]
        in_splits = [sum(width[r] for r in rows) for rows in send]
        data = torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)
        if size == 1:
            return data
        device = comm_device()
        out = torch.empty(sum(out_splits), dtype=dtype, device=device)
        dist.all_to_all_single(out, data.to(device), out_splits, in_splits)
        return out.cpu()

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
