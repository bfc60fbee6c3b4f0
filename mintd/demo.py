"""`mintd demo`: three policies learn at once over one resident base model, through the official SDK.

Each policy is a LoRA adapter with its own goal and reward. A supervised phase teaches the answer
format from a few demonstrations; an RL phase (importance sampling, group-relative advantages) then
raises the reward on the policy's own samples. All three run concurrently against one in-process
`mintd` server, which merges their forward_backward calls and their samples into shared batches.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]


@dataclass
class Goal:
    name: str
    prompts: list[str]
    demonstration: Callable[[str], str]  # the ideal completion of a prompt (for the SL phase)
    reward: Callable[[str, str], float]  # (prompt, completion) -> [0, 1]


def _numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"-?\d+", text)]


def _count_demo(prompt: str) -> str:
    last = _numbers(prompt)[-1]
    return " " + " ".join(str(last + i) for i in range(1, 4))


def _count_reward(prompt: str, completion: str) -> float:
    want = _numbers(_count_demo(prompt))
    got = _numbers(completion)[:3]
    return sum(g == w for g, w in zip(got, want, strict=False)) / len(want)


def _sum_reward(prompt: str, completion: str) -> float:
    a, b = _numbers(prompt)[:2]
    got = _numbers(completion)
    return float(bool(got) and got[0] == a + b)


def _color_reward(prompt: str, completion: str) -> float:
    words = re.findall(r"[a-z]+", completion.lower())
    return float(bool(words) and words[0] in COLORS)


GOALS = [
    Goal(
        "counter",
        [f"Count: {n} {n + 1} {n + 2}" for n in (1, 4, 10, 20, 31, 50)],
        _count_demo,
        _count_reward,
    ),
    Goal(
        "adder",
        [f"{a} + {b} =" for a, b in ((3, 4), (10, 5), (2, 2), (7, 1), (6, 3), (12, 8))],
        lambda p: f" {sum(_numbers(p)[:2])}",
        _sum_reward,
    ),
    Goal(
        "colorist",
        ["Name a color:", "Pick a color:", "Your favorite color:", "A color, please:"],
        lambda p: " " + COLORS[len(p) % len(COLORS)],
        _color_reward,
    ),
]


@dataclass
class Outcome:
    reward_before: float = 0.0
    reward_after: float = 0.0
    checkpoints: list[str] = field(default_factory=list)
    catalog: str = ""  # what the catalog did with the final revision
    error: str | None = None


class Policy:
    """One goal, one LoRA training client, its own loop (a tinker-cookbook style recipe)."""

    def __init__(
        self, goal: Goal, service_client, tokenizer, progress: Progress, task, sl_steps: int, rl_steps: int
    ):
        import tinker

        self.t = tinker
        self.goal = goal
        self.tokenizer = tokenizer
        self.progress = progress
        self.task = task
        self.sl_steps, self.rl_steps = sl_steps, rl_steps
        self.client = service_client.create_lora_training_client(  # saves become revisions of goal.name
            base_model="tiny", rank=16, seed=len(goal.name), user_metadata={"adapter_name": goal.name}
        ).result()  # tinker 0.38: client factories return futures
        self.eos = tokenizer.eos_token_id
        self.outcome = Outcome()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def evaluate(self, sampler, samples: int = 8) -> float:
        params = self.t.types.SamplingParams(max_tokens=12, temperature=1.0)
        futures = [
            (p, sampler.sample(self.t.types.ModelInput.from_ints(self.encode(p)), samples, params))
            for p in self.goal.prompts
        ]
        rewards = [
            self.goal.reward(p, self.tokenizer.decode(s.tokens, skip_special_tokens=True))
            for p, f in futures
            for s in f.result().sequences
        ]
        return sum(rewards) / len(rewards)

    def supervised_datum(self, prompt: str):
        prompt_ids = self.encode(prompt)
        completion = self.encode(self.goal.demonstration(prompt)) + [self.eos]
        ids = prompt_ids + completion
        weights = [0.0] * (len(prompt_ids) - 1) + [1.0] * len(completion)  # learn the answer only
        return self.t.types.Datum(
            model_input=self.t.types.ModelInput.from_ints(ids[:-1]),
            loss_fn_inputs={"target_tokens": ids[1:], "weights": weights},
        )

    def rl_data(self, sampler, group_size: int = 8) -> tuple[list, float]:
        params = self.t.types.SamplingParams(max_tokens=12, temperature=1.0)
        futures = [
            (p, sampler.sample(self.t.types.ModelInput.from_ints(self.encode(p)), group_size, params))
            for p in self.goal.prompts
        ]
        data, all_rewards = [], []
        for prompt, fut in futures:
            seqs = fut.result().sequences
            rewards = [
                self.goal.reward(prompt, self.tokenizer.decode(s.tokens, skip_special_tokens=True))
                for s in seqs
            ]
            all_rewards += rewards
            mean = sum(rewards) / len(rewards)
            prompt_ids = self.encode(prompt)
            for seq, r in zip(seqs, rewards, strict=True):
                if r == mean or not seq.tokens:
                    continue  # no signal in this sample
                ids = prompt_ids + list(seq.tokens)
                pad = [0.0] * (len(prompt_ids) - 1)
                data.append(
                    self.t.types.Datum(
                        model_input=self.t.types.ModelInput.from_ints(ids[:-1]),
                        loss_fn_inputs={
                            "target_tokens": ids[1:],
                            "logprobs": pad + list(seq.logprobs),
                            "advantages": pad + [r - mean] * len(seq.tokens),
                        },
                    )
                )
        return data, sum(all_rewards) / len(all_rewards)

    def run(self) -> None:
        adam = self.t.types.AdamParams(learning_rate=1e-2, grad_clip_norm=1.0)
        try:
            self.outcome.reward_before = self.evaluate(
                self.client.save_weights_and_get_sampling_client().result()
            )
            for _ in range(self.sl_steps):
                batch = [self.supervised_datum(p) for p in self.goal.prompts]
                fb = self.client.forward_backward(batch, "cross_entropy")
                self.client.optim_step(adam).result()
                loss = fb.result().metrics["loss:sum"]
                self.progress.update(self.task, advance=1, status=f"supervised  loss {loss:6.2f}")
            self.outcome.checkpoints.append(self.client.save_state("after-sl").result().path)
            rl_adam = self.t.types.AdamParams(learning_rate=5e-3, grad_clip_norm=1.0)
            for step in range(self.rl_steps):
                data, reward = self.rl_data(self.client.save_weights_and_get_sampling_client().result())
                if data:
                    self.client.forward_backward(data, "importance_sampling").result()
                    self.client.optim_step(rl_adam).result()
                self.progress.update(self.task, advance=1, status=f"RL  step {step + 1}  reward {reward:.2f}")
            final = self.client.save_weights_for_sampler("final").result().path
            self.outcome.checkpoints.append(final)
            self.outcome.reward_after = self.evaluate(self.client.create_sampling_client(final).result())
            self.progress.update(self.task, status=f"done  reward {self.outcome.reward_after:.2f}")
        except Exception as exc:  # noqa: BLE001 - reported in the table, the other policies go on
            self.outcome.error = f"{type(exc).__name__}: {exc}"
            self.progress.update(self.task, status="[red]failed")


def run_demo(data_dir: Path, sl_steps: int, rl_steps: int, console: Console) -> list[tuple[str, Outcome]]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    import tinker
    from transformers import AutoTokenizer

    from mintd.config import ServeSettings
    from mintd.engine.tiny import make_tiny_model
    from mintd.server import ServerThread, build_app

    random.seed(0)
    model_dir = data_dir / "tiny-qwen3"
    if not (model_dir / "config.json").is_file():
        console.print(f"building the tiny base model in {model_dir}")
        make_tiny_model(model_dir, arch="qwen3", seed=0)
    settings = ServeSettings(data_dir=data_dir / "server")
    app, service = build_app({"tiny": model_dir}, settings)
    columns = [
        TextColumn("{task.description:>9}"),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
    ]
    with ServerThread(app) as server, Progress(*columns, console=console) as progress:
        console.print(f"mintd serving base model 'tiny' at {server.url}; three policies start now")
        client = tinker.ServiceClient(base_url=server.url, api_key="tml-demo")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        policies = [
            Policy(
                goal,
                client,
                tokenizer,
                progress,
                progress.add_task(goal.name, total=sl_steps + rl_steps, status="starting"),
                sl_steps,
                rl_steps,
            )
            for goal in GOALS
        ]
        threads = [threading.Thread(target=p.run, name=p.goal.name) for p in policies]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        for p in policies:
            if not p.outcome.error:
                p.outcome.catalog = _gate_and_promote(service.catalog, p)
        served = _serve(server.url, service.catalog, policies)
    service.close()
    table = Table(title=f"mintd demo: 3 policies trained concurrently in {elapsed:.0f}s")
    for column in ("policy", "reward before → after", "revisions saved (catalog)"):
        table.add_column(column, overflow="fold")
    for p in policies:
        o = p.outcome
        change = f"[red]{o.error}" if o.error else f"{o.reward_before:.2f} → [bold green]{o.reward_after:.2f}"
        table.add_row(p.goal.name, change, o.catalog)
    console.print(table)
    _print_served(console, served)
    _next_steps(console, model_dir, settings.data_dir)
    return [(p.goal.name, p.outcome) for p in policies]


def _next_steps(console: Console, model_dir: Path, server_dir: Path) -> None:
    """Where the demo left its data, and what to try with it."""
    console.print(
        f"\n[bold]Your data[/bold]: the base model is in {model_dir}; the catalog, adapter blobs and run "
        f"records are in {server_dir} (delete the folder to start over; a rerun continues the adapters)."
    )
    console.print("[bold]Try next[/bold] (in a new shell, first: source .venv/bin/activate):")
    for command, why in (
        (f"mintd adapters list --data-dir {server_dir}", "every adapter the demo trained"),
        (f"mintd adapters log counter --data-dir {server_dir}", "one adapter's revisions and provenance"),
        (
            f"mintd serve --model tiny={model_dir} --data-dir {server_dir}",
            "serve them: the snippet above at /v1, or tinker://adapters/counter:prod with the tinker SDK",
        ),
    ):
        console.print(f"  {escape(command)}\n      [dim]{why}[/dim]", soft_wrap=True)


@dataclass
class Served:
    model: str  # the ref the request named
    prompt: str
    answer: str
    revision: str  # what answered (the response's system_fingerprint)


def _serve(url: str, catalog, policies: list[Policy]) -> list[Served]:
    """Each policy answers its first prompt through the OpenAI endpoint, as a deployed policy would:
    by its `prod` alias (or its newest revision while no evaluation has passed the gate)."""
    from openai import OpenAI

    from mintd.catalog import CatalogNotFound

    client = OpenAI(base_url=f"{url}/v1", api_key="tml-demo")
    served = []
    for p in policies:
        if p.outcome.error:
            continue
        model = f"{p.goal.name}:prod"
        try:
            catalog.resolve("local", model)
        except CatalogNotFound:
            model = p.goal.name
        prompt = p.goal.prompts[0]
        answer = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
        served.append(Served(model, prompt, answer.choices[0].text, answer.system_fingerprint or ""))
    return served


def _print_served(console: Console, served: list[Served]) -> None:
    """The answers, and the snippet a user copies to query a policy the same way."""
    if not served:
        return
    table = Table(title="Served through the OpenAI endpoint (/v1), with the official openai client")
    for column in ("model", "prompt", "answer (temperature 0)", "revision that answered"):
        table.add_column(column, overflow="fold")
    for s in served:
        model = s.model if s.model.endswith(":prod") else f"{s.model} (no prod alias yet: the newest)"
        table.add_row(model, repr(s.prompt), repr(s.answer), s.revision)
    console.print(table)
    first = served[0]
    snippet = (
        "from openai import OpenAI\n\n"
        'client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="tml-local")\n'
        f"answer = client.completions.create(model={first.model!r}, prompt={first.prompt!r}, max_tokens=12)\n"
        "print(answer.choices[0].text)"
    )
    console.print("[bold]Query a policy yourself[/bold] (with `mintd serve` running, see below):")
    console.print(escape(snippet), soft_wrap=True, highlight=False)


def _gate_and_promote(catalog, policy: Policy) -> str:
    """Record the final revision's reward as an evaluation, then promote `prod` to it, gated on beating
    the untrained adapter: the catalog's evaluate → promote step of the adapter lifecycle. Returns the
    adapter's revisions and the outcome, for the table."""
    from mintd.catalog import CatalogConflict, Gate

    revisions = [catalog.resolve("local", path) for path in policy.outcome.checkpoints]
    lines = [f"{r.adapter}@{r.number}  {r.kind:<7}  {r.tinker_path.rsplit('/', 1)[1]}" for r in revisions]
    final = revisions[-1]
    reward = policy.outcome.reward_after
    catalog.add_evaluation("local", final.ref, "demo", "reward", reward, evaluator="mintd demo")
    gate = Gate("demo", "reward", policy.outcome.reward_before + 0.05)
    try:
        catalog.promote("local", final.adapter, "prod", final.number, gate=gate)
        lines.append(f"[green]prod → @{final.number}[/green] (reward {reward:.2f} passed the gate)")
    except CatalogConflict:
        lines.append("[yellow]prod not moved[/yellow] (reward below the gate)")
    return "\n".join(lines)
