"""The LangGraph Agent Server API through its reference client, the
`langgraph-sdk` package (pinned by scripts/ensure-tools), against a live
`bulkhead serve` that crates/bulkhead/tests/langgraph.rs starts with keys
required and two agents (`default`, and `guarded`, whose `current_time`
waits for a person) on the mock model.

Every assertion is about what a user of the SDK sees: the values its
methods return, the `StreamPart`s it yields, the exceptions it raises
(`langgraph_sdk.errors`, or httpx's for the calls the SDK sends through its
reconnecting path). Where a raw request is needed (a connection dropped on
purpose, a header the SDK reads but does not return), it goes through the
SDK's own httpx client, with the SDK's base URL and headers.

The mock model answers `echo: <message>`; `sleep:<ms>` answers
`slept <ms> ms` after that long (the slow runs of the cancel and multitask
tests); `tool:<name> <args>` calls a tool, then answers `tool result: ...`;
`fail:<status>` fails the model call.
"""

import asyncio
import contextlib
import functools
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import httpx
import pytest
from langgraph_sdk import errors, get_client, get_sync_client
from langgraph_sdk.schema import StreamPart
from langgraph_sdk.sse import SSEDecoder, iter_lines_raw

BASE = os.environ["BULKHEAD_URL"]
KEY = os.environ["BULKHEAD_KEY"]
OTHER_TENANT_KEY = os.environ["BULKHEAD_OTHER_TENANT_KEY"]
LIMITED_KEY = os.environ["BULKHEAD_LIMITED_KEY"]  # one request a minute
ALLOWED_ORIGIN = os.environ["BULKHEAD_CORS_ORIGIN"]  # the server's CORS_ALLOWED_ORIGINS

# A stream that closes before its run is over makes the SDK ask the run and
# reconnect; for a stream that is not resumable it warns that events are
# lost. The contract says a stream closes when its run is finished, so that
# warning is a failure here, as is the one of a `wait` whose body was cut.
pytestmark = [
    pytest.mark.filterwarnings("error:Reconnecting without a Last-Event-ID"),
    pytest.mark.filterwarnings("error:Request failed, attempting reconnect"),
]

WRONG_KEY = "bk_0000000000000000_" + "0" * 48


@functools.cache
def client(key=KEY):
    """One sync client per key, kept for the whole run, as an application
    keeps its client."""
    return get_sync_client(url=BASE, api_key=key)


def human(text):
    return {"role": "user", "content": text}


def say(text):
    """A run's input: one user message."""
    return {"messages": [human(text)]}


def tagged(**metadata):
    """Metadata unique to the calling test, so that searches see only its
    threads."""
    return {"suite": f"t-{uuid.uuid4()}", **metadata}


def new_thread(**kwargs):
    return client().threads.create(**kwargs)["thread_id"]


def assistant_uuid(graph_id):
    [assistant] = client().assistants.search(graph_id=graph_id)
    return assistant["assistant_id"]


def refusal(status, call):
    """`call` fails with HTTP `status` and a `{"detail": "..."}` body; returns
    the exception the SDK raised."""
    with pytest.raises(httpx.HTTPStatusError) as raised:
        result = call()
        if not isinstance(result, (dict, list, type(None))):
            list(result)  # a stream fails when it is first read
    response = raised.value.response
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("detail"), str) and body["detail"], body
    return raised.value


def wait_for_status(thread_id, run_id, wanted, timeout=15.0):
    """Polls the run until its status is one of `wanted`; returns the run."""
    deadline = time.monotonic() + timeout
    while True:
        run = client().runs.get(thread_id, run_id)
        if run["status"] in wanted:
            return run
        assert time.monotonic() < deadline, f"run {run_id} stayed {run['status']}, not {wanted}"
        time.sleep(0.05)


def wait_for_thread_status(thread_id, wanted, timeout=15.0):
    """Polls the thread until its status is `wanted` (a cancellation is
    answered before the run has stopped)."""
    deadline = time.monotonic() + timeout
    while True:
        status = client().threads.get(thread_id)["status"]
        if status == wanted:
            return
        assert time.monotonic() < deadline, f"thread {thread_id} stayed {status}, not {wanted}"
        time.sleep(0.05)


def wait_until_gone(call, timeout=15.0):
    """Polls `call` until it raises NotFoundError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            call()
        except errors.NotFoundError:
            return
        assert time.monotonic() < deadline, "still there"
        time.sleep(0.05)


def text_of(content):
    """A message's text: its content, or its text blocks' text."""
    if isinstance(content, list):
        return "".join(block["text"] for block in content if block.get("type") == "text")
    return content


def messages_of(values):
    return [(m["type"], text_of(m["content"])) for m in values["messages"]]


def last_ai(values):
    message = values["messages"][-1]
    assert message["type"] == "ai", values
    return message


def events(parts):
    return [p.event for p in parts]


def raw_sse(response):
    """The SSE events of a raw httpx response, parsed by the SDK's decoder."""
    decoder = SSEDecoder()
    for line in iter_lines_raw(response):
        part = decoder.decode(bytes(line).rstrip(b"\n"))
        if part is not None and (part.event or decoder.has_data):
            yield part


def check_ai_message(message, content):
    assert message["type"] == "ai" and message["content"] == content, message
    assert isinstance(message["id"], str) and message["id"], message
    assert message.get("tool_calls", []) == [], message
    usage = message["usage_metadata"]
    assert usage["output_tokens"] == len(content.split()), usage
    assert usage["input_tokens"] > 0, usage
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"], usage


# --- assistants --------------------------------------------------------------

ASSISTANT_FIELDS = {"assistant_id", "graph_id", "config", "context", "created_at",
                    "updated_at", "metadata", "version", "name", "description"}


def test_assistants_are_the_agents():
    found = client().assistants.search()
    assert sorted(a["graph_id"] for a in found) == ["default", "guarded"], found
    for assistant in found:
        assert ASSISTANT_FIELDS <= assistant.keys(), assistant
        uuid.UUID(assistant["assistant_id"])
    by_graph = {a["graph_id"]: a for a in found}
    assert by_graph["default"]["assistant_id"] != by_graph["guarded"]["assistant_id"]

    # Filters and paging.
    assert [a["graph_id"] for a in client().assistants.search(graph_id="guarded")] == ["guarded"]
    assert [a["graph_id"] for a in client().assistants.search(name="GUARD")] == ["guarded"]
    first = client().assistants.search(limit=1)
    second = client().assistants.search(limit=1, offset=1)
    assert len(first) == len(second) == 1
    assert {first[0]["graph_id"], second[0]["graph_id"]} == {"default", "guarded"}
    assert client().assistants.search(offset=2) == []

    # Got by its UUID or by its graph id; the UUID is the same every time.
    guarded = by_graph["guarded"]
    assert client().assistants.get(guarded["assistant_id"])["assistant_id"] == guarded["assistant_id"]
    by_name = client().assistants.get("guarded")
    assert (by_name["assistant_id"], by_name["graph_id"]) == (guarded["assistant_id"], "guarded")


