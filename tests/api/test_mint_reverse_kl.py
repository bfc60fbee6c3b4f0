"""The `mint` SDK's forward_backward_reverse_kl, unmodified, against a real server: the loss equals a
KL computed client-side from full next-token distributions (Hugging Face + PEFT on the exported
weights), and training with it drives the student to its reference."""

import math
import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.api.http import TinkerHTTP
from tests.sdk import run_sdk_json

SCRIPT = """
import json
import mint
from mint import types
from mint.mint import ReverseKLDatum, forward_backward_reverse_kl

service = mint.ServiceClient(base_url={url!r}, api_key="sk-e2e")
teacher = service.create_lora_training_client(base_model="tiny", rank=4, seed=1)
ids = list(range(20, 40))
sft = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                  loss_fn_inputs={{"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)}})
for _ in range(4):
    teacher.forward_backward([sft], "cross_entropy").result()
    teacher.optim_step(types.AdamParams(learning_rate=5e-2)).result()
teacher_path = teacher.save_weights_for_sampler("teacher").result().path

student = service.create_lora_training_client(base_model="tiny", rank=8, seed=2)
student_path = student.save_weights_for_sampler("before").result().path
context, prompt, completion = [5, 6, 7, 8], [20, 21, 22], [23, 24, 25, 26]
data = [ReverseKLDatum(  # the student sees no context; the reference does; they align on the last positions
    student_input=types.ModelInput.from_ints(prompt + completion[:-1]),
    reference_input=types.ModelInput.from_ints(context + prompt + completion[:-1]),
    target_tokens=types.TensorData(data=[21, 22] + completion, dtype="int64"),
    weights=types.TensorData(data=[0.0, 0.5] + [1.0] * len(completion), dtype="float32"),
)]
out = {{"teacher_path": teacher_path, "student_path": student_path}}
for name, ref, tau in (("teacher", teacher_path, 1.0), ("base", "tiny", 0.8)):
    r = forward_backward_reverse_kl(student, reference_model_path=ref, data=data, temperature=tau)
    out[name] = {{"losses": r.outputs[0].loss.data, "metrics": r.metrics}}
student.optim_step(types.AdamParams(learning_rate=0.0)).result()  # drop those gradients, change nothing

curve = []
for step in range(25):
    r = forward_backward_reverse_kl(student, reference_model_path=teacher_path, data=data)
    curve.append(r.metrics["loss:sum"])
    student.optim_step(types.AdamParams(learning_rate=1e-2)).result()
out["curve"] = curve
print(json.dumps(out))
"""


def hf_logprobs(model_dir: Path, files: dict[str, bytes] | None, tokens: list[int], tmp: Path, tau: float):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if files is not None:
        tmp.mkdir()
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        model = PeftModel.from_pretrained(model, tmp)
    with torch.no_grad():
        logits = model.eval()(torch.tensor([tokens])).logits[0].double()
    return torch.log_softmax(logits / tau, -1)


def test_reverse_kl_through_the_mint_sdk(server, tmp_path):
    out = run_sdk_json("mint-0.2", SCRIPT.format(url=server.url), timeout=300)
    svc = server.service
    student_in = [20, 21, 22, 23, 24, 25]
    reference_in = [5, 6, 7, 8, *student_in]
    weights = torch.tensor([0.0, 0.5, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    targets = torch.tensor([21, 22, 23, 24, 25, 26])
    student_files = svc.peft_files("local", out["student_path"])
    for name, files, tau in (
        ("teacher", svc.peft_files("local", out["teacher_path"]), 1.0),
        ("base", None, 0.8),
    ):
        ls = hf_logprobs(server.model_dir, student_files, student_in, tmp_path / f"s-{name}", tau)
        lr = hf_logprobs(server.model_dir, files, reference_in, tmp_path / f"r-{name}", tau)[
            -len(student_in) :
        ]
        kl = weights * (ls.exp() * (ls - lr)).sum(-1)
        got = out[name]
        assert got["losses"] == pytest.approx(kl.tolist(), rel=1e-4, abs=1e-7)
        assert got["metrics"]["loss:sum"] == pytest.approx(float(kl.sum()), rel=1e-4)
        sampled = weights * (ls.gather(-1, targets[:, None]) - lr.gather(-1, targets[:, None]))[:, 0]
        assert got["metrics"]["sampled_kl:sum"] == pytest.approx(float(sampled.sum()), rel=1e-3, abs=1e-6)
        assert got["metrics"]["weight:sum"] == pytest.approx(4.5)
    curve = out["curve"]
    assert all(math.isfinite(x) for x in curve)
    assert curve[-1] < 0.1 * curve[0], curve[::5]  # the student moved to its reference


def test_bad_reverse_kl_requests_name_the_field(server):
    with TinkerHTTP(server.url) as c:
        model = c.new_model()
        datum = {
            "student_input": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
            "reference_input": {"chunks": [{"type": "encoded_text", "tokens": [9, 1, 2, 3]}]},
            "target_tokens": {"data": [2, 3, 4], "dtype": "int64"},
            "weights": {"data": [1.0, 1.0, 1.0], "dtype": "float32"},
        }

        def post(**change):
            body = {"model_id": model, "reference_model_path": "tiny", "data": [datum], **change}
            return c.post("mint/forward_backward_reverse_kl", body)

        short = {
            **datum,
            "target_tokens": {"data": [1, 2, 3, 4], "dtype": "int64"},
            "weights": {"data": [1.0] * 4, "dtype": "float32"},
        }
        cases = [
            (post(reference_model_path="tinker://nope/sampler_weights/x"), 404, "nope"),
            (
                post(data=[datum, short]),
                400,
                r"data\[1\]\.target_tokens: 4 positions, but student_input has only 3",
            ),
            (post(data=[{**datum, "weights": None}]), 400, r"data\[0\]\.weights: missing"),
            (post(temperature=0), 422, "temperature"),
            (post(model_id="nope"), 404, "nope"),
        ]
        for response, status, message in cases:
            assert response.status_code == status, response.text
            assert re.search(message, response.json()["detail"]), response.text
        same = {**datum, "reference_input": datum["student_input"]}
        done = c.result(post(data=[same], seq_id=1).json())  # with a seq_id: that place in the run's order
        assert done["metrics"]["loss:sum"] == pytest.approx(0.0, abs=1e-6)  # a fresh adapter is the base
        assert c.result(post().json())["metrics"]["loss:sum"] > 1e-3  # the reference saw extra context
