"""The LangGraph side of the benchmark: a graph with no model. One node
answers every turn with `echo: <the last human message>`, the same answer
Bulkhead's in-process mock model gives, so both servers do the same work
per run but for their own machinery."""

from langchain_core.messages import AIMessage, HumanMessage
from langgraph.graph import END, START, MessagesState, StateGraph


def _text(content):
    if isinstance(content, str):
        return content
    return "".join(
        block.get("text", "") if isinstance(block, dict) else str(block) for block in content
    )


def echo(state: MessagesState):
    last = next(
        (m for m in reversed(state["messages"]) if isinstance(m, HumanMessage)), None
    )
    text = _text(last.content) if last is not None else ""
    return {"messages": [AIMessage(content=f"echo: {text}")]}


builder = StateGraph(MessagesState)
builder.add_node("echo", echo)
builder.add_edge(START, "echo")
builder.add_edge("echo", END)
graph = builder.compile()