def test_an_unknown_assistant_is_a_404():
    refused = refusal(404, lambda: client().assistants.get(str(uuid.uuid4())))
    assert isinstance(refused, errors.NotFoundError)
    assert isinstance(refusal(404, lambda: client().assistants.get("no-such-agent")),
                      errors.NotFoundError)
    thread = new_thread()
    refusal(404, lambda: client().runs.wait(thread, str(uuid.uuid4()), input=say("hi")))
    refused = refusal(404, lambda: client().runs.create(thread, str(uuid.uuid4()), input=say("hi")))
    assert isinstance(refused, errors.NotFoundError)


# --- threads -----------------------------------------------------------------

def test_a_thread_is_created_read_updated_and_deleted():
    metadata = tagged(owner="ann")
    thread = client().threads.create(metadata=metadata)
    assert {"thread_id", "created_at", "updated_at", "metadata", "status"} <= thread.keys(), thread
    uuid.UUID(thread["thread_id"])
    assert thread["status"] == "idle"
    assert thread["metadata"] == metadata

    got = client().threads.get(thread["thread_id"])
    assert (got["thread_id"], got["metadata"], got["status"]) == \
        (thread["thread_id"], metadata, "idle")

    # PATCH merges the metadata.
    updated = client().threads.update(thread["thread_id"], metadata={"colour": "blue"})
    assert updated["metadata"] == {**metadata, "colour": "blue"}
    assert client().threads.get(thread["thread_id"])["metadata"] == {**metadata, "colour": "blue"}

    client().threads.delete(thread["thread_id"])
    assert isinstance(refusal(404, lambda: client().threads.get(thread["thread_id"])),
                      errors.NotFoundError)
    refusal(404, lambda: client().threads.delete(thread["thread_id"]))
    refusal(404, lambda: client().threads.update(thread["thread_id"], metadata={"a": 1}))


def test_a_thread_with_its_own_id_and_if_exists():
    thread_id = str(uuid.uuid4())
    made = client().threads.create(thread_id=thread_id, metadata={"n": 1}, if_exists="raise")
    assert made["thread_id"] == thread_id and made["metadata"] == {"n": 1}
    refused = refusal(409, lambda: client().threads.create(
        thread_id=thread_id, metadata={"n": 2}, if_exists="raise"))
    assert isinstance(refused, errors.ConflictError)
    # Without if_exists the SDK sends none and the server's default is raise.
    assert isinstance(refusal(409, lambda: client().threads.create(thread_id=thread_id)),
                      errors.ConflictError)
    # do_nothing answers the thread that exists, unchanged.
    same = client().threads.create(thread_id=thread_id, metadata={"n": 3}, if_exists="do_nothing")
    assert same["thread_id"] == thread_id and same["metadata"] == {"n": 1}
    assert client().threads.get(thread_id)["metadata"] == {"n": 1}


def test_threads_are_searched_by_metadata_status_and_ids_and_counted():
    metadata = tagged()
    made = [client().threads.create(metadata={**metadata, "n": n})["thread_id"] for n in range(3)]

    found = client().threads.search(metadata=metadata)
    assert sorted(t["thread_id"] for t in found) == sorted(made)
    assert [t["thread_id"] for t in client().threads.search(metadata={**metadata, "n": 1})] == [made[1]]
    assert client().threads.count(metadata=metadata) == 3
    assert client().threads.count(metadata={**metadata, "n": 2}) == 1

    # Paging: two, then the third, and together all three once.
    page_one = client().threads.search(metadata=metadata, limit=2)
    page_two = client().threads.search(metadata=metadata, limit=2, offset=2)
    assert len(page_one) == 2 and len(page_two) == 1
    assert sorted(t["thread_id"] for t in page_one + page_two) == sorted(made)
    assert client().threads.search(metadata=metadata, offset=3) == []

    # Sorted as asked.
    oldest_first = client().threads.search(metadata=metadata, sort_by="created_at", sort_order="asc")
    assert [t["thread_id"] for t in oldest_first] == made
    newest_first = client().threads.search(metadata=metadata, sort_by="created_at", sort_order="desc")
    assert [t["thread_id"] for t in newest_first] == made[::-1]

    # By status and by ids.
    assert len(client().threads.search(metadata=metadata, status="idle")) == 3
    assert client().threads.search(metadata=metadata, status="busy") == []
    assert client().threads.count(metadata=metadata, status="idle") == 3
    by_ids = client().threads.search(ids=[made[0], made[2]])
    assert sorted(t["thread_id"] for t in by_ids) == sorted([made[0], made[2]])


# --- runs: wait --------------------------------------------------------------

def test_wait_answers_the_final_values_and_binds_the_thread():
    metadata = tagged()
    thread = new_thread(metadata=metadata)
    created = []
    values = client().runs.wait(thread, "default", input=say("hello"),
                                on_run_created=created.append)
    assert messages_of(values) == [("human", "hello"), ("ai", "echo: hello")]
    assert values["messages"][0]["id"]
    check_ai_message(values["messages"][1], "echo: hello")
    # The SDK read the run from Content-Location.
    assert len(created) == 1 and created[0]["thread_id"] == thread, created
    run = client().runs.get(thread, created[0]["run_id"])
    assert run["status"] == "success" and run["thread_id"] == thread

    # The first run bound the thread to its assistant, in the metadata.
    got = client().threads.get(thread)
    assert got["metadata"]["graph_id"] == "default", got
    assert got["metadata"]["assistant_id"] == assistant_uuid("default"), got
    assert got["status"] == "idle"
    # As Agent Chat UI lists an assistant's threads.
    for key, value in (("assistant_id", assistant_uuid("default")), ("graph_id", "default")):
        listed = client().threads.search(metadata={**metadata, key: value}, limit=100)
        assert [t["thread_id"] for t in listed] == [thread], listed
    assert client().threads.search(metadata={**metadata, "graph_id": "guarded"}) == []
    assert got["values"]["messages"] == values["messages"]

    # The next run (by the assistant's UUID this time) sends one new message.
    again = client().runs.wait(thread, assistant_uuid("default"), input=say("and again"))
    assert messages_of(again) == [("human", "hello"), ("ai", "echo: hello"),
                                  ("human", "and again"), ("ai", "echo: and again")]
    assert again["messages"][:2] == values["messages"], "the history is kept as it was"
    assert again["messages"][3]["usage_metadata"]["input_tokens"] > \
        values["messages"][1]["usage_metadata"]["input_tokens"], "the model saw the history"

    # Another assistant on a bound thread is a conflict.
    refused = refusal(409, lambda: client().runs.create(thread, "guarded", input=say("hi")))
    assert isinstance(refused, errors.ConflictError)


