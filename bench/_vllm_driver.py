"""The vLLM side of bench/vs_vllm_cpu.py, run by the vLLM venv's python (it imports no mintd).

    VENV/bin/python bench/_vllm_driver.py JOB.json RESULT.json

JOB.json: {"model_dir", "dtype", "threads", "adapters": [[name, peft_dir], ...], "max_lora_rank",
"max_num_seqs", "cases": {case: {"prompts": [[ids]], "adapters": [index or null per row],
"max_tokens", "repeats"}}}. Each case runs once to warm up, then `repeats` timed times; RESULT.json gets
{"seconds": {case: [..]}, "tokens": {case: [[ids] per row]}, "version"}. vLLM runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), greedy, ignoring EOS, without detokenizing (random-weight models
emit ids the small tokenizer does not have).
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    with open(sys.argv[1]) as f:
        job = json.load(f)
    threads = job["threads"]
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(job.get("kv_cache_gib", 2)))

    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    torch.set_num_threads(threads)
    llm = LLM(
        model=job["model_dir"],
        dtype=job["dtype"],
        enable_lora=True,
        max_loras=len(job["adapters"]),
        max_lora_rank=job["max_lora_rank"],
        max_num_seqs=job["max_num_seqs"],
        max_model_len=job.get("max_model_len", 512),
        enable_prefix_caching=False,  # repeats reuse the prompts; mintd caches no prefix across requests
        seed=0,
    )
    loras = [LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(job["adapters"])]
    seconds: dict[str, list[float]] = {}
    tokens: dict[str, list[list[int]]] = {}
    for case, spec in job["cases"].items():
        params = SamplingParams(
            temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True, detokenize=False
        )
        prompts = [{"prompt_token_ids": p} for p in spec["prompts"]]
        lora = [None if a is None else loras[a] for a in spec["adapters"]]
        if all(x is None for x in lora):
            lora = None

        def run(prompts=prompts, params=params, lora=lora) -> list[list[int]]:
            outs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
            return [list(o.outputs[0].token_ids) for o in outs]

        tokens[case] = run()  # warm-up (also loads the adapters)
        times = []
        for _ in range(spec["repeats"]):
            start = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - start)
            assert all(len(t) == spec["max_tokens"] for t in out)
        seconds[case] = times
        print(f"[vllm] {case}: {[round(t, 3) for t in times]} s", file=sys.stderr, flush=True)
    result = {"seconds": seconds, "tokens": tokens, "version": vllm.__version__}
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
