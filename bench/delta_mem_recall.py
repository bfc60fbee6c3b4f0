"""Cross-session recall with δ-mem (issue 16, design note §6): facts told in session 1, a distractor
session (chit-chat), then a question in the last session without the facts in context; the server
restarted between writing and asking.

Stages (progress on stderr, one JSON line on stdout):
0. the tiny base fully fine-tuned offline on the in-context version, facts then question (cached under
   --workdir);
1. a real `mintd serve` over it; through the official tinker SDK: δ-mem weights trained on segmented
   episodes (cross_entropy on the answer), a LoRA baseline on the same episodes (rank so its parameter
   count ≥ δ-mem's), and a per-user test-time-trained LoRA (k steps on session 1);
2. through `/v1/completions` (greedy, token ids, exact match on the value): base query-only, base with
   the full history; every session but the question written into each held-out user's instance
   (`user`), the server restarted, then asked from `live`, from an empty state, from another user's
   state (scored on the true value and on that user's value of the asked attribute), and after `live`
   was rolled back to before session 1.

--skip-baselines leaves out the LoRA baseline and the TTT LoRA (and their keys), for iterating on δ-mem.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TINKER_TELEMETRY", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
import openai  # noqa: E402
import tinker  # noqa: E402
import torch  # noqa: E402
from _recall_backbone import prepare_backbone  # noqa: E402
from _recall_task import Episode, Task, TaskConfig, swap_partners  # noqa: E402
from tinker import types  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from mintd.engine.delta_mem import blank_adapter  # noqa: E402
from mintd.engine.engine import Engine  # noqa: E402
from mintd.engine.losses import WRITE_SPARSITY, WRITE_SPARSITY_TARGET  # noqa: E402
from mintd.lora_config import DeltaMemSpec, LoraSpec  # noqa: E402

KEY = "tml-recall"
REPO = Path(__file__).resolve().parents[1]


def ready(x):
    """tinker 0.38 returns futures of clients (their direct use is deprecated)."""
    return x.result() if hasattr(x, "result") and not hasattr(x, "sample") else x


def log(msg: str) -> None:
    print(f"[recall] {msg}", file=sys.stderr, flush=True)


@contextmanager
def server(model_dir: Path, data_dir: Path, port: int, threads: int):
    """`mintd serve` in its own process (so it can be restarted), up once /healthz answers."""
    command = [sys.executable, "-m", "mintd.cli", "serve", "--model", f"tiny={model_dir}"]
    command += ["--data-dir", str(data_dir), "--port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with (data_dir.parent / f"serve-{port}.log").open("a") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/v1/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mintd serve did not come up (see {out.name})")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def datum(tokens: list[int], weights: list[float], segments: list[int] | None) -> types.Datum:
    """Next-token CE datum; `segments` (a per-token input the SDK has no conversion for) as TensorData."""
    inputs: dict = {"target_tokens": tokens[1:], "weights": weights[1:]}
    if segments is not None:
        inputs["segment_ids"] = types.TensorData(data=segments[:-1], dtype="int64", shape=[len(tokens) - 1])
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)


def episode_datum(e: Episode) -> types.Datum:
    tokens = e.full_context() + list(e.answer)
    weights = [0.0] * (len(tokens) - len(e.answer)) + [1.0] * len(e.answer)
    return datum(tokens, weights, e.segment_ids())


def train(
    client,
    task: Task,
    args: argparse.Namespace,
    seed: int,
    name: str,
    loss_fn_config: dict[str, float] | None = None,
) -> list[float]:
    """`args.steps` Adam steps on fresh random users (seeds below the held-out ones), the learning rate
    constant or decaying linearly to 0; mean loss per answer token per step."""
    steps, batch = args.steps, args.batch
    losses = []
    for step in range(steps):
        decay = 1 - step / steps if args.lr_schedule == "linear" else 1.0
        adam = types.AdamParams(learning_rate=args.lr * decay)
        episodes = task.episodes(batch, seed * 1_000_003 + step)
        fb = client.forward_backward([episode_datum(e) for e in episodes], "cross_entropy", loss_fn_config)
        client.optim_step(adam).result()
        losses.append(fb.result().metrics["loss:sum"] / (batch * 2))
        if (step + 1) % max(steps // 5, 1) == 0:
            log(f"{name}: step {step + 1}/{steps} mean answer CE {losses[-1]:.3f}")
    return losses


class Ask:
    """Greedy `/v1/completions` on token ids; exact match of the decoded value."""

    def __init__(self, url: str, task: Task) -> None:
        self.client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        self.task = task

    def generate(self, model: str, prompt: list[int], tokens: int, user: str | None = None) -> list[int]:
        out = self.client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=tokens,
            temperature=0.0,
            logprobs=0,
            extra_body={"return_tokens_as_token_ids": True},
            **({} if user is None else {"user": user}),
        )
        return [int(t.split(":")[1]) for t in out.choices[0].logprobs.tokens]

    def logprobs(self, model: str, prompt: list[int]) -> list[float]:
        out = self.client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=4,
            temperature=0.0,
            logprobs=0,
            extra_body={"ignore_eos": True},
        )
        return list(out.choices[0].logprobs.token_logprobs)

    def answer(self, model: str, prompt: list[int], user: str | None = None) -> str:
        return self.task.decode_value(self.generate(model, prompt, 2, user))

    def write(self, model: str, prompt: list[int], user: str) -> None:
        """Write `prompt` into `user`'s instance: one generated token, which is not written (the last)."""
        self.generate(model, prompt, 1, user)