def test_a_first_run_brings_its_history_and_content_may_be_blocks():
    thread = new_thread()
    values = client().runs.wait(thread, "default", input={"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"type": "human", "content": [{"type": "text", "text": "three"}]},
    ]})
    assert messages_of(values)[-4:] == [("human", "one"), ("ai", "two"), ("human", "three"),
                                        ("ai", "echo: three")]
    assert ("system", "be brief") in messages_of(values)
    # A later run in the LangChain shape, content as text blocks.
    more = client().runs.wait(thread, "default", input={"messages": [
        {"type": "human", "content": [{"type": "text", "text": "four"}]}]})
    assert last_ai(more)["content"] == "echo: four"


def test_a_failed_run_is_an_error_the_sdk_raises():
    thread = new_thread()
    created = []
    with pytest.raises(Exception) as failed:
        client().runs.wait(thread, "default", input=say("fail:500"), on_run_created=created.append)
    # The SDK raises `<error>: <message>` from the body's __error__.
    assert re.match(r"^\w+: .+", str(failed.value)), str(failed.value)
    assert client().runs.get(thread, created[0]["run_id"])["status"] == "error"
    assert client().threads.get(thread)["status"] == "error"

    raw = client().runs.wait(thread, "default", input=say("fail:503"), raise_error=False)
    error = raw["__error__"]
    assert isinstance(error["error"], str) and isinstance(error["message"], str), raw

    # Streamed: an `error` event, then the end.
    parts = list(client().runs.stream(thread, "default", input=say("fail:502")))
    assert parts[0].event == "metadata" and parts[-1].event == "error", parts
    assert isinstance(parts[-1].data["error"], str) and isinstance(parts[-1].data["message"], str)

    # The thread goes on.
    assert last_ai(client().runs.wait(thread, "default", input=say("fine")))["content"] == "echo: fine"
    assert client().threads.get(thread)["status"] == "idle"


# --- runs: stream ------------------------------------------------------------

def test_stream_values():
    thread = new_thread()
    parts = list(client().runs.stream(thread, "default", input=say("hello you")))
    assert all(isinstance(p, StreamPart) for p in parts)
    assert parts[0].event == "metadata"
    uuid.UUID(parts[0].data["run_id"])
    assert parts[0].data["attempt"] == 1
    assert set(events(parts[1:])) == {"values"}, events(parts)
    assert messages_of(parts[1].data) == [("human", "hello you")], "the input first"
    assert messages_of(parts[-1].data) == [("human", "hello you"), ("ai", "echo: hello you")]
    check_ai_message(parts[-1].data["messages"][1], "echo: hello you")
    # The stream closed with the run over.
    run = client().runs.get(thread, parts[0].data["run_id"])
    assert run["status"] == "success"
    assert client().threads.get(thread)["status"] == "idle"


def test_stream_updates_of_a_tool_run():
    thread = new_thread()
    parts = list(client().runs.stream(thread, "default", input=say("tool:current_time {}"),
                                      stream_mode="updates"))
    assert parts[0].event == "metadata"
    assert set(events(parts[1:])) == {"updates"}, events(parts)
    updates = [p.data for p in parts[1:]]
    assert [list(u) for u in updates] == [["model"], ["tools"], ["model"]], updates

    [call_message] = updates[0]["model"]["messages"]
    assert call_message["type"] == "ai" and call_message["id"]
    [call] = call_message["tool_calls"]
    assert (call["name"], call["args"], call["type"]) == ("current_time", {}, "tool_call"), call
    assert call["id"]
    [result] = updates[1]["tools"]["messages"]
    assert (result["type"], result["tool_call_id"], result["name"]) == ("tool", call["id"], "current_time")
    assert re.match(r"\d{4}-\d{2}-\d{2}T", result["content"]), result
    [answer] = updates[2]["model"]["messages"]
    assert answer["type"] == "ai" and answer["content"] == f"tool result: {result['content']}"


def test_stream_messages_tuple_chunks_keep_their_message_id():
    thread = new_thread()
    parts = list(client().runs.stream(thread, "default", input=say("one two three four"),
                                      stream_mode="messages-tuple"))
    assert parts[0].event == "metadata"
    assert set(events(parts[1:])) == {"messages"}, events(parts)
    chunks = []
    for part in parts[1:]:
        chunk, metadata = part.data
        assert isinstance(metadata, dict), part
        chunks.append(chunk)
    ai_chunks = [c for c in chunks if c["type"] == "AIMessageChunk"]
    assert len(ai_chunks) > 1, "the answer comes in pieces"
    assert {c["id"] for c in ai_chunks} == {ai_chunks[0]["id"]} and ai_chunks[0]["id"], ai_chunks
    assert "".join(c["content"] for c in ai_chunks) == "echo: one two three four"
    # The chunks' id is the id of the message the thread keeps.
    state = client().threads.get_state(thread)
    assert last_ai(state["values"])["id"] == ai_chunks[0]["id"]


def test_stream_custom_events_are_bulkheads_own():
    thread = new_thread()
    parts = list(client().runs.stream(thread, "default", input=say("tool:current_time {}"),
                                      stream_mode="custom"))
    assert parts[0].event == "metadata"
    assert set(events(parts[1:])) == {"custom"}, events(parts)
    assert all(isinstance(p.data, dict) and isinstance(p.data.get("type"), str) for p in parts[1:])
    kinds = [p.data["type"] for p in parts[1:]]
    assert "tool_call" in kinds and "tool_result" in kinds, kinds
    assert kinds.index("tool_call") < kinds.index("tool_result")
    call = parts[1 + kinds.index("tool_call")].data
    assert call.get("name") == "current_time", call


def test_stream_several_modes_at_once():
    thread = new_thread()
    parts = list(client().runs.stream(
        thread, "default", input=say("tool:current_time {}"),
        stream_mode=["values", "updates", "messages-tuple", "custom"]))
    kinds = events(parts)
    assert kinds[0] == "metadata" and kinds.count("metadata") == 1, kinds
    assert set(kinds) == {"metadata", "values", "updates", "messages", "custom"}, kinds
    final = [p for p in parts if p.event == "values"][-1].data
    assert [m["type"] for m in final["messages"]] == ["human", "ai", "tool", "ai"]
    answer = final["messages"][-1]
    assert answer["content"].startswith("tool result: ")
    # Every AI chunk belongs to an AI message of the final state; the
    # answer's chunks make its text.
    ai_ids = {m["id"] for m in final["messages"] if m["type"] == "ai"}
    ai_chunks = [p.data[0] for p in parts if p.event == "messages" and p.data[0]["type"] == "AIMessageChunk"]
    assert {c["id"] for c in ai_chunks} <= ai_ids, (ai_chunks, ai_ids)
    assert "".join(c["content"] for c in ai_chunks if c["id"] == answer["id"]) == answer["content"]
    # The updates are the same as when streamed alone.
    assert [list(p.data) for p in parts if p.event == "updates"] == [["model"], ["tools"], ["model"]]


