"""Sampled logprobs under temperature, through the tinker 0.38 SDK: those of the tempered distribution,
the check the cookbook's own validate_temperature_logprobs makes."""

from tests.sdk import run_sdk_json

SCRIPT = """
import json
import tinker
from tinker import types

service = tinker.ServiceClient(base_url={url!r}, api_key="tml-e2e")
sampler = service.create_sampling_client(base_model="tiny")
prompt = types.ModelInput.from_ints([5, 6, 7])
out = {{}}
for tau in (1.0, 0.5, 1.5):
    params = types.SamplingParams(max_tokens=1, temperature=tau, seed=3, stop=[])
    seqs = sampler.sample(prompt, num_samples=64, sampling_params=params).result().sequences
    out[str(tau)] = {{str(s.tokens[0]): s.logprobs[0] for s in seqs}}
print(json.dumps(out))
"""


def test_tempered_logprob_differences_scale_by_one_over_tau(server):
    out = run_sdk_json("tinker-0.38", SCRIPT.format(url=server.url), timeout=120)
    base = out["1.0"]
    for temperature in ("0.5", "1.5"):  # same prompt, same position
        tempered = out[temperature]
        common = sorted(set(base) & set(tempered))
        assert len(common) >= 5
        errors = [
            abs((tempered[i] - tempered[j]) - (base[i] - base[j]) / float(temperature))
            for i, j in zip(common[:-1], common[1:], strict=True)
        ]
        assert max(errors) < 1e-4, (temperature, max(errors))
