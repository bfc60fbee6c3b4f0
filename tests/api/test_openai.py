"""The OpenAI endpoint end to end: the official `openai` client against a real server on 127.0.0.1, over
adapters trained through the Tinker API on the same server.

Two revisions of one adapter learn different answers (`poet@1` says blue, `poet@2` the cat); another owner
has an adapter of the same name. Everything here is deterministic (temperature 0, or a seed)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from mintd.service.tinker import TinkerService
from tests.api.conftest import start_server
from tests.api.http import ADAM, TinkerHTTP, datum

ALICE, BOB = "key-alice", "key-bob"
PROMPT = "Color:"
ANSWERS = {1: " blue blue", 2: " the cat"}
GREEDY: dict[str, Any] = {"temperature": 0.0, "max_tokens": 8}


@dataclass
class Served:
    url: str
    service: TinkerService
    tokenizer: Any
    poet_run: str

    def client(self, key: str = ALICE, prefix: str = "/v1") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + prefix, api_key=key, max_retries=0, timeout=60)

    def catalog(self, key: str = ALICE) -> httpx.Client:
        return httpx.Client(base_url=f"{self.url}/api/v1/catalog", headers={"X-API-Key": key}, timeout=30)


def _teach(c: TinkerHTTP, model_id: str, seq: int, tokenizer: Any, answer: str, steps: int = 60) -> int:
    """Supervised steps until `PROMPT` is answered with `answer` then EOS; the next seq id."""
    prompt = tokenizer.encode(PROMPT)
    completion = tokenizer.encode(answer) + [tokenizer.eos_token_id]
    tokens = prompt + completion
    weights = [0.0] * (len(prompt) - 1) + [1.0] * len(completion)
    data = [datum(tokens[:-1], tokens[1:], weights)]
    for _ in range(steps):
        c.loss(model_id, seq, data)
        c.result(c.optim_step(model_id, seq + 1, {**ADAM, "learning_rate": 4e-3}).json())
        seq += 2
    return seq


def _adapter_run(c: TinkerHTTP, name: str) -> str:
    body = {
        "session_id": c.session(),
        "model_seq_id": 0,
        "base_model": "tiny",
        "lora_config": {"rank": 8, "seed": 0},
        "user_metadata": {"adapter_name": name},
    }
    return c.result(c.ok("create_model", body))["model_id"]


def _save(c: TinkerHTTP, model_id: str, seq: int, name: str) -> str:
    return c.result(c.ok("save_weights_for_sampler", {"model_id": model_id, "seq_id": seq, "path": name}))[
        "path"
    ]


@pytest.fixture(scope="module")
def served(qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    data_dir = tmp_path_factory.mktemp("openai")
    thread, service = start_server(qwen3_dir, data_dir, [f"alice={ALICE}", f"bob={BOB}"])
    tokenizer = AutoTokenizer.from_pretrained(qwen3_dir)
    with thread, TinkerHTTP(thread.url, api_key=ALICE) as alice, TinkerHTTP(thread.url, api_key=BOB) as bob:
        run = _adapter_run(alice, "poet")
        seq = _teach(alice, run, 1, tokenizer, ANSWERS[1])
        _save(alice, run, seq, "first")
        seq = _teach(alice, run, seq + 1, tokenizer, ANSWERS[2])
        _save(alice, run, seq, "second")
        other = _adapter_run(bob, "poet")  # bob's own "poet": the same name, another owner
        _save(bob, other, _teach(bob, other, 1, tokenizer, " green", steps=10), "g")
        yield Served(thread.url, service, tokenizer, run)
    service.close()


def _text(client: openai.OpenAI, model: str, **kwargs: Any) -> str:
    answer = client.completions.create(model=model, prompt=PROMPT, **{**GREEDY, **kwargs})
    return answer.choices[0].text


def _streamed(client: openai.OpenAI, model: str, **kwargs: Any) -> str:
    chunks = client.completions.create(model=model, prompt=PROMPT, stream=True, **{**GREEDY, **kwargs})
    return "".join(c.choices[0].text for c in chunks if c.choices)


# each revision, and aliases that follow promote and rollback ------------------------------------------


def test_each_revision_answers_what_it_learned_and_aliases_follow_promote_and_rollback(served: Served):
    client, catalog = served.client(), served.catalog()
    first = client.completions.create(model="poet@1", prompt=PROMPT, **GREEDY)
    assert (first.choices[0].text, first.choices[0].finish_reason) == (ANSWERS[1], "stop")
    assert first.system_fingerprint == "alice/poet@1"
    assert _text(client, "poet@2") == ANSWERS[2]
    assert _text(client, "poet") == ANSWERS[2]  # the newest revision
    assert _text(client, "alice/poet@1") == ANSWERS[1]
    assert _text(client, f"tinker://{served.poet_run}/sampler_weights/first") == ANSWERS[1]

    residency = served.service.models["tiny"].worker.residency
    loads = residency.stats()["misses"]
    assert catalog.post("/adapters/poet/aliases/prod", json={"ref": "1"}).status_code == 200
    assert _text(client, "poet:prod") == ANSWERS[1]
    assert catalog.post("/adapters/poet/aliases/prod", json={"ref": "2"}).status_code == 200
    answer = client.completions.create(model="poet:prod", prompt=PROMPT, **GREEDY)
    assert (answer.choices[0].text, answer.system_fingerprint) == (ANSWERS[2], "alice/poet@2")
    assert catalog.post("/adapters/poet/aliases/prod/rollback").status_code == 200
    assert _text(client, "poet:prod") == ANSWERS[1]
    assert _streamed(client, "poet:prod") == ANSWERS[1]
    # both revisions were resident already: moving the alias loaded nothing
    assert residency.stats()["misses"] == loads
    chat = client.chat.completions.create(model="poet:prod", messages=[{"role": "user", "content": "hi"}])
    assert chat.system_fingerprint == "alice/poet@1"


def test_a_request_in_flight_finishes_on_the_revision_it_started_with(served: Served):
    client, catalog = served.client(), served.catalog()
    long = {"max_tokens": 60, "extra_body": {"ignore_eos": True}, "temperature": 0.0}
    want_first, want_second = _text(client, "poet@1", **long), _text(client, "poet@2", **long)
    assert want_first != want_second
    assert catalog.post("/adapters/poet/aliases/live", json={"ref": "1"}).status_code == 200
    stream = client.completions.create(model="poet:live", prompt=PROMPT, stream=True, **long)
    chunks = iter(stream)
    first = next(chunks).choices[0].text
    assert catalog.post("/adapters/poet/aliases/live", json={"ref": "2"}).status_code == 200
    assert _text(client, "poet:live", **long) == want_second  # the next request sees the move
    rest = "".join(c.choices[0].text for c in chunks if c.choices)
    assert first + rest == want_first


# streaming equals whole answers; usage is exact ---------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny", "poet@1"])
def test_streamed_text_equals_the_whole_answer_and_usage_is_exact(served: Served, model: str):
    client, tok = served.client(), served.tokenizer
    params = {"max_tokens": 24, "temperature": 0.0, "extra_body": {"ignore_eos": True}}
    whole = client.completions.create(model=model, prompt=PROMPT, logprobs=0, **params)
    chunks = list(
        client.completions.create(
            model=model, prompt=PROMPT, stream=True, stream_options={"include_usage": True}, **params
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert whole.usage.prompt_tokens == len(tok.encode(PROMPT))
    assert whole.usage.completion_tokens == len(whole.choices[0].logprobs.tokens) == 24
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 24
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]
    chat_params = {"max_completion_tokens": 16, "temperature": 0.0}
    chat = client.chat.completions.create(model=model, messages=messages, **chat_params)
    pieces = list(
        client.chat.completions.create(
            model=model, messages=messages, stream=True, stream_options={"include_usage": True}, **chat_params
        )
    )
    assert pieces[0].choices[0].delta.role == "assistant"
    streamed = "".join(p.choices[0].delta.content or "" for p in pieces if p.choices)
    assert streamed == chat.choices[0].message.content
    assert pieces[-1].usage == chat.usage
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.usage.prompt_tokens == len(tok.encode(rendered, add_special_tokens=False))


def test_stop_strings_cut_the_text_streamed_or_not(served: Served):
    client = served.client()
    assert _text(client, "poet@1", stop=[" blue"]) == ""
    for streamed in (False, True):
        get = _streamed if streamed else _text
        assert get(client, "poet@1", stop=["e b"]) == " blu"
        assert get(client, "poet@2", stop="cat") == " the "
        assert get(client, "poet@2", stop=["x", "e c"]) == " th"
    answer = client.completions.create(model="poet@1", prompt=PROMPT, stop=["e b"], **GREEDY)
    assert (answer.choices[0].text, answer.choices[0].finish_reason) == (" blu", "stop")
    assert (
        client.completions.create(model="poet@2", prompt=PROMPT, temperature=0, max_tokens=2)
        .choices[0]
        .finish_reason
        == "length"
    )


def test_logprobs_equal_tinker_compute_logprobs_of_the_same_revision(served: Served):
    client, tok = served.client(), served.tokenizer
    request = {
        "model": "poet@1",
        "prompt": PROMPT,
        "max_tokens": 6,
        "temperature": 0.7,
        "seed": 3,
        "logprobs": 3,
        "extra_body": {"ignore_eos": True, "return_tokens_as_token_ids": True},
    }
    answer = client.completions.create(**request)
    lp = answer.choices[0].logprobs
    prompt = tok.encode(PROMPT)
    tokens = [int(t.removeprefix("token_id:")) for t in lp.tokens]
    assert len(tokens) == answer.usage.completion_tokens == 6
    with TinkerHTTP(served.url, api_key=ALICE) as c:
        body = {"session_id": c.session(), "sampling_session_seq_id": 0, "model_path": "poet@1"}
        sampler = c.ok("create_sampling_session", body)["sampling_session_id"]
        scored = c.result(
            c.ok(
                "asample",
                {
                    "sampling_session_id": sampler,
                    "seq_id": 0,
                    "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt + tokens}]},
                    "num_samples": 1,
                    "sampling_params": {"max_tokens": 1, "temperature": 0.0},
                    "prompt_logprobs": True,
                },
            )
        )
    assert lp.token_logprobs == pytest.approx(scored["prompt_logprobs"][len(prompt) :], abs=1e-5)
    assert all(
        len(top) <= 3 and max(top.values()) >= v - 1e-6
        for top, v in zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    )
    # streamed: every chunk carries its own token's logprobs, scored by the step that made it
    chunks = [c.choices[0] for c in client.completions.create(**request, stream=True) if c.choices]
    assert [len(c.logprobs.tokens) for c in chunks] == [1] * 6
    assert [c.logprobs.tokens[0] for c in chunks] == lp.tokens
    assert [c.logprobs.token_logprobs[0] for c in chunks] == pytest.approx(lp.token_logprobs, abs=1e-6)
    assert [c.logprobs.top_logprobs[0] for c in chunks] == [
        pytest.approx(t, abs=1e-6) for t in lp.top_logprobs
    ]

    chat = client.chat.completions.create(
        model="poet@1",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)


# many adapters at once; a disconnected stream ------------------------------------------------------------


def test_concurrent_requests_for_many_adapters_and_the_base_never_mix(served: Served):
    client, bob = served.client(), served.client(BOB)
    params = {"max_tokens": 12, "temperature": 0.0, "extra_body": {"ignore_eos": True}}
    who = [(client, "poet@1"), (client, "poet@2"), (client, "tiny"), (bob, "poet")]
    alone = {model + str(id(c)): _text(c, model, **params) for c, model in who}
    assert len(set(alone.values())) == 4
    got: list[tuple[str, str]] = []
    lock = threading.Lock()

    def ask(i: int) -> None:
        c, model = who[i % len(who)]
        text = _streamed(c, model, **params) if i % 2 else _text(c, model, **params)
        with lock:
            got.append((model + str(id(c)), text))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 24
    assert all(text == alone[key] for key, text in got)


def _metric(url: str, name: str, model: str = "tiny") -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f'{name}{{model="{model}"}}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def _long_stream(client: openai.OpenAI, **kwargs: Any) -> Any:
    """A stream of 3000 tokens from the base model: it runs until the client hangs up."""
    return client.completions.create(
        model="tiny",
        prompt=PROMPT,
        stream=True,
        max_tokens=3000,
        temperature=0.0,
        extra_body={"ignore_eos": True},
        **kwargs,
    )


def test_a_disconnected_stream_stops_consuming_decode_steps(served: Served):
    client = served.client()
    before = _metric(served.url, "mintd_generation_tokens_total")
    stream = _long_stream(client)
    for _, _chunk in zip(range(5), stream, strict=False):
        pass
    stream.close()  # the client hangs up
    deadline = time.monotonic() + 30
    while _metric(served.url, "mintd_sequences_running") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(served.url, "mintd_sequences_running") == 0
    time.sleep(0.5)  # the step running when the client hung up may still add its token
    spent = _metric(served.url, "mintd_generation_tokens_total")
    time.sleep(1.0)
    assert _metric(served.url, "mintd_generation_tokens_total") == spent  # no more decode steps for it
    assert spent - before < 3000
    assert _text(client, "poet@1") == ANSWERS[1]  # and the server goes on


# errors ----------------------------------------------------------------------------------------------------


def _refused(call: Any, status: int, param: str | None, *words: str) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    error = caught.value
    assert error.status_code == status, error
    body = error.response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert body["param"] == param, body
    for word in words:
        assert word in body["message"], body
    return error


def test_unknown_models_other_owners_adapters_and_bad_parameters_are_refused(served: Served):
    client = served.client()

    def complete(**kwargs: Any) -> Any:
        return lambda: client.completions.create(**{"model": "poet@1", "prompt": PROMPT, **kwargs})

    unknown = _refused(complete(model="nobody"), 404, "model", "nobody")
    assert unknown.response.json()["error"]["code"] == "model_not_found"
    # bob has no "poet@2" and cannot name alice's: exactly like a missing one
    bobs = served.client(BOB)
    _refused(lambda: bobs.completions.create(model="poet@2", prompt=PROMPT), 404, "model")
    _refused(lambda: bobs.completions.create(model="alice/poet@1", prompt=PROMPT), 404, "model")
    _refused(lambda: bobs.completions.create(model="poet:prod", prompt=PROMPT), 404, "model")
    _refused(complete(temperature=-1), 400, "temperature")
    _refused(complete(n=0), 400, "n")
    _refused(complete(max_tokens=10**6), 400, "max_tokens", "context")
    _refused(complete(logprobs=50), 400, "logprobs")
    _refused(complete(presence_penalty=0.5), 400, "presence_penalty", "not supported")
    _refused(complete(best_of=3), 400, "best_of")
    _refused(complete(extra_body={"min_p": 0.1}), 400, "min_p", "unsupported")
    _refused(complete(prompt=[]), 400, "prompt")
    _refused(complete(prompt=[10**9]), 400, "prompt")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    chat = client.chat.completions.create
    _refused(
        lambda: chat(model="tiny", messages=[{"role": "user", "content": "x"}], tools=tools), 400, "tools"
    )
    _refused(
        lambda: chat(model="tiny", messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]),
        400,
        "messages.0.role",
    )
    _refused(
        lambda: chat(model="tiny", messages=[{"role": "user", "content": "x"}], top_logprobs=2),
        400,
        "top_logprobs",
    )
    _refused(lambda: served.client("wrong-key").models.list(), 401, None, "unknown API key")
    no_key = httpx.post(f"{served.url}/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert no_key.status_code == 401 and no_key.json()["error"]["type"] == "authentication_error"
    assert _text(client, "poet@1") == ANSWERS[1]  # the server keeps serving
    # the Tinker API key header and MinT's path prefix work too
    r = httpx.get(f"{served.url}/v1/models", headers={"X-API-Key": ALICE})
    assert r.status_code == 200
    assert _text(served.client(prefix="/oai/api/v1"), "poet@1") == ANSWERS[1]
    _refused(
        lambda: client.embeddings.create(model="tiny", input="x"), 404, None, "/embeddings", "not served"
    )


def test_models_lists_the_bases_and_the_callers_adapters_with_aliases(served: Served):
    catalog = served.catalog()
    assert catalog.post("/adapters/poet/aliases/prod", json={"ref": "1"}).status_code == 200
    ids = [m.id for m in served.client().models.list()]
    assert ids[0] == "tiny" and "poet" in ids and "poet:prod" in ids
    assert [m.id for m in served.client(BOB).models.list()] == ["tiny", "poet"]
    prod = next(m for m in served.client().models.list() if m.id == "poet:prod")
    assert prod.owned_by == "alice" and prod.model_extra["revision"] == "alice/poet@1"
    page = httpx.get(
        f"{served.url}/v1/models", params={"limit": 1, "after": "poet"}, headers={"X-API-Key": ALICE}
    )
    assert page.json()["data"] == [] and page.json()["has_more"] is False


def test_a_full_queue_answers_429_with_retry_after(qwen3_dir: Path, tmp_path: Path):
    thread, service = start_server(qwen3_dir, tmp_path / "data", max_pending_rows=2)
    with thread:
        client = openai.OpenAI(base_url=f"{thread.url}/v1", api_key="k", max_retries=0)
        stream = _long_stream(client, n=2)
        next(iter(stream))
        busy = _refused(lambda: client.completions.create(model="tiny", prompt=PROMPT), 429, "model", "retry")
        assert int(busy.response.headers["retry-after"]) >= 1
        stream.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the hung-up stream gives its rows back
            try:
                client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
                break
            except openai.RateLimitError:
                time.sleep(0.05)
        else:
            raise AssertionError("the queue never drained")
        rejected = _metric(thread.url, "mintd_requests_rejected_total")
        assert rejected >= 1
    service.close()


def test_metrics_show_serving_residency_and_training(served: Served):
    client = served.client()
    _text(client, "poet@1")
    _refused(lambda: client.completions.create(model="nobody", prompt="x"), 404, "model")
    text = httpx.get(f"{served.url}/metrics").text
    assert 'mintd_http_requests_total{method="POST",route="/v1/completions",status="200"}' in text
    assert 'mintd_http_requests_total{method="POST",route="/v1/completions",status="404"}' in text
    assert _metric(served.url, "mintd_time_to_first_token_seconds_count") >= 1
    assert _metric(served.url, "mintd_inter_token_latency_seconds_count") >= 1
    assert _metric(served.url, "mintd_prompt_tokens_total") >= 1
    assert _metric(served.url, "mintd_training_steps_total") >= 120
    assert 'mintd_residency_hits_total{model="tiny",tier="device"}' in text
    assert 'mintd_residency_bytes{model="tiny",tier="device"}' in text
    assert "alice" not in text and "poet" not in text  # no owner or adapter ever becomes a label
