"""Real clients against a live server of the embedded model on 127.0.0.1: lm-eval (``local-completions``
scoring a multiple-choice task and generating until stop strings, ``local-chat-completions``), LangChain's
ChatOpenAI and LiteLLM, as their users run them.

The lm-eval tasks are local (tests/serve/clients/heldout.py: held-out TinyStories, never downloaded). The
multiple-choice loglikelihoods that come back through the server must equal the same sums computed here
with the model itself. The server's engine runs the model batch-invariant (fp32, fixed row tiles, each
query attended as a one-token decode step attends it), so a prompt's logprobs do not depend on its batch
or on how its prefill was cut; the reference runs the same model with the same setting, and the two agree
bit for bit (the default, non-invariant kernels round differently: ~4e-6 on a sum of ~35 token logprobs).

Nothing here may use the internet: the clients' offline switches are set below, before they are imported
(in os.environ, so for the rest of the test session too: they only turn network use off), and every test
fails if anything tried to resolve or connect to a host other than the loopback one.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field

# before lm-eval (datasets, huggingface_hub) and LiteLLM are imported: they read these at import time
OFFLINE_ENV = {
    "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # its bundled cost map, not one fetched at import
    "LITELLM_OFFLINE_MODE": "true",
    "LANGSMITH_TRACING": "false", "LANGCHAIN_TRACING_V2": "false",
}
os.environ.update(OFFLINE_ENV)

import pytest  # noqa: E402

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
pytest.importorskip("uvicorn")

import llama4  # noqa: E402
from llama4.inference.engine import EngineConfig  # noqa: E402
from llama4.model.invariance import set_batch_invariant  # noqa: E402
from llama4.serve.app import create_app  # noqa: E402
from tests.serve.clients import heldout  # noqa: E402
from tests.serve.conftest import LiveServer  # noqa: E402

MODEL = "llama4-tiny"
EOT = "<|eot|>"  # the end-of-turn string the server's /tokenizer_info names, which lm-eval adds to stop lists


@dataclass
class Exchange:
    path: str
    request: dict | None
    reply: dict | None


@dataclass
class Served:
    url: str
    tokenizer: llama4.Tokenizer
    sent: list[Exchange] = field(default_factory=list)  # every POST, in order

    def exchanges(self, path: str) -> list[Exchange]:
        return [e for e in self.sent if e.path == path]

    def bodies(self, path: str) -> list[dict]:
        return [e.request for e in self.exchanges(path)]


class _NoteRequests:
    """ASGI middleware noting each POST's path, JSON body and JSON reply (None for a stream): what the clients
    really sent and got."""

    def __init__(self, app, sent: list):
        self.app, self.sent = app, sent

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        asked, answered = bytearray(), bytearray()

        async def receive_noting():
            message = await receive()
            if message["type"] == "http.request":
                asked.extend(message.get("body", b""))
            return message

        async def send_noting(message):
            if message["type"] == "http.response.body":
                answered.extend(message.get("body", b""))
            await send(message)

        await self.app(scope, receive_noting, send_noting)
        self.sent.append(Exchange(scope["path"], _json_or_none(asked), _json_or_none(answered)))


def _json_or_none(data: bytes):
    try:
        return json.loads(data)
    except ValueError:
        return None


@pytest.fixture(scope="session")
def reference_model():
    """A second copy of the embedded model (fp32) for the in-process scores, batch-invariant as the engine
    runs its own."""
    model = llama4.load_model(None)
    set_batch_invariant(model, True)
    return model


@pytest.fixture(scope="session")
def served():
    """The embedded model (fp32) served as ``llama4-tiny`` by an engine thread in this process."""
    tok = llama4.load_tokenizer(None)
    app = create_app(llama4.load_model(None), tok, model_id=MODEL,
                     engine_config=EngineConfig(max_batch=8, prefill_chunk=256))
    sent: list[Exchange] = []
    app.add_middleware(_NoteRequests, sent=sent)
    live = LiveServer(app)
    yield Served(live.url, tok, sent)
    live.close()


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Refuse (and note) any name lookup or connection beyond the loopback interface; fail the test if
    anything tried one, even if it swallowed the error. (Autouse, so it is in place before the test's other
    function-scoped fixtures: the clients are imported under it.)"""
    tried = []
    real_getaddrinfo = socket.getaddrinfo
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def local(host) -> bool:
        host = host.decode() if isinstance(host, bytes) else host
        return host is None or host in ("localhost", "::1") or str(host).startswith("127.")

    def getaddrinfo(host, *args, **kwargs):
        if not local(host):
            tried.append(host)
            raise socket.gaierror(socket.EAI_NONAME, f"offline test: no lookups of {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    def guarded(real):
        def connect(sock, address):
            if isinstance(address, tuple) and not local(address[0]):
                tried.append(address)
                raise ConnectionRefusedError(f"offline test: no connections to {address!r}")
            return real(sock, address)
        return connect

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", guarded(real_connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guarded(real_connect_ex))
    yield
    assert not tried, f"the test tried to reach the internet: {tried}"


# ---- the held-out task data ---------------------------------------------------------------------------

def test_the_multiple_choice_items_are_built_from_held_out_stories():
    if not heldout.VALID_FILE.exists():
        pytest.skip(f"the TinyStories validation head is not at {heldout.VALID_FILE} (needs ../shared/data)")
    items = heldout.read_items()
    assert items == heldout.next_sentence_items(heldout.read_valid_text())
    assert len(items) == 40 and all(len(item["choices"]) == 4 and 0 <= item["label"] < 4 for item in items)
    assert heldout.ITEMS_FILE.stat().st_size < 50_000
    train = heldout.VALID_FILE.with_name("tinystories_train_head.jsonl.gz")
    if train.exists():  # held out: no item's passage (context and right answer) is in the training stories
        import gzip

        with gzip.open(train, "rt", encoding="utf-8") as f:
            text = " ".join(" ".join(json.loads(line)["text"].split()) for line in f).lower()
        passages = [f"{item['context']} {item['choices'][item['label']]}".lower() for item in items]
        assert not [passage for passage in passages if passage in text]


# ---- lm-eval --------------------------------------------------------------------------------------------

@pytest.fixture
def lm_eval():
    return pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[test]')")


@pytest.fixture
def tasks(tmp_path, lm_eval):
    from lm_eval.tasks import TaskManager

    # only these tasks: indexing lm-eval's thousands of own task configs takes ~10 s
    return TaskManager(include_path=str(heldout.write_tasks(tmp_path / "tasks")), include_defaults=False)


def evaluate(lm_eval, tasks, model: str, model_args: dict, task: str, **kwargs) -> dict:
    """``lm_eval.simple_evaluate`` on one local task, with its samples, leaving the global RNGs alone."""
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], task_manager=tasks,
                                   log_samples=True, bootstrap_iters=0, random_seed=None, numpy_random_seed=None,
                                   torch_random_seed=None, **kwargs)