def test_an_unknown_stream_mode_is_a_422():
    thread = new_thread()
    refused = refusal(422, lambda: client().runs.stream(thread, "default", input=say("hi"),
                                                        stream_mode="debug"))
    assert isinstance(refused, errors.UnprocessableEntityError)
    assert client().runs.list(thread) == [], "no run was made"


def test_the_reference_servers_headers():
    """Content-Location names the run (the SDK's on_run_created reads it);
    Location is where the SDK reconnects: a stream's join stream, a wait's
    join."""
    http = client().http.client
    thread = new_thread()
    created = http.post(f"/threads/{thread}/runs", json={"assistant_id": "default", "input": say("a")})
    assert created.status_code == 200, created.text
    run = created.json()
    assert created.headers["content-location"] == f"/threads/{thread}/runs/{run['run_id']}"
    client().runs.join(thread, run["run_id"])

    waited = http.post(f"/threads/{thread}/runs/wait", json={"assistant_id": "default", "input": say("b")})
    assert waited.status_code == 200 and waited.headers["content-type"].startswith("application/json")
    run_path = waited.headers["content-location"]
    assert re.fullmatch(rf"/threads/{thread}/runs/[0-9a-f-]{{36}}", run_path), run_path
    assert waited.headers["location"] == f"{run_path}/join"
    assert last_ai(waited.json())["content"] == "echo: b"

    with http.stream("POST", f"/threads/{thread}/runs/stream",
                     json={"assistant_id": "default", "input": say("c")},
                     headers={"Accept": "text/event-stream"}) as streamed:
        assert streamed.status_code == 200
        assert streamed.headers["content-type"].startswith("text/event-stream")
        run_path = streamed.headers["content-location"]
        assert re.fullmatch(rf"/threads/{thread}/runs/[0-9a-f-]{{36}}", run_path), run_path
        assert streamed.headers["location"] == f"{run_path}/stream"
        parts = list(raw_sse(streamed))
    assert parts[0].event == "metadata" and run_path.endswith(parts[0].data["run_id"])


