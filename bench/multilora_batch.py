"""Multi-LoRA batching benchmark: what does serving 32 different adapters in one batch cost?

For one batch of rows (32 by default) on a `small` tiny model (`--arch`, qwen3 by default), side by side
in one process:

  single      the engine, every row on one rank-16 adapter (decode: frozen snapshots, as sampling reads)
  mixed       the engine, every row on its own adapter (ranks cycling 4, 8, 16, 32)
  peft_mixed  the same 32 adapters in one PeftModel, mixed batch through `adapter_names=`
  swap        one single-adapter PeftModel (rank 32); each adapter's weights are copied into it
              (zero-padded to rank 32, scaling set to alpha / rank: the same function), then that
              adapter's row runs alone; the copies are timed too

for DECODE (greedy, a fixed number of new tokens per row, no early stop) and TRAIN (forward + backward
of a token-sum cross-entropy). Every case uses the same weights, dtype, device and thread count; PEFT
runs in eval mode under no_grad for decode. Each case is warmed up once, then measured `--repeats`
times in interleaved rounds (so machine noise hits all cases alike); medians are reported.

Prints exactly one JSON line to stdout; progress goes to stderr.
    python bench/multilora_batch.py [--quick] [--size small|base] [--dtype float32|bfloat16] [--rows 32]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

import torch  # noqa: E402
from peft import PeftModel, get_peft_model, set_peft_model_state_dict  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from mintd.config import EngineSettings  # noqa: E402
from mintd.engine.adapters import LoraSpec  # noqa: E402
from mintd.engine.engine import Engine  # noqa: E402
from mintd.engine.sampling import SampleRequest, SamplingParams  # noqa: E402
from mintd.engine.tiny import ARCHS, make_tiny_model  # noqa: E402
from mintd.engine.train import Datum, TrainGroup  # noqa: E402
from mintd.store.peft import (  # noqa: E402
    is_expert_target,
    nesting_depths,
    peft_config,
    peft_unloadable,
    to_peft_state_dict,
)

SINGLE_RANK = 16
MIXED_RANKS = (4, 8, 16, 32)
CASES = ("single", "mixed", "peft_mixed", "swap")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def targets_of(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted({k.rpartition(".")[0] for k in tensors})


def peft_can_express_mlp(engine: Engine) -> bool:
    """False where PEFT rewrites dense-MLP names into fused experts (see mintd.store.peft.peft_unloadable)."""
    return not peft_unloadable(engine.model.config.model_type, list(engine.slots.targets))


def make_adapter(engine: Engine, rank: int, seed: int) -> int:
    """An engine adapter with random non-zero B (a fresh one has B = 0, i.e. equals the base). Where PEFT
    cannot express the family's dense MLPs, every case uses adapters without MLP targets, alike."""
    slot = engine.create_adapter(LoraSpec(rank=rank, seed=seed, train_mlp=peft_can_express_mlp(engine)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, b in engine.slots[slot].weights.values():
            b.copy_((torch.randn(b.shape, generator=gen) * 0.02).to(b.device))
    return slot


def load_base(model_dir: Path, engine: Engine) -> torch.nn.Module:
    """The same base weights, dtype, device and attention kernel as the engine's model."""
    attn = engine.model.config._attn_implementation
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=engine.dtype, attn_implementation=attn)
    return model.to(engine.device)


def peft_mixed_model(model_dir: Path, engine: Engine, slots: list[int]) -> PeftModel:
    """One PeftModel holding every adapter (`a<i>`), loaded from the engine's exported tensors."""
    model: PeftModel | None = None
    base = load_base(model_dir, engine)
    for i, slot in enumerate(slots):
        spec, tensors = engine.export_adapter(slot)
        config = peft_config(spec, targets_of(tensors))
        name = f"a{i}"
        if model is None:
            model = get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        result = set_peft_model_state_dict(model, to_peft_state_dict(tensors), adapter_name=name)
        assert not result.unexpected_keys, result.unexpected_keys
    assert model is not None
    return model.eval()


class SwapModel:
    """A single-adapter PeftModel (rank = the largest) that adapters are copied into one at a time."""

    NAME = "swap"

    def __init__(self, model_dir: Path, engine: Engine, slots: list[int], max_rank: int) -> None:
        spec, tensors = engine.export_adapter(slots[0])
        config = peft_config(spec.model_copy(update={"rank": max_rank}), targets_of(tensors))
        self.model = get_peft_model(load_base(model_dir, engine), config, adapter_name=self.NAME).eval()
        inner = self.model.base_model.model
        depths = nesting_depths([t for t in targets_of(tensors) if is_expert_target(t)])
        self.adapters = []  # per adapter: [(peft lora layer, A, B)], scale
        for slot in slots:
            spec, tensors = engine.export_adapter(slot)  # host copies, as a server would keep them
            layers = []
            for t in targets_of(
                tensors
            ):  # a fused-expert parameter's wrapper sits `depth` deep in its module
                module = t.rpartition(".")[0] + ".base_layer" * depths[t] if t in depths else t
                layers.append((inner.get_submodule(module), tensors[f"{t}.lora_A"], tensors[f"{t}.lora_B"]))
            self.adapters.append((layers, spec.scale))

    @torch.no_grad()
    def swap_in(self, i: int) -> None:
        layers, scale = self.adapters[i]
        for layer, a, b in layers:
            wa, wb = layer.lora_A[self.NAME].weight, layer.lora_B[self.NAME].weight
            if a.dim() == 3:  # experts: PEFT holds A as [E*R, in] and B as [out, R*E] (expert index last)
                experts, r = a.shape[:2]
                wa = wa.view(experts, -1, wa.shape[-1])
                wa[:, :r].copy_(a)
                wa[:, r:].zero_()
                wb = wb.view(wb.shape[0], -1, experts)
                wb[:, :r].copy_(b.permute(1, 2, 0))
                wb[:, r:].zero_()
                layer.scaling[self.NAME] = scale
                continue
            r = a.shape[0]
            wa[:r].copy_(a, non_blocking=True)
            wa[r:].zero_()
            wb[:, :r].copy_(b, non_blocking=True)
            wb[:, r:].zero_()
            layer.scaling[self.NAME] = scale


def left_pad(
    prompts: list[torch.Tensor], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def token_sum_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The engine's cross_entropy: Σ −log p(target), no normalisation."""
    logits = logits.float()
    lp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return -lp.sum()


def measure(fns: dict[str, Callable[[], None]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per case: one warm-up each, then `repeats` interleaved rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():
        log(f"  warm-up {name}")
        fn()
    for rep in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
        log(f"  round {rep + 1}/{repeats}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()))
    # Process CPU time is a cross-check on a shared machine (other load stretches wall time).
    log("  median CPU s: " + ", ".join(f"{n} {statistics.median(t):.2f}" for n, t in cpu.items()))
    return {name: statistics.median(t) for name, t in times.items()}


def summary(tokens: int, seconds: dict[str, float | None]) -> dict:
    tps = {name: (tokens / seconds[name] if seconds.get(name) else None) for name in CASES}

    def ratio(case: str) -> float | None:
        return round(tps["mixed"] / tps[case], 3) if tps.get(case) and tps["mixed"] else None

    return {
        "mixed_vs_single": ratio("single"),
        "mixed_vs_peft": ratio("peft_mixed"),
        "mixed_vs_swap": ratio("swap"),
        "tokens_per_s": {name: (round(v, 1) if v else None) for name, v in tps.items()},
    }


def peft_mixed_refusal(model: PeftModel, ids: torch.Tensor, names: list[str], train: bool) -> str | None:
    """Why PEFT refuses a mixed-adapter batch in this mode (fused experts: always), or None."""
    model.train(train)
    try:
        with torch.no_grad():
            model(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]), adapter_names=names[:1])
        return None
    except ValueError as e:
        return f"unsupported: {e}"
    finally:
        model.eval()


def bench_decode(ctx: dict, args: argparse.Namespace) -> dict:
    engine, rows, n_new = ctx["engine"], args.rows, args.decode_tokens
    device, pad = engine.device, engine.pad_id
    prompts = ctx["prompts"]
    params = SamplingParams(max_tokens=n_new, temperature=0.0, stop=[])

    def engine_run(slots: list[int]) -> Callable[[], None]:
        """Through the step engine, on frozen snapshots of the adapters (what a sampling client reads)."""
        frozen = [ctx["frozen"][slot] for slot in slots]
        requests = [SampleRequest(slot, p.tolist(), params) for slot, p in zip(frozen, prompts, strict=True)]

        def run() -> None:
            out = engine.sample(requests)
            assert all(len(r.sequences[0].tokens) == n_new for r in out)
            ctx.setdefault("engine_tokens", {})[tuple(slots)] = [r.sequences[0].tokens for r in out]

        return run

    ids, mask = left_pad(prompts, pad, device)
    gen_kwargs = dict(do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=pad)
    peft_mixed: PeftModel = ctx["peft_mixed"]
    names = [f"a{i}" for i in range(rows)]

    def peft_run() -> None:
        with torch.no_grad():
            out = peft_mixed.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **gen_kwargs)
        assert out.shape[1] == ids.shape[1] + n_new
        ctx["peft_tokens"] = out[:, ids.shape[1] :].tolist()

    swap: SwapModel = ctx["swap"]

    def swap_run() -> None:
        with torch.no_grad():
            for i in range(rows):
                swap.swap_in(i)
                one, one_mask = left_pad([prompts[i]], pad, device)
                out = swap.model.generate(input_ids=one, attention_mask=one_mask, **gen_kwargs)
                assert out.shape[1] == one.shape[1] + n_new

    fns = {
        "single": engine_run([ctx["single_slot"]] * rows),
        "mixed": engine_run(ctx["mixed_slots"]),
        "peft_mixed": peft_run,
        "swap": swap_run,
    }
    refused = peft_mixed_refusal(peft_mixed, ids, names, train=False)
    if refused:
        del fns["peft_mixed"]
    seconds = measure(fns, args.repeats, device)
    if not refused:
        ours = ctx["engine_tokens"][tuple(ctx["mixed_slots"])]
        same = sum(a == b for a, b in zip(ours, ctx["peft_tokens"], strict=True))
        log(f"decode: engine mixed and PEFT mixed agree on {same}/{rows} greedy sequences")
    return {**summary(rows * n_new, seconds), **({"peft_mixed": refused} if refused else {})}


def bench_train(ctx: dict, args: argparse.Namespace) -> dict:
    engine, rows, n_tok = ctx["engine"], args.rows, args.train_tokens
    device = engine.device
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, engine.vocab_size, (n_tok + 1,), generator=gen) for _ in range(rows)]
    data = [Datum(s[:-1], {"target_tokens": s[1:]}) for s in seqs]
    ids = torch.stack([s[:-1] for s in seqs]).to(device)
    targets = torch.stack([s[1:] for s in seqs]).to(device)
    mask = torch.ones_like(ids)
    all_slots = [ctx["single_slot"], *ctx["mixed_slots"]]

    def clear_engine_grads() -> None:
        for slot in all_slots:
            for p in engine.slots[slot].params:
                p.grad = None

    def engine_single() -> None:
        engine.forward_backward([TrainGroup(ctx["single_slot"], data)])
        clear_engine_grads()

    def engine_mixed() -> None:
        engine.forward_backward([TrainGroup(s, [d]) for s, d in zip(ctx["mixed_slots"], data, strict=True)])
        clear_engine_grads()

    peft_mixed: PeftModel = ctx["peft_mixed"]
    names = [f"a{i}" for i in range(rows)]
    unsupported = peft_mixed_refusal(peft_mixed, ids, names, train=True)
    refused = peft_mixed_refusal(peft_mixed, ids, names, train=False)  # not even in eval mode
    log(f"train: PEFT mixed batch in training mode: {unsupported or 'supported'}")

    lora_params = [p for n, p in peft_mixed.named_parameters() if "lora_" in n]

    def peft_run() -> None:
        """PEFT's mixed batch under grad (model.train() when PEFT allows it, else eval mode)."""
        peft_mixed.train(unsupported is None)
        for p in lora_params:
            p.requires_grad_(True)
        logits = peft_mixed(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        token_sum_loss(logits, targets).backward()
        for p in lora_params:
            p.grad = None
        peft_mixed.eval()

    swap: SwapModel = ctx["swap"]
    swap_params = [p for p in swap.model.parameters() if p.requires_grad]

    def swap_run() -> None:
        swap.model.train()
        for i in range(rows):
            swap.swap_in(i)
            logits = swap.model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits
            token_sum_loss(logits, targets[i : i + 1]).backward()
            for p in swap_params:
                p.grad = None
        swap.model.eval()

    fns = {"single": engine_single, "mixed": engine_mixed, "peft_mixed": peft_run, "swap": swap_run}
    if refused:
        del fns["peft_mixed"]
    seconds = measure(fns, args.repeats, device)
    out: dict = {}
    if refused:
        out = {**summary(rows * n_tok, seconds), "peft_mixed": refused}
    elif unsupported is not None:
        # PEFT refuses this in training mode; the eval-mode timing is kept apart, for information only.
        eval_grad = rows * n_tok / seconds.pop("peft_mixed")
        seconds["peft_mixed"] = None
        out = summary(rows * n_tok, seconds)
        out["peft_mixed_train"] = unsupported
        out["peft_mixed_eval_mode_grad_tokens_per_s"] = round(eval_grad, 1)
    else:
        out = summary(rows * n_tok, seconds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (test-size model, 4 rows)")
    parser.add_argument("--model-dir", type=Path, help="use this model folder instead of building one")
    parser.add_argument("--size", default="small", help="tiny-model preset to build (default: small)")
    parser.add_argument("--arch", default="qwen3", choices=ARCHS, help="tiny-model family to build")
    parser.add_argument("--rows", type=int, default=32, help="rows (= distinct adapters) per batch")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--decode-tokens", type=int, default=32, help="new tokens per row")
    parser.add_argument("--train-tokens", type=int, default=64, help="tokens per training row")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="base-model dtype (all cases)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads for every case (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.size, args.rows, args.prompt_tokens = "test", 4, 8
        args.decode_tokens, args.train_tokens, args.repeats = 4, 16, 1
    warnings.filterwarnings("ignore")
    real_stdout = sys.stdout
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        started = time.perf_counter()
        model_dir = args.model_dir
        if model_dir is None:
            log(f"building the {args.size!r} {args.arch} tiny model")
            model_dir = make_tiny_model(Path(tmp) / "model", arch=args.arch, seed=0, size=args.size)
        engine = Engine(model_dir, EngineSettings(device=args.device, dtype=args.dtype))
        n_params = sum(p.numel() for p in engine.model.parameters())
        log(
            f"{n_params / 1e6:.1f}M parameters on {engine.device} ({engine.dtype}), "
            f"{torch.get_num_threads()} threads"
        )
        ranks = [MIXED_RANKS[i % len(MIXED_RANKS)] for i in range(args.rows)]
        ctx: dict = {"engine": engine, "single_slot": make_adapter(engine, SINGLE_RANK, seed=1000)}
        ctx["mixed_slots"] = [make_adapter(engine, r, seed=i) for i, r in enumerate(ranks)]
        ctx["frozen"] = {s: engine.snapshot(s) for s in [ctx["single_slot"], *ctx["mixed_slots"]]}
        mib = {
            "base": sum(p.numel() * p.element_size() for p in engine.model.parameters()) / 2**20,
            "single": engine.slots[ctx["single_slot"]].nbytes / 2**20,
            "mixed": sum(engine.slots[s].nbytes for s in ctx["mixed_slots"]) / 2**20,
        }
        log("weights read per decode step (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in mib.items()))
        log("loading PEFT models")
        ctx["peft_mixed"] = peft_mixed_model(model_dir, engine, ctx["mixed_slots"])
        ctx["swap"] = SwapModel(model_dir, engine, ctx["mixed_slots"], max(ranks))
        gen = torch.Generator().manual_seed(0)
        ctx["prompts"] = [
            torch.randint(0, engine.vocab_size, (args.prompt_tokens,), generator=gen)
            for _ in range(args.rows)
        ]
        log(f"decode: {args.rows} rows x {args.decode_tokens} new tokens")
        decode = bench_decode(ctx, args)
        log(f"train: {args.rows} rows x {args.train_tokens} tokens")
        train = bench_train(ctx, args)
        device = torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu"
        result = {
            "arch": engine.model.config.model_type,
            "attn_implementation": engine.model.config._attn_implementation,
            "train_mlp": peft_can_express_mlp(engine),
            "model_params": n_params,
            "rows": args.rows,
            "device": device,
            "threads": torch.get_num_threads(),
            "dtype": str(engine.dtype).removeprefix("torch."),
            "decode": decode,
            "train": train,
        }
        log(f"done in {time.perf_counter() - started:.0f}s")
    print(json.dumps(result), file=real_stdout, flush=True)


if __name__ == "__main__":
    main()
