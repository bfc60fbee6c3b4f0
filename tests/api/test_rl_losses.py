"""gspo and stable_reinforce through the tinker 0.38 SDK, unmodified: sampled with
`record_stability_info=True`, trained on datums carrying provenance spans (the layout the cookbook
builds), and learning on the tiny model. Bad span references are 400s naming datum and position."""

import re

import pytest

from mintd.api import proto
from tests.api.http import TinkerHTTP
from tests.sdk import run_sdk_json

RL = """
import json
import tinker
from tinker import types
from tinker.types import PromptProvenanceSpan as P, SampledProvenanceSpan as S

service = tinker.ServiceClient(base_url={url!r}, api_key="tml-e2e")
training = service.create_lora_training_client(base_model="tiny", rank=8, seed=0).result()
prompt = [11, 12, 13, 14]
probe = types.ModelInput.from_ints(prompt + [0])
loss_fn, with_mask = {loss_fn!r}, {with_mask!r}
adam = types.AdamParams(learning_rate={lr!r})

def even_mass(sampler):  # exact: P(first sampled token is even), from the full next-token distribution
    params = types.SamplingParams(max_tokens=1)
    out = sampler.sample(probe, 1, params, include_prompt_logprobs=True, topk_prompt_logprobs=1024).result()
    return sum(math.exp(lp) for t, lp in out.topk_prompt_logprobs[-1] if t % 2 == 0)

import math
out = {{"even_mass": [], "ids": [], "losses": []}}
for it in range({iterations}):
    sampler = training.save_weights_and_get_sampling_client(record_stability_info=True).result()
    out["even_mass"].append(even_mass(sampler))
    params = types.SamplingParams(max_tokens=2, temperature=1.0, seed=it, stop=[])
    seqs = sampler.sample(types.ModelInput.from_ints(prompt), 16, params).result().sequences
    rewards = [float(s.tokens[0] % 2 == 0) for s in seqs]  # what even_mass measures
    mean = sum(rewards) / len(rewards)
    data = []
    for s, r in zip(seqs, rewards):
        full, n, L, sid = prompt + list(s.tokens), len(s.tokens), len(prompt), s.sequence_id
        pad = [0.0] * (L - 1)
        inputs = {{"target_tokens": full[1:], "logprobs": pad + list(s.logprobs),
                   "advantages": pad + [r - mean] * n}}
        if with_mask:
            inputs["sequence_ratio_mask"] = pad + [1.0] * n
        datum = types.Datum(model_input=types.ModelInput.from_ints(full[:-1]), loss_fn_inputs=inputs)
        data.append(datum.with_provenance(
            model_input=[P(sequence_id=sid, offset=0, length=L), S(sequence_id=sid, offset=0, length=n - 1)],
            loss_fn_inputs=[P(sequence_id=sid, offset=1, length=L - 1),
                            S(sequence_id=sid, offset=0, length=n)],
        ))
    out["ids"].append([s.sequence_id for s in seqs])
    fb = training.forward_backward(data, loss_fn).result()
    training.optim_step(adam).result()
    out["losses"].append(fb.metrics["loss:sum"])
    out["logprob_rows"] = [len(o["logprobs"].data) for o in fb.loss_fn_outputs]
sampler = training.save_weights_and_get_sampling_client().result()
out["even_mass"].append(even_mass(sampler))
out["model_id"] = training.model_id
print(json.dumps(out))
"""


@pytest.mark.parametrize(
    ("loss_fn", "with_mask"), [("stable_reinforce", False), ("gspo", True), ("gspo", False)]
)
def test_rl_loss_learns_through_the_sdk(server, loss_fn, with_mask):
    script = RL.format(url=server.url, loss_fn=loss_fn, with_mask=with_mask, lr=3e-2, iterations=10)
    out = run_sdk_json("tinker-0.38", script, timeout=240)
    mass = out["even_mass"]
    if loss_fn == "stable_reinforce":  # every sequence of a recording client was recorded
        assert len(server.service.sequences) >= 16 * 10
    assert mass[-1] > mass[0] + 0.1, mass[::2]  # the policy moved toward even tokens
    ids = [i for batch in out["ids"] for i in batch]
    assert len(set(ids)) == len(ids)  # one distinct id per sampled sequence
    assert out["logprob_rows"] == [4 - 1 + 2] * 16


PROMPT = [11, 12, 13, 14]


def _sample(c: TinkerHTTP, session: str, record: bool, seq: int = 0) -> tuple[str, list[int]]:
    """One recorded (or not) sequence of 3 tokens from the base model: its id and tokens."""
    body = {"session_id": session, "sampling_session_seq_id": seq, "base_model": "tiny"}
    sampler = c.ok("create_sampling_session", body)["sampling_session_id"]
    submitted = c.ok(
        "asample",
        {
            "sampling_session_id": sampler,
            "seq_id": 1,
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": PROMPT}]},
            "num_samples": 1,
            "sampling_params": {"max_tokens": 3, "seed": 1, "stop": []},
            "record_stability_info": record,
        },
    )
    tokens = c.result(submitted)["sequences"][0]["tokens"]
    return submitted["sample_sequence_ids"][0], tokens