def test_heartbeats_keep_a_slow_run_open():
    """A stream sends comment lines and a wait sends newlines while the run
    is silent, every few seconds."""
    http = client().http.client
    seen = {}

    def stream():
        thread = new_thread()
        lines = []
        with http.stream("POST", f"/threads/{thread}/runs/stream",
                         json={"assistant_id": "default", "input": say("sleep:6500")},
                         headers={"Accept": "text/event-stream"}) as response:
            lines = [bytes(line) for line in iter_lines_raw(response)]
        seen["stream"] = lines

    def wait():
        thread = new_thread()
        with http.stream("POST", f"/threads/{thread}/runs/wait",
                         json={"assistant_id": "default", "input": say("sleep:6500")}) as response:
            seen["wait"] = response.read()

    workers = [threading.Thread(target=stream), threading.Thread(target=wait)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert any(line.startswith(b":") for line in seen["stream"]), seen["stream"]
    body = seen["wait"]
    assert body.startswith(b"\n"), body[:80]
    assert b'"slept 6500 ms"' in body


def test_a_browser_page_of_an_allowed_origin_reads_where_the_run_is():
    """What a browser client (Agent Chat UI, the JS SDK) needs: a preflight
    that lets its key and Last-Event-ID through, and Content-Location and
    Location readable on the answer."""
    http = client().http.client
    thread = new_thread()
    preflight = httpx.options(
        f"{BASE}/threads/{thread}/runs/stream",
        headers={"Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "x-api-key,content-type,last-event-id"})
    assert preflight.status_code in (200, 204), (preflight.status_code, preflight.text)
    assert preflight.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    allowed = preflight.headers["access-control-allow-headers"].lower()
    assert all(h in allowed for h in ("x-api-key", "content-type", "last-event-id")), allowed
    assert "POST" in preflight.headers["access-control-allow-methods"]

    created = http.post(f"/threads/{thread}/runs", json={"assistant_id": "default", "input": say("hi")},
                        headers={"Origin": ALLOWED_ORIGIN})
    assert created.status_code == 200, created.text
    assert created.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    exposed = created.headers["access-control-expose-headers"].lower()
    assert "content-location" in exposed and "location" in exposed.replace("content-location", ""), exposed
    client().runs.join(thread, created.json()["run_id"])

    # Another origin is not let in.
    other = httpx.options(
        f"{BASE}/threads/{thread}/runs/stream",
        headers={"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in other.headers, other.headers


# --- background runs ---------------------------------------------------------

RUN_FIELDS = {"run_id", "thread_id", "assistant_id", "created_at", "updated_at", "status",
              "metadata", "multitask_strategy"}


def test_a_background_run_is_pending_then_joined_and_listed():
    metadata = tagged()
    thread = new_thread(metadata=metadata)
    created = []
    run = client().runs.create(thread, "default", input=say("sleep:1500"),
                               metadata={"purpose": "test"}, on_run_created=created.append)
    assert RUN_FIELDS <= run.keys(), run
    assert run["status"] == "pending"
    assert run["thread_id"] == thread and run["assistant_id"] == assistant_uuid("default")
    assert run["multitask_strategy"] == "enqueue", "the default"
    assert run["metadata"]["purpose"] == "test"
    assert created == [{"run_id": run["run_id"], "thread_id": thread}]

    running = wait_for_status(thread, run["run_id"], {"running"})
    assert running["run_id"] == run["run_id"]
    assert client().threads.get(thread)["status"] == "busy"
    assert [t["thread_id"] for t in client().threads.search(metadata=metadata, status="busy")] == [thread]
    listed = client().runs.list(thread)
    assert [(r["run_id"], r["status"]) for r in listed] == [(run["run_id"], "running")]
    # A running run cannot be deleted.
    assert isinstance(refusal(409, lambda: client().runs.delete(thread, run["run_id"])),
                      errors.ConflictError)

    values = client().runs.join(thread, run["run_id"])
    assert messages_of(values) == [("human", "sleep:1500"), ("ai", "slept 1500 ms")]
    assert client().runs.get(thread, run["run_id"])["status"] == "success"
    assert client().threads.get(thread)["status"] == "idle"

    # Newest first, paged, filtered by status.
    second = client().runs.create(thread, "default", input=say("two"))
    client().runs.join(thread, second["run_id"])
    assert [r["run_id"] for r in client().runs.list(thread)] == [second["run_id"], run["run_id"]]
    assert [r["run_id"] for r in client().runs.list(thread, limit=1)] == [second["run_id"]]
    assert [r["run_id"] for r in client().runs.list(thread, limit=1, offset=1)] == [run["run_id"]]
    assert len(client().runs.list(thread, status="success")) == 2
    assert client().runs.list(thread, status="pending") == []
    # A finished run is deleted.
    client().runs.delete(thread, run["run_id"])
    refusal(404, lambda: client().runs.get(thread, run["run_id"]))
    assert [r["run_id"] for r in client().runs.list(thread)] == [second["run_id"]]


# --- join_stream after a dropped connection ------------------------------------

MODES = ["values", "updates", "messages-tuple"]


def test_join_stream_after_a_dropped_connection_resumes_after_last_event_id():
    thread = new_thread()
    http = client().http.client
    seen = []
    with http.stream("POST", f"/threads/{thread}/runs/stream",
                     json={"assistant_id": "default", "input": say("sleep:2000"),
                           "stream_mode": MODES, "stream_resumable": True},
                     headers={"Accept": "text/event-stream"}) as response:
        assert response.status_code == 200
        for part in raw_sse(response):
            seen.append(part)
            if part.event == "values":
                break  # the input's values: the run now sleeps; drop the connection
    assert [p.event for p in seen] == ["metadata", "values"], seen
    run_id = seen[0].data["run_id"]
    assert all(p.id for p in seen), "a resumable stream's events have ids"

    rest = list(client().runs.join_stream(thread, run_id, last_event_id=seen[-1].id))
    assert rest, "the rest of the run"
    assert all(p.id for p in rest), rest
    assert not {p.id for p in rest} & {p.id for p in seen}, "nothing twice"
    assert len({p.id for p in rest}) == len(rest)
    assert "metadata" not in events(rest)
    final = [p for p in rest if p.event == "values"][-1].data
    assert messages_of(final) == [("human", "sleep:2000"), ("ai", "slept 2000 ms")]
    assert "updates" in events(rest) and "messages" in events(rest)
    assert client().runs.get(thread, run_id)["status"] == "success", "the run went on"

    # Exactly the rest: what came before the drop and after the rejoin is
    # what a replay from the first event gives.
    replay = list(client().runs.join_stream(thread, run_id, last_event_id=seen[0].id))
    assert [tuple(p) for p in seen[1:] + rest] == [tuple(p) for p in replay]


def test_the_async_client_rejoins_a_stream_it_left():
    async def scenario():
        aclient = get_client(url=BASE, api_key=KEY)
        thread = (await aclient.threads.create())["thread_id"]
        seen = []
        stream = aclient.runs.stream(thread, "default", input=say("sleep:2000"),
                                     stream_mode=MODES, stream_resumable=True)
        async with contextlib.aclosing(stream):
            async for part in stream:
                seen.append(part)
                if part.event == "values":
                    break
        run_id = seen[0].data["run_id"]
        rest = [p async for p in aclient.runs.join_stream(thread, run_id, last_event_id=seen[-1].id)]
        status = (await aclient.runs.get(thread, run_id))["status"]
        await aclient.aclose()
        return seen, rest, status

    seen, rest, status = asyncio.run(scenario())
    assert events(seen) == ["metadata", "values"] and all(p.id for p in seen)
    assert rest and not {p.id for p in rest} & {p.id for p in seen}
    assert messages_of([p for p in rest if p.event == "values"][-1].data)[-1] == ("ai", "slept 2000 ms")
    assert status == "success"


def test_a_dropped_stream_with_on_disconnect_cancel_stops_its_run():
    """The run is silent while its model call lasts (8 s): the server may
    need a heartbeat (5 s) to see the client gone; the reference server
    sees it at once."""
    thread = new_thread()
    http = client().http.client
    with http.stream("POST", f"/threads/{thread}/runs/stream",
                     json={"assistant_id": "default", "input": say("sleep:8000"),
                           "on_disconnect": "cancel"},
                     headers={"Accept": "text/event-stream"}) as response:
        first = next(raw_sse(response))
    assert first.event == "metadata"
    run = wait_for_status(thread, first.data["run_id"], {"interrupted", "success", "error"})
    assert run["status"] == "interrupted"


# --- cancel ------------------------------------------------------------------

def test_cancel_interrupts_a_run():
    thread = new_thread()
    run = client().runs.create(thread, "default", input=say("sleep:5000"))
    wait_for_status(thread, run["run_id"], {"running"})
    started = time.monotonic()
    client().runs.cancel(thread, run["run_id"])
    values = client().runs.join(thread, run["run_id"])
    assert time.monotonic() - started < 4, "the run stopped when cancelled"
    assert client().runs.get(thread, run["run_id"])["status"] == "interrupted"
    assert ("ai", "slept 5000 ms") not in messages_of(values)
    assert client().threads.get(thread)["status"] == "idle"
    # The thread takes its next run.
    assert last_ai(client().runs.wait(thread, "default", input=say("next")))["content"] == "echo: next"


def test_cancel_and_wait_answers_once_the_run_is_over():
    thread = new_thread()
    run = client().runs.create(thread, "default", input=say("sleep:5000"))
    wait_for_status(thread, run["run_id"], {"running"})
    values = client().runs.cancel(thread, run["run_id"], wait=True)
    assert isinstance(values, dict), values
    assert client().runs.get(thread, run["run_id"])["status"] == "interrupted"


def test_cancel_with_rollback_deletes_the_run_and_what_it_added():
    thread = new_thread()
    before = client().runs.wait(thread, "default", input=say("before"))
    run = client().runs.create(thread, "default", input=say("sleep:5000"))
    wait_for_status(thread, run["run_id"], {"running"})
    client().runs.cancel(thread, run["run_id"], action="rollback")
    wait_until_gone(lambda: client().runs.get(thread, run["run_id"]))
    assert run["run_id"] not in [r["run_id"] for r in client().runs.list(thread)]
    state = client().threads.get_state(thread)
    assert messages_of(state["values"]) == messages_of(before), "the thread is as before the run"
    wait_for_thread_status(thread, "idle")


def test_cancel_of_an_unknown_run_is_a_404():
    thread = new_thread()
    assert isinstance(refusal(404, lambda: client().runs.cancel(thread, str(uuid.uuid4()))),
                      errors.NotFoundError)


# --- multitask strategies ------------------------------------------------------

def test_multitask_reject_refuses_a_second_run():
    thread = new_thread()
    first = client().runs.create(thread, "default", input=say("sleep:2000"))
    refused = refusal(409, lambda: client().runs.create(
        thread, "default", input=say("second"), multitask_strategy="reject"))
    assert isinstance(refused, errors.ConflictError)
    refusal(409, lambda: client().runs.wait(thread, "default", input=say("second"),
                                           multitask_strategy="reject"))
    assert isinstance(refusal(409, lambda: client().runs.stream(
        thread, "default", input=say("second"), multitask_strategy="reject")), errors.ConflictError)
    assert [r["run_id"] for r in client().runs.list(thread)] == [first["run_id"]], "nothing was queued"
    client().runs.join(thread, first["run_id"])
    # With nothing in flight, reject lets the run in.
    values = client().runs.wait(thread, "default", input=say("second"), multitask_strategy="reject")
    assert messages_of(values)[-2:] == [("human", "second"), ("ai", "echo: second")]


def test_multitask_enqueue_runs_them_in_order():
    thread = new_thread()
    first = client().runs.create(thread, "default", input=say("sleep:1500"))
    wait_for_status(thread, first["run_id"], {"running"})
    second = client().runs.create(thread, "default", input=say("second"), multitask_strategy="enqueue")
    third = client().runs.create(thread, "default", input=say("third"))  # enqueue is the default
    assert client().runs.get(thread, second["run_id"])["status"] == "pending"
    assert client().runs.get(thread, third["run_id"])["status"] == "pending"
    values = client().runs.join(thread, third["run_id"])
    assert messages_of(values) == [("human", "sleep:1500"), ("ai", "slept 1500 ms"),
                                   ("human", "second"), ("ai", "echo: second"),
                                   ("human", "third"), ("ai", "echo: third")]
    statuses = [client().runs.get(thread, r["run_id"])["status"] for r in (first, second, third)]
    assert statuses == ["success"] * 3


def test_a_queued_runs_stream_starts_from_the_conversation_before_it():
    # Streamed while it waits behind another run: its parts start from the
    # conversation as that run left it, its own message last, and its
    # answer has the same id in the chunks and in the state.
    thread = new_thread()
    client().runs.create(thread, "default", input=say("sleep:800"))
    parts = list(client().runs.stream(thread, "default", input=say("queued"),
                                      stream_mode=["values", "messages-tuple"]))
    run_id = parts[0].data["run_id"]
    values = [p.data for p in parts if p.event == "values"]
    first = [text_of(m["content"]) for m in values[0]["messages"]]
    assert first == ["sleep:800", "slept 800 ms", "queued"], first
    chunk_ids = {p.data[0]["id"] for p in parts if p.event == "messages"}
    assert chunk_ids == {f"{run_id}-1"}, chunk_ids
    answer = values[-1]["messages"][-1]
    assert (answer["id"], text_of(answer["content"])) == (f"{run_id}-1", "echo: queued"), answer
    state = client().threads.get_state(thread)["values"]["messages"]
    assert [m["id"] for m in state][-2:] == [f"{run_id}-0", f"{run_id}-1"], state


def test_multitask_interrupt_stops_the_first_run():
    thread = new_thread()
    first = client().runs.create(thread, "default", input=say("sleep:5000"))
    wait_for_status(thread, first["run_id"], {"running"})
    second = client().runs.create(thread, "default", input=say("instead"), multitask_strategy="interrupt")
    values = client().runs.join(thread, second["run_id"])
    assert client().runs.get(thread, first["run_id"])["status"] == "interrupted"
    assert client().runs.get(thread, second["run_id"])["status"] == "success"
    # What the first run had done stays: its input, not its answer.
    assert messages_of(values) == [("human", "sleep:5000"), ("human", "instead"), ("ai", "echo: instead")]


def test_multitask_rollback_deletes_the_first_run():
    thread = new_thread()
    client().runs.wait(thread, "default", input=say("before"))
    first = client().runs.create(thread, "default", input=say("sleep:5000"))
    wait_for_status(thread, first["run_id"], {"running"})
    second = client().runs.create(thread, "default", input=say("instead"), multitask_strategy="rollback")
    values = client().runs.join(thread, second["run_id"])
    wait_until_gone(lambda: client().runs.get(thread, first["run_id"]))
    assert messages_of(values) == [("human", "before"), ("ai", "echo: before"),
                                   ("human", "instead"), ("ai", "echo: instead")]
    assert client().runs.get(thread, second["run_id"])["status"] == "success"


# --- if_not_exists -------------------------------------------------------------

def test_if_not_exists_create_makes_the_thread_and_reject_is_a_404():
    thread = str(uuid.uuid4())
    refused = refusal(404, lambda: client().runs.create(thread, "default", input=say("hi")))
    assert isinstance(refused, errors.NotFoundError)
    assert "not found" in refused.response.json()["detail"].lower()
    refusal(404, lambda: client().runs.wait(thread, "default", input=say("hi"), if_not_exists="reject"))
    refusal(404, lambda: client().threads.get(thread))

    values = client().runs.wait(thread, "default", input=say("hi"), if_not_exists="create")
    assert last_ai(values)["content"] == "echo: hi"
    made = client().threads.get(thread)
    assert made["metadata"]["graph_id"] == "default" and made["status"] == "idle"


# --- state and history -----------------------------------------------------------

def test_state_and_history():
    thread = new_thread()
    one = client().runs.wait(thread, "default", input=say("one"))
    two = client().runs.wait(thread, "default", input=say("two"))

    state = client().threads.get_state(thread)
    assert {"values", "next", "tasks", "checkpoint", "metadata", "created_at", "interrupts"} <= state.keys()
    assert state["values"]["messages"] == two["messages"]
    assert state["next"] == [] and state["tasks"] == [] and state["interrupts"] == []
    assert isinstance(state["checkpoint"], dict) and state["checkpoint"]["checkpoint_id"], state
    assert isinstance(state["metadata"], dict) and isinstance(state["created_at"], str)

    history = client().threads.get_history(thread)
    assert [messages_of(h["values"]) for h in history] == [messages_of(two), messages_of(one)], \
        "one state per run, newest first"
    assert history[0]["checkpoint"]["checkpoint_id"] == state["checkpoint"]["checkpoint_id"]
    assert history[0]["checkpoint"]["checkpoint_id"] != history[1]["checkpoint"]["checkpoint_id"]
    assert [messages_of(h["values"]) for h in client().threads.get_history(thread, limit=1)] == \
        [messages_of(two)]
    # The states before a checkpoint, named as LangGraph's server reads it.
    older = client().threads.get_history(thread, before={"configurable": history[0]["checkpoint"]})
    assert [messages_of(h["values"]) for h in older] == [messages_of(one)]

    # A thread with no run yet has an empty state.
    empty = client().threads.get_state(new_thread())
    assert empty["values"] in ({}, {"messages": []}, None), empty
    assert client().threads.get_history(new_thread()) == []


# --- interrupts: a tool call that waits for a person -----------------------------

def interrupt_in(values):
    [interrupt] = values["__interrupt__"]
    value = interrupt["value"]
    [request] = value["action_requests"]
    assert request["name"] == "current_time" and request["args"] == {}, request
    assert isinstance(request["description"], str)
    [review] = value["review_configs"]
    assert review["action_name"] == "current_time"
    assert {"approve", "reject"} <= set(review["allowed_decisions"]), review
    return interrupt


def test_an_interrupt_then_its_approval():
    metadata = tagged()
    thread = new_thread(metadata=metadata)
    parts = list(client().runs.stream(thread, "guarded", input=say("tool:current_time {}"),
                                      stream_mode=["values", "updates"]))
    run_id = parts[0].data["run_id"]
    interrupted_values = [p.data for p in parts if p.event == "values" and "__interrupt__" in p.data]
    interrupted_updates = [p.data for p in parts if p.event == "updates" and "__interrupt__" in p.data]
    assert interrupted_values and interrupted_updates, parts
    interrupt = interrupt_in(interrupted_values[-1])
    assert interrupt_in(interrupted_updates[-1])["id"] == interrupt["id"]
    # The values that carry the interrupt are the whole state, as LangGraph
    # sends them: the conversation up to the call that waits.
    waiting = interrupted_values[-1]["messages"]
    assert [m["type"] for m in waiting] == ["human", "ai"], interrupted_values[-1]
    assert waiting[1]["tool_calls"][0]["id"] == interrupt["id"], "the interrupt is the call's"

    assert client().runs.get(thread, run_id)["status"] == "interrupted"
    assert client().threads.get(thread)["status"] == "interrupted"
    assert [t["thread_id"] for t in client().threads.search(metadata=metadata, status="interrupted")] == [thread]
    state = client().threads.get_state(thread)
    assert [i["id"] for i in state["interrupts"]] == [interrupt["id"]], state
    assert [i["id"] for task in state["tasks"] for i in task["interrupts"]] == [interrupt["id"]], state

    # Agent Chat UI's approval: a new run with the decision.
    values = client().runs.wait(thread, "guarded",
                                command={"resume": {"decisions": [{"type": "approve"}]}})
    types = [m["type"] for m in values["messages"]]
    assert types == ["human", "ai", "tool", "ai"], values
    tool = values["messages"][2]
    assert (tool["tool_call_id"], tool["name"]) == (interrupt["id"], "current_time")
    assert re.match(r"\d{4}-\d{2}-\d{2}T", tool["content"]), tool
    assert last_ai(values)["content"] == f"tool result: {tool['content']}"
    assert client().threads.get(thread)["status"] == "idle"
    assert client().threads.get_state(thread)["interrupts"] == []


def test_wait_and_a_values_stream_answer_the_interrupt():
    thread = new_thread()
    values = client().runs.wait(thread, "guarded", input=say("tool:current_time {}"))
    interrupt_in(values)
    assert [m["type"] for m in values["messages"]] == ["human", "ai"], values
    assert client().threads.get(thread)["status"] == "interrupted"

    # Streamed with values alone (the default mode): the last values are
    # the state with the interrupt.
    thread = new_thread()
    parts = list(client().runs.stream(thread, "guarded", input=say("tool:current_time {}")))
    assert set(events(parts[1:])) == {"values"}, events(parts)
    last = parts[-1].data
    interrupt = interrupt_in(last)
    assert [m["type"] for m in last["messages"]] == ["human", "ai"], last
    assert last["messages"][1]["tool_calls"][0]["id"] == interrupt["id"]


def test_agent_chat_uis_requests_continue_a_thread_and_decide():
    # Agent Chat UI keeps the thread's history (fetchStateHistory) and so
    # sends the latest checkpoint with every run, and resumes with an empty
    # input beside the command; its "Mark as resolved" is `goto: __end__`.
    thread = new_thread()
    client().runs.wait(thread, "guarded", input=say("first"))
    head = client().threads.get_history(thread, limit=1)[0]["checkpoint"]
    values = client().runs.wait(thread, "guarded", input=say("second"), checkpoint=head)
    assert last_ai(values)["content"] == "echo: second"
    # An earlier checkpoint would fork the thread: refused, naming the latest.
    refused = refusal(422, lambda: client().runs.wait(thread, "guarded", input=say("fork"),
                                                        checkpoint=head))
    assert "earlier checkpoint" in refused.response.json()["detail"], refused
    # A regenerate sends the earlier checkpoint and no input: the fork is
    # what it is refused for.
    refused = refusal(422, lambda: client().runs.wait(thread, "guarded", checkpoint=head))
    assert "earlier checkpoint" in refused.response.json()["detail"], refused

    client().runs.wait(thread, "guarded", input=say("tool:current_time {}"))
    head = client().threads.get_history(thread, limit=1)[0]["checkpoint"]
    values = client().runs.wait(thread, "guarded", input={},
                                command={"resume": {"decisions": [{"type": "approve"}]}},
                                checkpoint=head)
    assert last_ai(values)["content"].startswith("tool result: "), values
    assert client().threads.get(thread)["status"] == "idle"

    client().runs.wait(thread, "guarded", input=say("tool:current_time {}"))
    assert client().threads.get(thread)["status"] == "interrupted"
    parts = list(client().runs.stream(thread, "guarded", input={},
                                      command={"goto": "__end__"}, stream_mode="updates"))
    assert parts[0].event == "metadata", parts
    assert client().threads.get(thread)["status"] == "idle"
    tool = client().threads.get_state(thread)["values"]["messages"][-1]
    assert tool["type"] == "tool" and "not run" in text_of(tool["content"]), tool
    assert "error" not in events(parts), parts


def test_info_is_open_as_on_langgraphs_server():
    answer = httpx.get(f"{BASE}/info")
    assert answer.status_code == 200, answer.text
    assert answer.json()["flags"]["assistants"] is True


# The resume values a decision may take: langchain v1's HITL (Agent Chat
# UI), the older HumanResponse list, a bare decision, a boolean, a word.
APPROVALS = [
    pytest.param({"decisions": [{"type": "approve"}]}, id="hitl-approve"),
    pytest.param([{"type": "accept", "args": None}], id="human-response-accept"),
    pytest.param({"type": "approve"}, id="decision-approve"),
    pytest.param(True, id="true"),
    pytest.param("approve", id="word-approve"),
]
DENIALS = [
    pytest.param({"decisions": [{"type": "reject", "message": "not now"}]}, id="hitl-reject"),
    pytest.param([{"type": "ignore", "args": None}], id="human-response-ignore"),
    pytest.param({"type": "reject"}, id="decision-reject"),
    pytest.param(False, id="false"),
    pytest.param("deny", id="word-deny"),
]


@pytest.mark.parametrize("resume", APPROVALS)
def test_each_form_of_approval(resume):
    thread = new_thread()
    client().runs.wait(thread, "guarded", input=say("tool:current_time {}"))
    values = client().runs.wait(thread, "guarded", command={"resume": resume})
    tool = values["messages"][-2]
    assert tool["type"] == "tool" and re.match(r"\d{4}-\d{2}-\d{2}T", tool["content"]), values
    assert client().threads.get(thread)["status"] == "idle"


@pytest.mark.parametrize("resume", DENIALS)
def test_each_form_of_denial(resume):
    thread = new_thread()
    client().runs.wait(thread, "guarded", input=say("tool:current_time {}"))
    created = []
    values = client().runs.wait(thread, "guarded", command={"resume": resume},
                                on_run_created=created.append)
    tool = values["messages"][-2]
    assert tool["type"] == "tool" and tool["name"] == "current_time", values
    assert "denied" in tool["content"] and not re.search(r"\d{4}-\d{2}-\d{2}T", tool["content"]), tool
    if isinstance(resume, dict) and "decisions" in resume:
        assert "not now" in tool["content"], "the person's message reaches the model"
    assert last_ai(values)["content"] == f"tool result: {tool['content']}"
    assert client().runs.get(thread, created[0]["run_id"])["status"] == "success"
    assert client().threads.get(thread)["status"] == "idle"


# --- stateless runs ------------------------------------------------------------

def test_stateless_wait_and_stream():
    created = []
    values = client().runs.wait(None, "default", input=say("hello"), on_run_created=created.append)
    assert messages_of(values) == [("human", "hello"), ("ai", "echo: hello")]
    # Its temporary thread is deleted at the end.
    temporary = created[0]["thread_id"]
    assert temporary
    wait_until_gone(lambda: client().threads.get(temporary))

    parts = list(client().runs.stream(None, "default", input=say("streamed"),
                                      stream_mode=["values", "messages-tuple"]))
    assert parts[0].event == "metadata" and parts[0].data["run_id"]
    final = [p for p in parts if p.event == "values"][-1].data
    assert messages_of(final) == [("human", "streamed"), ("ai", "echo: streamed")]
    assert "messages" in events(parts)

    # on_completion=keep keeps it.
    kept = []
    client().runs.wait(None, "default", input=say("keep me"), on_completion="keep",
                       on_run_created=kept.append)
    thread = client().threads.get(kept[0]["thread_id"])
    assert messages_of(thread["values"]) == [("human", "keep me"), ("ai", "echo: keep me")]

    # A resume needs a thread.
    refusal(400, lambda: client().runs.wait(None, "guarded", command={"resume": True}))


# --- keys, tenants, unknown ids ----------------------------------------------------

def test_a_wrong_or_missing_key_is_a_401():
    for key in (WRONG_KEY, "not-a-bulkhead-key"):
        refused = refusal(401, lambda: client(key).assistants.search())
        assert isinstance(refused, errors.AuthenticationError)
        refusal(401, lambda: client(key).threads.create())
        refusal(401, lambda: client(key).runs.wait(None, "default", input=say("hi")))
    # api_key=None: the SDK sends no key at all.
    refused = refusal(401, lambda: get_sync_client(url=BASE, api_key=None).threads.search())
    assert isinstance(refused, errors.AuthenticationError)


def test_a_key_over_its_rate_is_a_429():
    limited = get_sync_client(url=BASE, api_key=LIMITED_KEY)
    limited.assistants.search()
    refused = refusal(429, lambda: limited.assistants.search())
    assert isinstance(refused, errors.RateLimitError)
    assert int(refused.response.headers["retry-after"]) > 0


def test_unknown_ids_are_404s():
    nobody = str(uuid.uuid4())
    for call in (
        lambda: client().threads.get(nobody),
        lambda: client().threads.get_state(nobody),
        lambda: client().threads.update(nobody, metadata={"a": 1}),
        lambda: client().threads.delete(nobody),
        lambda: client().runs.list(nobody),
        lambda: client().runs.get(nobody, str(uuid.uuid4())),
        lambda: client().runs.wait(nobody, "default", input=say("hi")),
        lambda: client().runs.stream(nobody, "default", input=say("hi")),
    ):
        refusal(404, call)
    thread = new_thread()
    assert isinstance(refusal(404, lambda: client().runs.get(thread, str(uuid.uuid4()))),
                      errors.NotFoundError)
    refusal(404, lambda: client().runs.delete(thread, str(uuid.uuid4())))


def test_another_tenants_thread_is_not_found():
    metadata = tagged()
    thread = new_thread(metadata=metadata)
    run = client().runs.create(thread, "default", input=say("mine"))
    client().runs.join(thread, run["run_id"])
    other = client(OTHER_TENANT_KEY)
    for call in (
        lambda: other.threads.get(thread),
        lambda: other.threads.get_state(thread),
        lambda: other.threads.get_history(thread),
        lambda: other.threads.update(thread, metadata={"taken": True}),
        lambda: other.threads.delete(thread),
        lambda: other.runs.list(thread),
        lambda: other.runs.get(thread, run["run_id"]),
        lambda: other.runs.wait(thread, "default", input=say("let me in")),
        lambda: other.runs.create(thread, "default", input=say("let me in"), if_not_exists="create"),
        lambda: other.runs.cancel(thread, run["run_id"]),
    ):
        refusal(404, call)
    assert other.threads.search(metadata=metadata) == []
    assert other.threads.count(metadata=metadata) == 0
    # Nothing of it changed.
    mine = client().threads.get(thread)
    assert mine["metadata"] == {**metadata, "graph_id": "default",
                                "assistant_id": assistant_uuid("default")}
    assert messages_of(client().threads.get_state(thread)["values"]) == [("human", "mine"), ("ai", "echo: mine")]


# --- as a new user would -------------------------------------------------------------

# The "Quick Start" of the package's own README (langgraph_sdk-0.4.14's
# PyPI description), with only the URL given, as its comment says to. Its
# top-level `await`s are run as a notebook or `python -m asyncio` runs them.
QUICKSTART = """
from langgraph_sdk import get_client

# If you're using a remote server, initialize the client with `get_client(url=REMOTE_URL)`
client = get_client(url=REMOTE_URL)

# List all assistants
assistants = await client.assistants.search()

# We auto-create an assistant for each graph you register in config.
agent = assistants[0]

# Start a new thread
thread = await client.threads.create()

# Start a streaming run
input = {"messages": [{"role": "human", "content": "what's the weather in la"}]}
async for chunk in client.runs.stream(
    thread["thread_id"], agent["assistant_id"], input=input
):
    print(chunk)
"""

RUN_TOP_LEVEL_AWAIT = (
    "import ast, asyncio, sys\n"
    "code = compile(sys.stdin.read(), 'quickstart', 'exec', flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)\n"
    "asyncio.run(eval(code, {'__name__': '__main__'}))\n"
)


def test_the_sdks_quickstart_runs_pointed_here():
    script = QUICKSTART.replace("REMOTE_URL", repr(BASE))
    # The key comes from the environment, where the SDK looks for it.
    env = {"PATH": os.environ["PATH"], "LANGGRAPH_API_KEY": KEY}
    out = subprocess.run([sys.executable, "-c", RUN_TOP_LEVEL_AWAIT], input=textwrap.dedent(script),
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("StreamPart(event='metadata', data={") and "'run_id': " in lines[0], lines
    assert all(line.startswith("StreamPart(event='values'") for line in lines[1:]), lines
    assert "echo: what's the weather in la" in lines[-1], lines
