"""The OpenAI-compatible API through the official `openai` package (pinned
by scripts/ensure-tools), against a live `bulkhead serve` that
crates/bulkhead/tests/openai.rs starts with two agents (`default`, and
`guarded`, whose `current_time` waits for a person) on the mock model.

What is checked on the server's side (sessions, runs, request counts) is
read from Bulkhead's own API and its /metrics, never from the client.
"""

import functools
import json
import os
import re
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
import uuid

import openai
import pytest
from openai import OpenAI

BASE = os.environ["BULKHEAD_URL"]
KEY = os.environ["BULKHEAD_KEY"]
OTHER_TENANT_KEY = os.environ["BULKHEAD_OTHER_TENANT_KEY"]
LIMITED_KEY = os.environ["BULKHEAD_LIMITED_KEY"]


@functools.cache
def client(key=KEY, max_retries=2):
    """One client per key and retry setting, kept for the whole run, as an
    application keeps its client."""
    return OpenAI(base_url=BASE + "/v1", api_key=key, max_retries=max_retries)


def bulkhead(path, key=KEY, body=None):
    """Bulkhead's own API, as JSON."""
    request = urllib.request.Request(
        BASE + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def requests_seen(route, status):
    """How many requests the server answered on `route` with `status`."""
    with urllib.request.urlopen(BASE + "/metrics", timeout=10) as response:
        text = response.read().decode()
    total = 0
    for line in text.splitlines():
        if line.startswith("bulkhead_http_requests_total{") and f'route="{route}"' in line \
                and f'status="{status}"' in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def conversation(session_id, key=KEY):
    status, session = bulkhead(f"/sessions/{session_id}", key)
    assert status == 200, session
    return [(m["role"], m["content"]) for m in session["messages"]]


def chat(messages, key=KEY, model="default", **options):
    """A completion and the session it went into."""
    raw = client(key).chat.completions.with_raw_response.create(
        model=model, messages=messages, **options)
    return raw.parse(), raw.headers["x-bulkhead-session-id"]


def user(text):
    return {"role": "user", "content": text}


# --- models ----------------------------------------------------------------

def test_models_are_the_agents():
    models = client().models.list()
    assert [m.id for m in models.data] == ["default", "guarded"]
    assert all(m.object == "model" and m.owned_by == "bulkhead" and m.created > 0 for m in models.data)
    assert client().models.retrieve("guarded").id == "guarded"
    with pytest.raises(openai.NotFoundError) as refused:
        client().models.retrieve("gpt-5.5")
    assert refused.value.code == "model_not_found"
    assert "default, guarded" in refused.value.message


# --- completions -----------------------------------------------------------

def test_a_completion_is_the_agents_answer_with_usage():
    completion, session = chat([user("hello")])
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "default"
    choice = completion.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == \
        ("assistant", "echo: hello", "stop")
    usage = completion.usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens == 2
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    uuid.UUID(session)


def test_tool_activity_stays_inside_and_is_on_record():
    completion, session = chat([user("tool:current_time {}")])
    assert completion.choices[0].message.content.startswith("tool result: ")
    assert completion.choices[0].message.tool_calls is None
    status, audit = bulkhead(f"/sessions/{session}/audit")
    assert status == 200 and [c["tool"] for c in audit["tool_calls"]] == ["current_time"], audit


def test_a_stream_is_chunks_then_usage_then_done():
    stream = client().chat.completions.create(
        model="default", messages=[user("hello there")], stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: hello there"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    # Without include_usage, no usage chunk.
    plain = list(client().chat.completions.create(
        model="default", messages=[user("hello")], stream=True))
    assert plain[-1].choices[0].finish_reason == "stop" and plain[-1].usage is None


def test_the_sdks_stream_helper_assembles_the_reply():
    with client().chat.completions.stream(model="default", messages=[user("hi you")]) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content == "echo: hi you"


# --- conversations ---------------------------------------------------------

def test_a_request_naming_no_session_starts_one_from_its_messages():
    messages = [
        {"role": "developer", "content": "be brief"},
        user("one"),
        {"role": "assistant", "content": "two"},
        user("three"),
    ]
    first, session = chat(messages)
    again, other = chat(messages)
    assert session != other, "stateless: a new session each time"
    assert conversation(session) == [
        ("system", "be brief"), ("user", "one"), ("assistant", "two"), ("user", "three"),
        ("assistant", "echo: three")]
    bare, _ = chat([user("three")])
    assert first.usage.prompt_tokens > bare.usage.prompt_tokens, "the model saw the history"


def name_by(rule, name):
    """How each rule names a conversation, as keyword arguments of create()."""
    return {
        "x-bulkhead-session-id": {"extra_headers": {"X-Bulkhead-Session-Id": name}},
        "x-openwebui-chat-id": {"extra_headers": {"X-OpenWebUI-Chat-Id": name}},
        "metadata.session_id": {"metadata": {"session_id": name}},
        "user": {"user": name},
    }[rule]


@pytest.mark.parametrize("rule", ["x-bulkhead-session-id", "x-openwebui-chat-id",
                                  "metadata.session_id", "user"])
def test_a_named_conversation_continues_with_only_its_last_message_new(rule):
    if rule == "x-bulkhead-session-id":
        # A Bulkhead session: the one an earlier answer named.
        first, session = chat([user("hi")])
        name = session
    else:
        name = f"conversation-{uuid.uuid4()}"
        first, session = chat([user("hi")], **name_by(rule, name))
    # As Open WebUI sends it: the whole conversation, again.
    second, again = chat([user("hi"), {"role": "assistant", "content": "echo: hi"}, user("and now")],
                         **name_by(rule, name))
    assert again == session
    assert conversation(session) == [
        ("user", "hi"), ("assistant", "echo: hi"), ("user", "and now"), ("assistant", "echo: and now")]
    assert second.usage.prompt_tokens > first.usage.prompt_tokens, "the model saw the history"


def test_the_rules_apply_in_their_order():
    chat_id = f"owui-{uuid.uuid4()}"
    _, by_chat = chat([user("a")], extra_headers={"X-OpenWebUI-Chat-Id": chat_id})
    _, by_both = chat([user("b")], extra_headers={"X-OpenWebUI-Chat-Id": chat_id},
                      metadata={"session_id": "ignored"}, user="ignored too")
    assert by_both == by_chat
    # A name is a name, whichever way it is sent.
    _, by_metadata = chat([user("c")], metadata={"session_id": chat_id}, user="ignored")
    assert by_metadata == by_chat
    _, first = chat([user("d")])
    _, by_header = chat([user("e")], extra_headers={"X-Bulkhead-Session-Id": first,
                                                    "X-OpenWebUI-Chat-Id": chat_id})
    assert by_header == first
    # A blank name is no name.
    _, blank = chat([user("f")], user="  ")
    _, blank_again = chat([user("f")], user="  ")
    assert blank != blank_again


def test_tenants_never_share_a_named_conversation():
    name = f"alice-{uuid.uuid4()}"
    _, mine = chat([user("mine")], user=name)
    _, theirs = chat([user("theirs")], key=OTHER_TENANT_KEY, user=name)
    assert mine != theirs
    assert conversation(mine) == [("user", "mine"), ("assistant", "echo: mine")]
    with pytest.raises(openai.NotFoundError) as refused:
        chat([user("let me in")], key=OTHER_TENANT_KEY,
             extra_headers={"X-Bulkhead-Session-Id": mine})
    assert refused.value.code == "session_not_found"


# --- errors ----------------------------------------------------------------

def test_a_wrong_key_is_refused_in_openais_shape():
    with pytest.raises(openai.AuthenticationError) as refused:
        client(key="bk_0000000000000000_" + "0" * 48).models.list()
    error = refused.value.body
    assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key", error
    assert "param" in error and error["message"]
    with pytest.raises(openai.AuthenticationError):
        client(key="not-a-bulkhead-key").chat.completions.create(
            model="default", messages=[user("hi")])


@pytest.mark.parametrize("messages,param", [
    ([], "messages"),
    ([{"role": "assistant", "content": "no"}], "messages[0].role"),
    ([{"role": "tool", "content": "x", "tool_call_id": "c"}, user("hi")], "messages[0].role"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}],
     "messages[0].content[0].type"),
    ([user("  ")], "messages[0].content"),
])
def test_a_bad_request_names_its_field(messages, param):
    with pytest.raises(openai.BadRequestError) as refused:
        client().chat.completions.create(model="default", messages=messages)
    assert refused.value.param == param and refused.value.type == "invalid_request_error"


