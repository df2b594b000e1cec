"""Test support: under torchrun (gloo), leaders 0 and 2 hold the rows of a made-up rollout;
every rank asks for its own rows (and rank 0 for all of them), their ids, sampler log-probs,
scalars and MoE routing (LAYERS x TOP_K expert ids per model input), and for the ids a reward
model reads of some rows (repeats included); each rank checks what it got against the rollout
it can rebuild itself. Prints RESULT ok on every rank that passed.

Usage: torchrun --nproc-per-node=4 dispatch_worker.py"""

import torch
import torch.distributed as dist

from megatron_r1.rollout.dispatch import Generated, HeldRows, exchange_model_ids, exchange_rows
from megatron_r1.rollout.placement import split_prompts

P, G = 6, 4
LAYERS, TOP_K = 2, 3
LEADERS = (0, 2)


def made_up():
    """The whole rollout, identical on every rank."""
    gen = torch.Generator().manual_seed(0)
    prompt_len = torch.randint(2, 6, (P * G,), generator=gen)
    completion_len = torch.randint(0, 9, (P * G,), generator=gen)
    ids = [torch.randint(0, 1000, (int(p + c),), generator=gen)
           for p, c in zip(prompt_len, completion_len)]
    logp = [-torch.rand(int(c), generator=gen) for c in completion_len]
    routing = [torch.randint(0, 64, (int(p + c) - 1, LAYERS, TOP_K), generator=gen,
                             dtype=torch.int16) for p, c in zip(prompt_len, completion_len)]
    return prompt_len, completion_len, ids, logp, routing


if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    prompt_len, completion_len, ids, logp, routing = made_up()
    blocks = split_prompts(P, len(LEADERS))
    holder = [LEADERS[g] for g, b in enumerate(blocks) for _ in b for _ in range(G)]
    held = HeldRows(scalars=torch.zeros(0, 2, dtype=torch.float64))
    if rank in LEADERS:
        rows = [r for r in range(P * G) if holder[r] == rank]
        held = HeldRows(rows=rows, ids=[ids[r] for r in rows], sampler_logp=[logp[r] for r in rows],
                        scalars=torch.stack([torch.tensor([float(r), -float(r)]) for r in rows]
                                            ).double(), routing=[routing[r] for r in rows])
    generated = Generated(held=held, prompt_len_R=prompt_len, completion_len_R=completion_len,
                          holder_R=holder, metrics={}, routing_shape=(LAYERS, TOP_K))
    # each rank a different, scattered set of rows, in a scrambled order
    wanted = [torch.randperm(P * G, generator=torch.Generator().manual_seed(d))[:7].tolist()
              for d in range(world)]
    got = exchange_rows(generated, wanted)
    got_rows, got_ids, got_logp, got_scalars = got.rows, got.ids, got.sampler_logp, got.scalars
    assert sorted(got_rows) == sorted(wanted[rank])
    for i, r in enumerate(got_rows):
        assert torch.equal(got_ids[i], ids[r]), r
        assert torch.equal(got_logp[i], logp[r]), r
        assert got_scalars[i].tolist() == [float(r), -float(r)], r
        assert torch.equal(got.routing[i], routing[r]), r
    everything = exchange_rows(generated, [list(range(P * G)) if d == 0 else []
                                           for d in range(world)])
    if rank == 0:
        assert everything.rows == list(range(P * G))  # blocks arrive in row order

    # reward-model inputs: rows a model reads (every third one not), repeats allowed, to the
    # ranks that score them
    reads = [r for r in range(P * G) if r % 3]
    model_ids = {r: ids[r][: 1 + r % 5] for r in reads}
    held.model_ids = [{r: v for r, v in model_ids.items() if holder[r] == rank}]
    generated.model_len_RM = torch.tensor([[1 + r % 5 if r % 3 else 0] for r in range(P * G)])
    asked = [[reads[(d * 5 + k) % len(reads)] for k in range(9)] + [reads[d]] for d in range(world)]
    got_model = exchange_model_ids(generated, 0, asked)
    assert [x.tolist() for x in got_model] == [model_ids[r].tolist() for r in asked[rank]]
    print("RESULT ok", flush=True)
    dist.destroy_process_group()