def completions_args(served: Served) -> dict:
    # the server's /tokenize, /detokenize and /tokenizer_info as lm-eval's tokenizer (vLLM's endpoints)
    return {"model": MODEL, "base_url": served.url + "/v1/completions", "tokenizer_backend": "remote",
            "max_retries": 1, "timeout": 120}


def test_lm_eval_multiple_choice_through_local_completions_scores_as_the_model_does(served, reference_model,
                                                                                      lm_eval, tasks):
    """``lm_eval --model local-completions --tasks <the local task>``: each choice's loglikelihood (sent as
    token ids, scored from the echoed prompt's logprobs) equals the sum computed in-process, and so do
    acc and acc_norm; the model is above chance (0.25)."""
    del served.sent[:]
    out = evaluate(lm_eval, tasks, "local-completions", completions_args(served), heldout.MC_TASK, batch_size=8)
    scores, samples = out["results"][heldout.MC_TASK], out["samples"][heldout.MC_TASK]
    exchanges = served.exchanges("/v1/completions")
    assert all(e.request["echo"] and e.request["logprobs"] == 1 and e.request["max_tokens"] == 1 for e in exchanges)
    prompts = [tuple(p) for e in exchanges for p in e.request["prompt"]]
    assert len(samples) == 40 and len(prompts) == 160
    # lm-eval takes token_logprobs[context length:-1]: the prompt's entries, then one for the generated token
    short = [(list(prompt), choice["finish_reason"], choice["logprobs"]["tokens"][-2:])
             for e in exchanges for prompt, choice in zip(e.request["prompt"], e.reply["choices"])
             if len(choice["logprobs"]["token_logprobs"]) != len(prompt) + 1]

    items = heldout.read_items()
    worst, same, right, right_norm = 0.0, 0, 0, 0
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        item = items[sample["doc_id"]]
        assert [cont for _, cont in sample["arguments"]] == [" " + choice for choice in item["choices"]]
        mine = []
        for (context, continuation), [(served_ll, _)] in zip(sample["arguments"], sample["resps"]):
            context_ids, continuation_ids = heldout.lm_eval_pair_tokens(served.tokenizer, context, continuation)
            assert tuple(context_ids + continuation_ids) in prompts  # what lm-eval sent: no BOS, as lm-eval splits
            mine.append(sum(heldout.continuation_logprobs(reference_model, context_ids, continuation_ids)))
            worst, same = max(worst, abs(served_ll - mine[-1])), same + (served_ll == mine[-1])
        right += max(range(4), key=mine.__getitem__) == item["label"]
        right_norm += max(range(4), key=lambda i: mine[i] / len(item["choices"][i])) == item["label"]
    print(f"\nlm-eval acc {scores['acc,none']:.4f} acc_norm {scores['acc_norm,none']:.4f}; in-process acc "
          f"{right / 40:.4f} acc_norm {right_norm / 40:.4f}; loglikelihoods: {same}/160 bit-identical, "
          f"max |difference| {worst:.3g}")
    assert not short, (f"{len(short)} echoed prompts lack the generated token's logprob entry (prompt ids, "
                       f"finish_reason, last tokens): {short}")
    assert worst <= 1e-6
    assert scores["acc,none"] == pytest.approx(right / 40, abs=1e-12)
    assert scores["acc_norm,none"] == pytest.approx(right_norm / 40, abs=1e-12)
    assert scores["acc,none"] > 0.25 and scores["acc_norm,none"] > 0.25