def exact(answers: list[str], truth: list[str]) -> float:
    return sum(a == t for a, t in zip(answers, truth, strict=True)) / len(truth)


def lora_parameters(engine: Engine, spec: LoraSpec) -> int:
    return sum(
        sum(torch.Size(s).numel() for s in target.shapes(spec.rank))
        for target in engine.slots.targets_for(spec)
    )


def delta_mem_parameters(engine: Engine, spec: DeltaMemSpec) -> int:
    return sum(p.numel() for p in blank_adapter(engine.model, spec).parameters())


def lora_baseline(
    service, ask: Ask, task: Task, args: argparse.Namespace, rank: int, question: list, truth: list[str]
) -> tuple[float, float]:
    """A plain LoRA trained on the same episodes as δ-mem: its accuracy on the questions alone (it has
    no per-user state) and its final train CE."""
    log(f"training the LoRA baseline (rank {rank})")
    lora = ready(
        service.create_lora_training_client(
            base_model="tiny", rank=rank, seed=args.seed, user_metadata={"adapter_name": "recall-lora"}
        )
    )
    losses = train(lora, task, args, args.seed + 1, "LoRA")
    lora.save_weights_for_sampler("lora").result()
    accuracy = exact([ask.answer("recall-lora", q) for q in question], truth)
    return accuracy, round(sum(losses[-10:]) / 10, 4)