def _span(kind: str, sequence_id: str, offset: int, length: int) -> dict:
    key = "sampled_tokens" if kind == "S" else "prompt_tokens"
    return {key: {"sequence_id": sequence_id, "offset": offset, "length": length}}


def _datum(sequence_id: str, sampled: list[int], advantage: float = 1.0, **override) -> dict:
    """The cookbook's layout: model_input = F[:-1], targets F[1:], spans shifted by one."""
    full, n, length = PROMPT + sampled, len(sampled), len(PROMPT)
    rows = len(full) - 1
    datum = {
        "model_input": {"chunks": [{"type": "encoded_text", "tokens": full[:-1]}]},
        "loss_fn_inputs": {
            "target_tokens": {"data": full[1:], "dtype": "int64"},
            "logprobs": {"data": [0.0] * rows, "dtype": "float32"},
            "advantages": {"data": [0.0] * (length - 1) + [advantage] * n, "dtype": "float32"},
        },
        "model_input_spans": [_span("P", sequence_id, 0, length), _span("S", sequence_id, 0, n - 1)],
        "loss_fn_input_spans": [_span("P", sequence_id, 1, length - 1), _span("S", sequence_id, 0, n)],
    }
    datum.update(override)
    return datum


def _post(c: TinkerHTTP, model_id: str, seq_id: int, data: list[dict], loss_fn: str):
    body = proto.encode_forward_backward_request(model_id, seq_id, data, loss_fn)
    return c.http.post("/forward_backward", content=body, headers={"Content-Type": "application/x-protobuf"})


def test_bad_span_references_are_400s_naming_datum_and_position(server):
    with TinkerHTTP(server.url) as c:
        session = c.session()
        model = c.create_model(session)
        recorded, tokens = _sample(c, session, record=True)
        unrecorded, other_tokens = _sample(c, session, record=False, seq=1)
        foreign, foreign_tokens = _sample(c, c.session(), record=True)  # another session's sequence
        good = _datum(recorded, tokens)
        wrong_target = {
            **good["loss_fn_inputs"],
            "target_tokens": {"data": PROMPT[1:] + [tokens[0], 999, tokens[2]], "dtype": "int64"},
        }
        prompt_advantage = {
            **good["loss_fn_inputs"],
            "advantages": {"data": [0.5] + [0.0] * 5, "dtype": "float32"},
        }
        cases = [
            (
                _datum("no-such-id", tokens),
                r"data\[1\]\.model_input_spans\[0\]: sequence_id 'no-such-id' is unknown",
            ),
            (
                _datum(unrecorded, other_tokens),
                r"data\[1\]\.model_input_spans\[0\]: sequence_id .* unknown or expired",
            ),
            (
                _datum(foreign, foreign_tokens),
                r"data\[1\]\.model_input_spans\[0\]: sequence_id .* unknown or expired",
            ),
            (
                {**good, "loss_fn_input_spans": good["loss_fn_input_spans"][:1]},
                r"data\[1\]\.loss_fn_input_spans: spans cover 3 positions but the datum has 6 target_tokens",
            ),
            (
                {**good, "loss_fn_input_spans": None},
                r"data\[1\]: model_input_spans and loss_fn_input_spans come as a pair",
            ),
            (
                {**good, "loss_fn_input_spans": [_span("P", recorded, 1, 3), _span("S", recorded, 1, 3)]},
                r"data\[1\]\.loss_fn_input_spans\[1\]: positions \[1, 4\) exceed the 3 sampled tokens",
            ),
            (
                {**good, "loss_fn_inputs": wrong_target},
                r"data\[1\]\.loss_fn_input_spans\[1\]: target_tokens position 4 is token 999",
            ),
            (
                {**good, "loss_fn_inputs": prompt_advantage},
                r"data\[1\]\.advantages: position 0 is not a sampled token",
            ),
            (
                {**good, "model_input_spans": None, "loss_fn_input_spans": None},
                r"data\[1\]: stable_reinforce needs model_input_spans",
            ),
        ]
        for seq_id, (bad, message) in enumerate(cases, start=1):
            r = _post(c, model, seq_id, [good, bad], "stable_reinforce")
            assert r.status_code == 400, (message, r.text)
            assert re.search(message, r.json()["detail"]), (message, r.text)
        # the same batch trains once the bad datum is gone, and other losses accept spans naming
        # sequences that were never recorded (the cookbook sends spans on every RL loss)
        seq_id = len(cases) + 1
        assert "loss:sum" in c.result(_post(c, model, seq_id, [good], "stable_reinforce").json())["metrics"]
        unknown = _datum("never-recorded", tokens)
        r = _post(c, model, seq_id + 1, [unknown], "importance_sampling")
        assert r.status_code == 200, r.text
        c.result(r.json())