def _generations(samples: list[dict], n: int = 5) -> list[str]:
    """The task's outputs: strings that hold none of the stop strings (the end-of-turn one included)."""
    assert len(samples) == n
    texts = [text for sample in samples for text in sample["resps"][0]]
    assert len(texts) == n and all(isinstance(text, str) for text in texts)
    assert not [text for text in texts if any(stop in text for stop in heldout.GEN_UNTIL + [EOT])]
    assert any(text.strip() for text in texts)
    return texts


def test_lm_eval_generate_until_through_local_completions_sends_five_stop_strings(served, lm_eval, tasks):
    """A task with four ``until`` strings: lm-eval adds the end-of-turn string, so each request carries five
    stops (more than OpenAI's four), which the server takes; the replies end before any of them."""
    del served.sent[:]
    out = evaluate(lm_eval, tasks, "local-completions", completions_args(served), heldout.GEN_TASK)
    exchanges = served.exchanges("/v1/completions")
    assert len(exchanges) == 5
    assert all(e.request["stop"] == heldout.GEN_UNTIL + [EOT] and e.request["max_tokens"] == 16 for e in exchanges)
    texts = _generations(out["samples"][heldout.GEN_TASK])
    assert sorted(texts) == sorted(choice["text"] for e in exchanges for choice in e.reply["choices"])


def test_lm_eval_generate_until_through_local_chat_completions(served, lm_eval, tasks):
    del served.sent[:]
    args = {"model": MODEL, "base_url": served.url + "/v1/chat/completions", "max_retries": 1, "timeout": 120}
    out = evaluate(lm_eval, tasks, "local-chat-completions", args, heldout.GEN_TASK, apply_chat_template=True)
    bodies = served.bodies("/v1/chat/completions")
    assert len(bodies) == 5
    contexts = [item["context"] for item in heldout.read_items()[:5]]
    assert sorted(body["messages"][-1]["content"] for body in bodies) == sorted(contexts)
    assert all(body["stop"] == heldout.GEN_UNTIL for body in bodies)  # (no tokenizer: no end-of-turn string)
    _generations(out["samples"][heldout.GEN_TASK])


