"""Drive Hall's MCP server with the official MCP Python SDK (package `mcp`, pinned in .ci/run).

Usage:
    client.py http URL TOKEN            streamable HTTP transport, bearer TOKEN
    client.py stdio HALL URL TOKEN      stdio transport: runs `HALL mcp` with HALL_URL/HALL_TOKEN

Reads a JSON list of steps on stdin, runs them in one session after `initialize`, and prints
one JSON object on stdout:
    {"initialize": {...InitializeResult...}, "steps": [{"result": ...} | {"error": {...}}, ...]}
or, when the session cannot be set up, {"initialize_error": {"type": ..., "message": ...}}.
Steps: {"op": "list_tools"}, {"op": "ping"}, {"op": "call", "name": ..., "arguments": {...}}.
Called from tests/mcp.rs; it asserts nothing itself.
"""

import json
import sys

import anyio
from mcp import ClientSession, MCPError
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client


def dump(model):
    return model.model_dump(by_alias=True, mode="json", exclude_none=True)


def describe(exc):
    # anyio task groups wrap failures; report the innermost one.
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    out = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, MCPError):
        out["code"] = exc.error.code
        out["message"] = exc.error.message
        if exc.error.data is not None:
            out["data"] = exc.error.data
    return out


async def run_steps(session, steps):
    out = {"initialize": dump(await session.initialize()), "steps": []}
    for step in steps:
        try:
            if step["op"] == "list_tools":
                res = await session.list_tools()
            elif step["op"] == "ping":
                res = await session.send_ping()
            elif step["op"] == "call":
                res = await session.call_tool(step["name"], step.get("arguments"))
            else:
                raise ValueError(f"unknown op {step['op']!r}")
            out["steps"].append({"result": dump(res)})
        except Exception as e:  # noqa: BLE001 - the test asserts on what failed
            out["steps"].append({"error": describe(e)})
    return out


async def main():
    mode, steps = sys.argv[1], json.load(sys.stdin)
    with anyio.fail_after(120):
        if mode == "http":
            url, token = sys.argv[2], sys.argv[3]
            headers = {"Authorization": f"Bearer {token}"}
            async with create_mcp_http_client(headers=headers) as http:
                async with streamable_http_client(url, http_client=http) as (read, write):
                    async with ClientSession(read, write) as session:
                        return await run_steps(session, steps)
        elif mode == "stdio":
            hall, url, token = sys.argv[2], sys.argv[3], sys.argv[4]
            params = StdioServerParameters(
                command=hall, args=["mcp"], env={"HALL_URL": url, "HALL_TOKEN": token}
            )
            async with stdio_client(params) as (read, write):
                async with ClientSession(read, write) as session:
                    return await run_steps(session, steps)
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    try:
        result = anyio.run(main)
    except Exception as e:  # noqa: BLE001
        result = {"initialize_error": describe(e)}
    print(json.dumps(result))