def ttt_lora(
    service, task: Task, args: argparse.Namespace, held_out: list[Episode], question: list, truth: list[str]
) -> dict[str, float]:
    """A fresh LoRA per user, `args.ttt_steps` Adam steps of CE on its session 1, then its question."""
    log(f"per-user TTT LoRA: {args.ttt_users} users, {args.ttt_steps} steps each")
    answers, update_s = [], []
    adam = types.AdamParams(learning_rate=args.ttt_lr)
    for i, e in enumerate(held_out[: args.ttt_users]):
        client = ready(service.create_lora_training_client(base_model="tiny", rank=args.ttt_rank, seed=i))
        told = list(e.sessions[0])
        session = [datum(told, [1.0] * len(told), None)]
        for _ in range(args.ttt_steps):
            u0 = time.perf_counter()
            client.forward_backward(session, "cross_entropy").result()
            client.optim_step(adam).result()
            update_s.append(time.perf_counter() - u0)
        sampler = ready(client.save_weights_and_get_sampling_client(f"ttt{i}"))
        out = sampler.sample(
            types.ModelInput.from_ints(question[i]), 1, types.SamplingParams(max_tokens=2, temperature=0.0)
        ).result()
        answers.append(task.decode_value(list(out.sequences[0].tokens)))
    return {
        "ttt_lora": exact(answers, truth[: args.ttt_users]),
        "ttt_lora_ms_per_update": round(1000 * sum(update_s) / len(update_s), 2),
    }


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mintd-recall"), help="stage 0 cache, data")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, here and in the server")
    parser.add_argument("--users", type=int, default=200, help="held-out users")
    parser.add_argument("--ttt-users", type=int, default=50, help="held-out users for the per-user TTT LoRA")
    parser.add_argument("--facts", type=int, default=2, help="K, facts told in session 1")
    parser.add_argument(
        "--distractor-sessions", type=int, default=1, help="between session 1 and the question"
    )
    parser.add_argument(
        "--other-facts", type=int, default=0, help="other people's facts per distractor session"
    )
    parser.add_argument("--steps", type=int, default=1500, help="δ-mem and LoRA training steps")
    parser.add_argument("--batch", type=int, default=32, help="episodes per training step")
    parser.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate (δ-mem and LoRA)")
    parser.add_argument(
        "--lr-schedule", default="constant", choices=["constant", "linear"], help="linear: decays to 0"
    )
    parser.add_argument("--state-rank", type=int, default=16, help="δ-mem state rank r (state r × r a layer)")
    parser.add_argument(
        "--write-sparsity",
        type=float,
        default=0.0,
        help="weight of δ-mem's write-sparsity regulariser, (mean write gate − target)² (0: off)",
    )
    parser.add_argument("--write-sparsity-target", type=float, default=0.0, help="its target mean gate")
    parser.add_argument(
        "--skip-baselines",
        action="store_true",
        help="for iterating on δ-mem only: no LoRA baseline and no TTT LoRA (their keys are left out)",
    )
    parser.add_argument(
        "--adapter",
        default="delta_mem+lora",
        choices=["delta_mem", "delta_mem+lora"],
        help="+lora: with a rank-8 LoRA on the unembedding",
    )
    parser.add_argument("--ttt-steps", type=int, default=8, help="k: updates on session 1 per TTT user")
    parser.add_argument("--ttt-rank", type=int, default=1, help="the per-user LoRA's rank")
    parser.add_argument("--ttt-lr", type=float, default=1e-2, help="the per-user LoRA's Adam learning rate")
    parser.add_argument("--port", type=int, default=18471, help="for the bench's own `mintd serve`")
    parser.add_argument(
        "--seed", type=int, default=0, help="held-out users, training users and adapter init (not stage 0)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    config = TaskConfig(args.facts, args.distractor_sessions, args.other_facts)

    # stage 0 reads facts when they are visible: told and asked with nothing between (the design's "facts
    # and question in one segment"); distractor sessions are for what is under test, not the backbone
    log("stage 0: a base competent at the in-context task")
    base_dir = args.workdir / f"base-k{args.facts}"
    settings = dict(
        arch="qwen3", size="test", seed=0, lr=1e-3, batch=32, max_steps=3000, eval_every=100, target_em=0.95
    )
    stage0 = prepare_backbone(base_dir, lambda tok: Task(tok, TaskConfig(args.facts)), settings, log)
    timings["stage0_s"] = round(time.perf_counter() - started, 1)
    task = Task(AutoTokenizer.from_pretrained(base_dir), config)
    held_out = task.episodes(args.users, seed=10**9 + args.seed)
    partners = swap_partners(held_out)
    truth = [e.value for e in held_out]
    # what the partner's state should say to i's question: the partner's value of the attribute i asks
    partner_truth = [held_out[j].facts[e.asked] for e, j in zip(held_out, partners, strict=True)]

    engine = Engine(base_dir)
    dm_spec = DeltaMemSpec(
        rank=args.state_rank, readout_init="base_slice", seed=args.seed, lora=args.adapter == "delta_mem+lora"
    )
    dm_lora = LoraSpec(rank=8, seed=args.seed, train_mlp=False, train_attn=False)
    dm_params = delta_mem_parameters(engine, dm_spec) + (
        lora_parameters(engine, dm_lora) if dm_spec.lora else 0
    )
    lora_rank = next(r for r in range(1, 257) if lora_parameters(engine, LoraSpec(rank=r)) >= dm_params)
    ttt_bytes = lora_parameters(engine, LoraSpec(rank=args.ttt_rank)) * 4  # fp32 A and B
    state_bytes = engine.model.config.num_hidden_layers * dm_spec.rank**2 * 4  # [layers, r, r] fp32
    del engine

    data_dir = args.workdir / f"data-{os.getpid()}"
    with server(base_dir, data_dir, args.port, args.threads) as url:
        service = tinker.ServiceClient(base_url=url, api_key=KEY)
        t0 = time.perf_counter()
        log(f"training δ-mem ({args.adapter}, {dm_params} parameters)")
        readout = {"mintd.delta_mem.readout_init": "base_slice", "mintd.delta_mem.rank": str(args.state_rank)}
        metadata = {"mintd.adapter": args.adapter, **readout}
        dm = ready(
            service.create_lora_training_client(
                base_model="tiny",
                rank=8,
                seed=args.seed,
                train_mlp=False,
                train_attn=False,
                user_metadata={**metadata, "adapter_name": "recall-dm"},
            )
        )
        sparsity = {WRITE_SPARSITY: args.write_sparsity, WRITE_SPARSITY_TARGET: args.write_sparsity_target}
        dm_losses = train(dm, task, args, args.seed + 1, "δ-mem", sparsity if args.write_sparsity else None)
        dm.save_weights_for_sampler("dm").result()
        probe_model = "recall-dm"
        if dm_spec.lora:  # the LoRA part moves the logits whatever the state: probe δ-mem alone, untrained
            probe_model = "recall-dm-only"
            only = {"mintd.adapter": "delta_mem", **readout}
            fresh = ready(
                service.create_lora_training_client(
                    base_model="tiny",
                    rank=8,
                    seed=args.seed,
                    user_metadata={**only, "adapter_name": probe_model},
                )
            )
            fresh.save_weights_for_sampler("dm-only").result()
        timings["delta_mem_train_s"] = round(time.perf_counter() - t0, 1)

        ask = Ask(url, task)
        question = [list(e.sessions[-1]) for e in held_out]
        lora_acc: dict = {}  # the LoRA baseline's keys (none with --skip-baselines)
        ttt: dict = {}
        lora_ce: dict = {}
        if not args.skip_baselines:
            t0 = time.perf_counter()
            accuracy, ce = lora_baseline(service, ask, task, args, lora_rank, question, truth)
            lora_acc, lora_ce = {"lora": accuracy}, {"lora_final_train_ce": ce}
            timings["lora_train_s"] = round(time.perf_counter() - t0, 1)

        t0 = time.perf_counter()
        log("base: query only and full history")
        base_query_only = exact([ask.answer("tiny", q) for q in question], truth)
        base_full = exact([ask.answer("tiny", e.full_context()) for e in held_out], truth)
        timings["baselines_s"] = round(time.perf_counter() - t0, 1)

        if not args.skip_baselines:
            t0 = time.perf_counter()
            ttt = {
                **ttt_lora(service, task, args, held_out, question, truth),
                "ttt_lora_bytes_per_user": ttt_bytes,
            }
            timings["ttt_s"] = round(time.perf_counter() - t0, 1)

        t0 = time.perf_counter()
        log("δ-mem: writing session 1 into each user's instance (and the swap and rollback instances)")
        for i, e in enumerate(held_out):
            for session in e.sessions[:-1]:
                ask.write("recall-dm", list(session), f"u{i}")
                ask.write("recall-dm", list(session), f"r{i}")
            for session in held_out[partners[i]].sessions[:-1]:
                ask.write("recall-dm", list(session), f"x{i}")
        timings["delta_mem_write_s"] = round(time.perf_counter() - t0, 1)
        probes = question[:8]
        bit_equal_before = all(ask.logprobs(probe_model, p) == ask.logprobs("tiny", p) for p in probes)

    log("restarting the server")
    with server(base_dir, data_dir, args.port, args.threads) as url:
        ask = Ask(url, task)
        catalog = httpx.Client(base_url=f"{url}/api/v1/catalog", headers={"X-API-Key": KEY}, timeout=30)
        t0 = time.perf_counter()
        log("δ-mem: asking from live, empty, swapped and rolled-back states")
        own, empty, swapped, rolled = [], [], [], []
        for i in range(len(held_out)):
            own.append(ask.answer("recall-dm", question[i], f"u{i}"))
            empty.append(ask.answer("recall-dm", question[i]))
            swapped.append(ask.answer("recall-dm", question[i], f"x{i}"))
            for _ in held_out[i].sessions[:-1]:  # back to the state before session 1 (the empty first one)
                catalog.post(f"/adapters/recall-dm.mem.r{i}/aliases/live/rollback").raise_for_status()
            rolled.append(ask.answer("recall-dm", question[i], f"r{i}"))
        timings["delta_mem_ask_s"] = round(time.perf_counter() - t0, 1)
        bit_equal = bit_equal_before and all(
            ask.logprobs(probe_model, p) == ask.logprobs("tiny", p) for p in probes
        )

    chance = config.chance
    delta_mem = exact(own, truth)
    rolled_back = exact(rolled, truth)
    empty_acc = exact(empty, truth)
    timings["total_s"] = round(time.perf_counter() - started, 1)
    result = {
        "bench": "delta_mem_recall",
        "config": {
            **vars(args),
            "workdir": str(args.workdir),
            "values": len(task.value_ids),
            "stage0": stage0,
            "delta_mem_parameters": dm_params,
            "lora_rank": lora_rank,
            "empty_state_probe": "the trained δ-mem weights"
            if not dm_spec.lora
            else "an untrained δ-mem-only adapter (base_slice readouts): the trained one carries a LoRA",
            "delta_mem_final_train_ce": round(sum(dm_losses[-10:]) / 10, 4),
            **lora_ce,
        },
        "n_users": len(held_out),
        "chance": chance,
        "base_query_only": base_query_only,
        "base_full_context": base_full,
        **lora_acc,
        **ttt,
        "delta_mem": delta_mem,
        "delta_mem_empty": empty_acc,
        "delta_mem_swapped_true": exact(swapped, truth),
        "delta_mem_swapped_other": exact(swapped, partner_truth),
        "delta_mem_rolled_back": rolled_back,
        "state_bytes_per_user": state_bytes,
        "empty_state_bit_equal": bit_equal,
        "recall_gain": round(delta_mem - chance, 4),
        "empty_gap": round(empty_acc - chance, 4),
        "rollback_gap": round(rolled_back - chance, 4),
        "timings": timings,
    }
    print(json.dumps(result), flush=True)
    os._exit(0)  # the SDK's event-loop thread can abort interpreter teardown; the work is done


if __name__ == "__main__":
    main()