def test_client_side_tools_are_refused_by_name():
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as refused:
        client().chat.completions.create(model="default", messages=[user("hi")], tools=[tool])
    assert refused.value.param == "tools"
    with pytest.raises(openai.BadRequestError) as refused:
        client().responses.create(model="default", input="hi",
                                  tools=[{"type": "function", "name": "lookup", "parameters": {}}])
    assert refused.value.param == "tools"


def test_an_unknown_model_or_route_is_a_404_in_openais_shape():
    with pytest.raises(openai.NotFoundError) as refused:
        client().chat.completions.create(model="gpt-5.5", messages=[user("hi")])
    assert (refused.value.code, refused.value.param) == ("model_not_found", "model")
    with pytest.raises(openai.NotFoundError) as refused:
        client().embeddings.create(model="default", input="hi")
    assert refused.value.type == "invalid_request_error" and refused.value.code == "not_found"


def test_a_run_that_fails_is_not_sent_twice():
    before = requests_seen("/v1/chat/completions", "502")
    with pytest.raises(openai.InternalServerError) as failed:
        # Retries on, as the SDK has them by default (2).
        client(max_retries=2).chat.completions.create(model="default", messages=[user("fail:500")])
    assert failed.value.status_code == 502 and failed.value.code == "model_error"
    assert failed.value.response.headers["x-should-retry"] == "false"
    assert requests_seen("/v1/chat/completions", "502") == before + 1, "the SDK retried"
    session = failed.value.response.headers["x-bulkhead-session-id"]
    status, runs = bulkhead(f"/sessions/{session}/runs")
    assert [r["status"] for r in runs["runs"]] == ["failed"], runs