# ---- LangChain --------------------------------------------------------------------------------------------

@pytest.fixture
def chat_openai():
    return pytest.importorskip("langchain_openai", reason="langchain-openai is not installed").ChatOpenAI


def _llm(chat_openai, served: Served, max_tokens: int = 24):
    return chat_openai(base_url=served.url + "/v1", api_key="x", model=MODEL, temperature=0, max_tokens=max_tokens,
                       max_retries=0, timeout=120)


def test_langchain_invoke_and_stream_give_the_same_reply(served, chat_openai):
    llm = _llm(chat_openai, served)
    reply = llm.invoke("Tell me a story about a dog.")
    assert isinstance(reply.content, str) and reply.content.strip()
    assert reply.response_metadata["model_name"] == MODEL
    assert reply.response_metadata["finish_reason"] in ("stop", "length")
    chunks = list(llm.stream("Tell me a story about a dog."))
    assert len(chunks) > 1
    assert "".join(chunk.content for chunk in chunks) == reply.content


def test_langchain_structured_output_is_a_model_instance(served, chat_openai):
    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        name: str = Field(description="the pet's name", max_length=12)
        age: int = Field(ge=0, le=30)

    del served.sent[:]
    pet = _llm(chat_openai, served, 64).with_structured_output(Pet, method="json_schema").invoke("Make up a pet.")
    assert isinstance(pet, Pet)
    [body] = served.bodies("/v1/chat/completions")
    assert body["response_format"]["type"] == "json_schema"


def test_langchain_forced_tool_call_has_parsed_arguments(served, chat_openai):
    from pydantic import BaseModel, Field

    class GetWeather(BaseModel):
        """Get the current weather in a city."""

        city: str = Field(description="the city", max_length=20)

    llm = _llm(chat_openai, served, 64).bind_tools([GetWeather], tool_choice="GetWeather", strict=True)
    message = llm.invoke("What is the weather in Paris?")
    [call] = message.tool_calls
    assert call["name"] == "GetWeather" and call["id"]
    assert isinstance(call["args"], dict) and set(call["args"]) == {"city"}
    GetWeather(**call["args"])
    # the call is complete: the reply ends there (OpenAI says "stop" for a named tool_choice, vLLM "tool_calls")
    assert message.response_metadata["finish_reason"] in ("tool_calls", "stop")


# ---- LiteLLM ------------------------------------------------------------------------------------------------

# pydantic's warnings about LiteLLM's own types, on its first use
quiet_litellm = pytest.mark.filterwarnings("ignore:.*ReadOnly. qualifier:UserWarning")


@pytest.fixture
def litellm():
    return pytest.importorskip("litellm", reason="litellm is not installed")


def _complete(litellm, served: Served, messages: list[dict], max_tokens: int = 24, **kwargs):
    return litellm.completion(model="openai/" + MODEL, api_base=served.url + "/v1", api_key="x", messages=messages,
                              temperature=0, max_tokens=max_tokens, num_retries=0, timeout=120, **kwargs)


@quiet_litellm
def test_litellm_completion_and_its_stream_agree(served, litellm):
    hello = [{"role": "user", "content": "Who are you?"}]
    reply = _complete(litellm, served, hello)
    text = reply.choices[0].message.content
    assert isinstance(text, str) and text.strip()
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens > 0
    parts = list(_complete(litellm, served, hello, stream=True))
    assert "".join(part.choices[0].delta.content or "" for part in parts) == text


@quiet_litellm
def test_litellm_forced_tool_call(served, litellm):
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                       "required": ["city"], "additionalProperties": False}}}]
    reply = _complete(litellm, served, [{"role": "user", "content": "What is the weather in Paris?"}],
                      tools=tools, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                      max_tokens=64)
    choice = reply.choices[0]
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id
    args = json.loads(call.function.arguments)
    assert set(args) == {"city"} and isinstance(args["city"], str)
    assert choice.finish_reason in ("tool_calls", "stop")  # the call is complete: the reply ends there
