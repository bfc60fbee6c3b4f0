"""The step engine: iteration-level scheduling of sampling (nano-vllm's shape).

`sequence` holds what one request and each of its samples are; `kv_cache` the paged key/value blocks;
`attention` the flat-batch attention over them; `scheduler` picks each step's tokens within a budget;
`runner` executes one flat token batch; `loop` ties them into `StepEngine.step()`.
"""