def test_a_stream_that_fails_before_its_first_word_is_an_http_error():
    with pytest.raises(openai.InternalServerError) as failed:
        client(max_retries=2).chat.completions.create(
            model="default", messages=[user("fail:503")], stream=True)
    assert failed.value.status_code == 502 and failed.value.response.headers["x-should-retry"] == "false"


def test_a_paused_run_says_so_and_its_busy_session_is_not_retried():
    name = f"approve-{uuid.uuid4()}"
    paused, session = chat([user("tool:current_time {}")], model="guarded", user=name)
    text = paused.choices[0].message.content
    assert "current_time" in text and "/approvals" in text and paused.choices[0].finish_reason == "stop"
    before = requests_seen("/v1/chat/completions", "409")
    with pytest.raises(openai.ConflictError) as busy:
        client(max_retries=2).chat.completions.create(
            model="guarded", messages=[user("are you there?")], user=name)
    assert busy.value.code == "session_busy" and busy.value.response.headers["x-should-retry"] == "false"
    assert requests_seen("/v1/chat/completions", "409") == before + 1, "the SDK retried"
    # A person approves through Bulkhead's API; the conversation goes on.
    status, runs = bulkhead(f"/sessions/{session}/runs")
    run = runs["runs"][-1]
    status, detail = bulkhead(f"/runs/{run['run_id']}")
    status, decided = bulkhead(f"/runs/{run['run_id']}/approvals",
                               body={"call_id": detail["approval"]["call_id"], "decision": "approve"})
    assert status == 200 and decided["response"].startswith("tool result: "), decided
    after, again = chat([user("thanks")], model="guarded", user=name)
    assert again == session and after.choices[0].message.content == "echo: thanks"


def test_a_session_of_another_agent_is_a_conflict_not_retried():
    _, session = chat([user("hi")])
    with pytest.raises(openai.ConflictError) as refused:
        client().chat.completions.create(model="guarded", messages=[user("hi")],
                                         extra_headers={"X-Bulkhead-Session-Id": session})
    assert refused.value.code == "wrong_agent"
    assert refused.value.response.headers["x-should-retry"] == "false"


def test_a_key_over_its_rate_is_a_429_in_openais_shape():
    limited = client(key=LIMITED_KEY, max_retries=0)
    limited.models.list()
    with pytest.raises(openai.RateLimitError) as refused:
        limited.models.list()
    assert refused.value.type == "rate_limit_error" and refused.value.code == "rate_limit_exceeded"
    assert int(refused.value.response.headers["retry-after"]) > 0


# --- the Responses API -----------------------------------------------------

def test_a_response_and_its_continuation():
    first = client().responses.with_raw_response.create(model="default", input="hello")
    response, session = first.parse(), first.headers["x-bulkhead-session-id"]
    assert response.id.startswith("resp_") and response.status == "completed"
    assert response.output_text == "echo: hello"
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    second = client().responses.with_raw_response.create(
        model="default", input="and again", previous_response_id=response.id)
    follow = second.parse()
    assert second.headers["x-bulkhead-session-id"] == session
    assert follow.previous_response_id == response.id and follow.output_text == "echo: and again"
    assert follow.usage.input_tokens > response.usage.input_tokens, "the model saw the history"
    assert len(conversation(session)) == 4
    with pytest.raises(openai.NotFoundError) as refused:
        client().responses.create(model="default", input="x",
                                  previous_response_id="resp_" + uuid.uuid4().hex)
    assert refused.value.param == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        client(key=OTHER_TENANT_KEY).responses.create(
            model="default", input="x", previous_response_id=response.id)


def test_a_streamed_response_is_the_responses_event_sequence():
    events = list(client().responses.create(model="default", input="hello you", stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "echo: hello you"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.output_text == "echo: hello you"
    with client().responses.stream(model="default", input=[user("via the helper")]) as stream:
        final = stream.get_final_response()
    assert final.output_text == "echo: via the helper"


# --- as a new user would ---------------------------------------------------

QUICKSTART = """
import os
from openai import OpenAI

client = OpenAI(
    # This is the default and can be omitted
    api_key=os.environ.get("OPENAI_API_KEY"),
)

response = client.responses.create(
    model="default",
    instructions="You are a coding assistant that talks like a pirate.",
    input="How do I check if a Python object is an instance of a class?",
)

print(response.output_text)

completion = client.chat.completions.create(
    model="default",
    messages=[
        {"role": "developer", "content": "Talk like a pirate."},
        {
            "role": "user",
            "content": "How do I check if a Python object is an instance of a class?",
        },
    ],
)

print(completion.choices[0].message.content)
"""


def test_the_sdks_quickstart_runs_with_its_base_url_pointed_here():
    """The package's README quickstarts, with `model` an agent's id and
    nothing else changed: the base URL and key come from the environment
    the SDK reads."""
    env = {"PATH": os.environ["PATH"], "OPENAI_BASE_URL": BASE + "/v1", "OPENAI_API_KEY": KEY}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(QUICKSTART)], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    question = "echo: How do I check if a Python object is an instance of a class?"
    assert out.stdout.splitlines() == [question, question]
