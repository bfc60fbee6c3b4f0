"""Population evaluation benchmark: one evaluation run vs scoring each adapter by itself.

A real mintd server (in this process, on 127.0.0.1) over a tiny base model holds `--adapters` distinct
saved revisions (random LoRA weights, saved through the checkpoint path). The same eval set of
`--prompts` prompts (greedy, `--max-tokens` tokens each, exact-match against one adapter's answers) is
scored for every adapter, side by side:

  eval_run      one POST /api/v1/evaluations/runs over all adapters; polled until done. The server
                samples every adapter × prompt as bulk ops in shared engine batches, scores, and records
                each adapter's score as a catalog evaluation.
  per_adapter   what a user does without it, through the sampling API: per adapter, a sampling
                session, all its prompts submitted (asample) then their futures retrieved, the
                outputs scored here and the score recorded through the catalog REST API.

Both score with the same scorer; `same_scores` says whether every adapter got the same score both
ways. Prints one JSON line: both times and `speedup` = per_adapter_s / eval_run_s.
    python bench/population_eval.py [--adapters 256] [--prompts 64] [--size test] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

import httpx  # noqa: E402
import torch  # noqa: E402

from mintd.config import ServeSettings  # noqa: E402
from mintd.engine.tiny import make_tiny_model  # noqa: E402
from mintd.eval import ScorerSpec, parse_items  # noqa: E402
from mintd.server import ServerThread, build_app  # noqa: E402
from tests.populations import save_population  # noqa: E402

WORDS = ("the", "cat", "sat", "on", "a", "mat", "two", "plus", "three", "is", "five", "and")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def prompts(n: int) -> list[str]:
    return [" ".join(WORDS[(i * 7 + k * 5) % len(WORDS)] for k in range(3 + i % 5)) for i in range(n)]


def ok(reply: httpx.Response) -> dict:
    assert reply.status_code == 200, f"{reply.request.url}: {reply.status_code} {reply.text}"
    return reply.json()


def result(http: httpx.Client, request_id: str) -> dict:
    while True:
        body = ok(http.post("/retrieve_future", json={"request_id": request_id}))
        if body.get("type") != "try_again":
            assert "error" not in body, body
            return body


def eval_run(http: httpx.Client, refs: list[str], items: list[dict], max_tokens: int) -> dict[str, float]:
    body = {
        "revisions": {"refs": refs},
        "eval_set": items,
        "suite": "bench-eval-run",
        "sampling_params": {"max_tokens": max_tokens},
    }
    run = ok(http.post("/evaluations/runs", json=body))
    final = result(http, run["request_id"])
    assert final["status"] == "done" and final["progress"]["revisions_failed"] == 0, final
    return {r["revision"]: r["score"] for r in final["revisions"]}


def per_adapter(
    http: httpx.Client, refs: list[str], items: list[dict], max_tokens: int, tokenizer
) -> dict[str, float]:
    scorer = ScorerSpec().build()
    parsed = parse_items(items)
    session = ok(http.post("/create_session", json={"tags": []}))["session_id"]
    params = {"max_tokens": max_tokens, "temperature": 0.0}
    scores = {}
    for i, ref in enumerate(refs):
        body = {"session_id": session, "sampling_session_seq_id": i, "model_path": ref}
        sampler = ok(http.post("/create_sampling_session", json=body))["sampling_session_id"]
        submitted = [
            ok(
                http.post(
                    "/asample",
                    json={
                        "sampling_session_id": sampler,
                        "seq_id": j,
                        "prompt": {
                            "chunks": [{"type": "encoded_text", "tokens": tokenizer.encode(item["prompt"])}]
                        },
                        "sampling_params": params,
                    },
                )
            )["request_id"]
            for j, item in enumerate(items)
        ]
        outputs = [
            tokenizer.decode(result(http, rid)["sequences"][0]["tokens"], skip_special_tokens=True)
            for rid in submitted
        ]
        score = sum(scorer.score(o, it) for o, it in zip(outputs, parsed, strict=True)) / len(items)
        adapter = ref.split("/", 1)[1].split("@", 1)[0]
        evaluation = {"ref": ref, "suite": "bench-per-adapter", "metric": "exact_match", "value": score}
        ok(http.post(f"/catalog/adapters/{adapter}/evaluations", json=evaluation))
        scores[ref] = score
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--size", default="test", help="tiny-model preset (test or small)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 16 adapters × 8 prompts")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.adapters, args.prompts = 16, 8
    with tempfile.TemporaryDirectory(prefix="mintd-bench-") as tmp:
        model_dir = make_tiny_model(Path(tmp) / "model", arch="qwen3", size=args.size)
        app, service = build_app({"tiny": model_dir}, ServeSettings(data_dir=Path(tmp) / "data"))
        tokenizer = service.models["tiny"].engine.tokenizer
        log(f"saving {args.adapters} adapters")
        revisions = save_population(service, [f"bench-{i:04d}" for i in range(args.adapters)])
        refs = [r.ref for r in revisions]
        texts = prompts(args.prompts)
        with (
            ServerThread(app) as server,
            httpx.Client(
                base_url=f"{server.url}/api/v1", headers={"X-API-Key": "tml-bench"}, timeout=120
            ) as http,
        ):
            probe = [{"id": f"q{j}", "prompt": p, "expected": "-"} for j, p in enumerate(texts)]
            body = {"revisions": {"refs": refs[:1]}, "eval_set": probe, "suite": "probe", "scorer": None,
                    "record": False, "sampling_params": {"max_tokens": args.max_tokens}}  # fmt: skip
            run = ok(http.post("/evaluations/runs", json=body))
            result(http, run["request_id"])  # warm-up, and the right answers: the first adapter's
            rows = [
                json.loads(line)
                for line in http.get(f"/evaluations/runs/{run['run_id']}/results").text.splitlines()
            ]
            answers = [r["output"] for r in rows if r["type"] == "sample"]
            items = [
                {"id": f"q{j}", "prompt": p, "expected": a}
                for j, (p, a) in enumerate(zip(texts, answers, strict=True))
            ]
            log("per-adapter sampling through the sampling API")
            started = time.perf_counter()
            alone = per_adapter(http, refs, items, args.max_tokens, tokenizer)
            per_adapter_s = time.perf_counter() - started
            log(f"  {per_adapter_s:.1f}s; one evaluation run")
            started = time.perf_counter()
            shared = eval_run(http, refs, items, args.max_tokens)
            eval_run_s = time.perf_counter() - started
            log(f"  {eval_run_s:.1f}s")
        service.close()
    print(
        json.dumps(
            {
                "bench": "population_eval",
                "adapters": args.adapters,
                "prompts": args.prompts,
                "max_tokens": args.max_tokens,
                "size": args.size,
                "device": str(service.models["tiny"].engine.device),
                "threads": torch.get_num_threads(),
                "eval_run_s": round(eval_run_s, 3),
                "per_adapter_s": round(per_adapter_s, 3),
                "speedup": round(per_adapter_s / eval_run_s, 2),
                "same_scores": alone == shared,
                "mean_score": sum(shared.values()) / len(shared),
            }
        )
    )


if __name__ == "__main__":
    main()
