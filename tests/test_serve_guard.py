"""The server's request guard (API key, content type, body size) around a tiny FastAPI app: through
httpx's ASGI transport, and once on a real uvicorn server on loopback."""

import asyncio
import json
import socket
import threading
import time
from contextlib import asynccontextmanager, contextmanager

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request

from meshsp.serve.guard import ENV_API_KEY, REASONS, Guard, api_key_from

KEY = "test-key-0123456789"
LIMIT = 1024
JSON = {"content-type": "application/json"}


class Recorder:
    """What the app saw and what the guard rejected."""

    def __init__(self) -> None:
        self.calls: list[int] = []  # body lengths /echo received
        self.rejects: list[str] = []
        self.disconnects: list[str] = []
        self.started = False


def _app(seen: Recorder) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        seen.started = True
        yield

    app = FastAPI(lifespan=lifespan)

    @app.post("/echo")
    async def echo(request: Request):
        body = await request.body()
        json.loads(body)
        seen.calls.append(len(body))
        return {"length": len(body), "disconnected": await request.is_disconnected()}

    @app.post("/wait")
    async def wait(request: Request):
        await request.body()
        while not await request.is_disconnected():
            await asyncio.sleep(0.01)
        seen.disconnects.append("wait")
        return {}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return {"requests": len(seen.calls)}

    return app


def _guarded(**options) -> tuple[Guard, Recorder]:
    seen = Recorder()
    options.setdefault("max_body_bytes", LIMIT)
    return Guard(_app(seen), on_reject=seen.rejects.append, **options), seen


def _request(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def _body(size: int) -> bytes:
    """A JSON document of exactly ``size`` bytes."""
    return json.dumps({"p": "x" * (size - 9)}).encode()


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] is None
    return error


# --- API key ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer wrong-key-0000"}, {"authorization": KEY},
                                     {"authorization": f"Basic {KEY}"}])
def test_missing_or_wrong_key_is_401(headers):
    app, seen = _guarded(api_key=KEY)
    response = _request(app, "POST", "/echo", content=b"{}", headers={**JSON, **headers})
    error = _error(response, 401)
    assert error["code"] == "invalid_api_key"
    assert "send 'Authorization: Bearer <key>'" in error["message"]
    assert KEY not in response.text and "wrong-key" not in response.text
    assert response.headers["www-authenticate"] == "Bearer" and response.headers["connection"] == "close"
    assert seen.calls == [] and seen.rejects == ["unauthorized"]


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_right_key_passes_in_any_case_of_the_scheme(scheme):
    app, seen = _guarded(api_key=KEY)
    response = _request(app, "POST", "/echo", content=b"{}", headers={**JSON, "authorization": f"{scheme} {KEY}"})
    assert response.status_code == 200 and response.json() == {"length": 2, "disconnected": False}
    assert seen.calls == [2] and seen.rejects == []


def test_open_paths_need_no_key_and_metrics_does():
    app, seen = _guarded(api_key=KEY)
    assert _request(app, "GET", "/health").json() == {"status": "ok"}
    _error(_request(app, "GET", "/metrics"), 401)
    assert _request(app, "GET", "/metrics", headers={"authorization": f"Bearer {KEY}"}).status_code == 200
    assert seen.rejects == ["unauthorized"]


def test_no_key_set_leaves_every_path_open():
    app, seen = _guarded()
    assert _request(app, "GET", "/metrics").status_code == 200
    assert _request(app, "POST", "/echo", content=b"{}", headers=JSON).status_code == 200
    assert seen.rejects == []


def test_key_is_checked_before_content_type():
    app, seen = _guarded(api_key=KEY)
    _error(_request(app, "POST", "/echo", content=b"{}", headers={"content-type": "text/plain"}), 401)
    assert seen.rejects == ["unauthorized"]


# --- content type ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, sent", [
    ({"content": b"{}", "headers": {"content-type": "text/plain"}}, "'text/plain'"),
    ({"data": {"prompt": "a cat"}}, "'application/x-www-form-urlencoded'"),
    ({"files": {"image": ("a.png", b"png")}}, "'multipart/form-data; boundary="),
    ({"content": b"{}"}, "no content-type"),
    ({"content": b"{}", "headers": {"content-type": "application/json; charset=latin-1"}}, "'latin-1'"),
])
def test_bodies_that_are_not_utf8_json_are_415(kwargs, sent):
    app, seen = _guarded()
    error = _error(_request(app, "POST", "/echo", **kwargs), 415)
    assert sent in error["message"] and "send 'Content-Type: application/json'" in error["message"]
    assert seen.calls == [] and seen.rejects == ["unsupported_media_type"]


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON;Charset=\"UTF-8\""])
def test_json_passes(content_type):
    app, seen = _guarded()
    response = _request(app, "POST", "/echo", content=b'{"a": 1}', headers={"content-type": content_type})
    assert response.json()["length"] == 8 and seen.rejects == []


def test_get_needs_no_content_type():
    app, seen = _guarded()
    assert _request(app, "GET", "/metrics").status_code == 200 and seen.rejects == []


# --- body size -------------------------------------------------------------------------------------


def test_content_length_over_the_limit_is_413_before_the_app_runs():
    app, seen = _guarded()
    error = _error(_request(app, "POST", "/echo", content=_body(LIMIT + 1), headers=JSON), 413)
    assert f"{LIMIT + 1} bytes" in error["message"] and f"at most {LIMIT} bytes" in error["message"]
    assert seen.calls == [] and seen.rejects == ["too_large"]


def test_content_length_is_judged_without_reading_the_body():
    received = []

    async def receive():
        received.append(1)
        return {"type": "http.request", "body": b"", "more_body": True}

    sent = []

    async def send(message):
        sent.append(message)

    seen = Recorder()
    scope = {"type": "http", "method": "POST", "path": "/echo", "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(10**11).encode())]}
    asyncio.run(Guard(_app(seen), on_reject=seen.rejects.append)(scope, receive, send))
    assert received == [] and sent[0]["status"] == 413 and seen.rejects == ["too_large"]


def test_a_body_exactly_at_the_limit_passes():
    app, seen = _guarded()
    assert _request(app, "POST", "/echo", content=_body(LIMIT), headers=JSON).json()["length"] == LIMIT

    async def chunks():
        body = _body(LIMIT)
        for i in range(0, LIMIT, 100):
            yield body[i:i + 100]

    assert _request(app, "POST", "/echo", content=chunks(), headers=JSON).json()["length"] == LIMIT
    assert seen.calls == [LIMIT, LIMIT] and seen.rejects == []


def test_chunked_body_over_the_limit_is_413():
    pulled = []

    async def chunks():
        for i in range(1000):  # 100 KB, the guard stops pulling past LIMIT
            pulled.append(i)
            yield b"x" * 100

    app, seen = _guarded()
    error = _error(_request(app, "POST", "/echo", content=chunks(), headers=JSON), 413)
    assert f"limit of {LIMIT} bytes" in error["message"]
    assert len(pulled) == LIMIT // 100 + 1
    assert seen.calls == [] and seen.rejects == ["too_large"]


def test_chunked_body_reaches_the_app_then_the_disconnect():
    messages = [{"type": "http.request", "body": b'{"a":', "more_body": True},
                {"type": "http.request", "body": b" 1}", "more_body": False}, {"type": "http.disconnect"}]
    seen_by_app = []

    async def receive():
        return messages.pop(0)

    async def app(scope, receive, send):
        seen_by_app.extend([await receive(), await receive()])

    async def send(message):
        raise AssertionError(f"the guard answered {message}")

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-type", b"application/json"),
                                                                        (b"transfer-encoding", b"chunked")]}
    asyncio.run(Guard(app)(scope, receive, send))
    assert seen_by_app == [{"type": "http.request", "body": b'{"a": 1}', "more_body": False},
                           {"type": "http.disconnect"}]


def test_transfer_encoding_makes_the_guard_count_despite_a_content_length():
    sent = []

    async def receive():  # framed by its chunks, the body outgrows the content-length it claims
        return {"type": "http.request", "body": b"x" * 600, "more_body": True}

    async def send(message):
        sent.append(message)

    seen = Recorder()
    scope = {"type": "http", "method": "POST", "path": "/echo", "headers": [
        (b"content-type", b"application/json"), (b"content-length", b"2"), (b"transfer-encoding", b"chunked")]}
    asyncio.run(Guard(_app(seen), max_body_bytes=LIMIT, on_reject=seen.rejects.append)(scope, receive, send))
    assert sent[0]["status"] == 413 and seen.calls == [] and seen.rejects == ["too_large"]


def test_a_client_that_leaves_mid_body_is_not_answered():
    messages = [{"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.disconnect"}]

    async def receive():
        return messages.pop(0)

    async def app(scope, receive, send):
        raise AssertionError("the app ran")

    async def send(message):
        raise AssertionError(f"the guard answered {message}")

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-type", b"application/json")]}
    asyncio.run(Guard(app)(scope, receive, send))
    assert messages == []


@pytest.mark.parametrize("value", [b"abc", b"-1", b"1.5", b"", b"1" * 21, b"0x10"])
def test_malformed_content_length_is_400(value):
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        sent.append(message)

    seen = Recorder()
    scope = {"type": "http", "method": "POST", "path": "/echo", "headers": [
        (b"content-type", b"application/json"), (b"content-length", value)]}
    asyncio.run(Guard(_app(seen), on_reject=seen.rejects.append)(scope, receive, send))
    assert sent[0]["status"] == 400 and seen.calls == [] and seen.rejects == ["bad_content_length"]
    error = json.loads(sent[1]["body"])["error"]
    assert "content-length" in error["message"] and "whole number of bytes" in error["message"]


def test_http2_rejections_have_no_connection_header():
    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "http_version": "2", "method": "POST", "path": "/", "headers": []}
    asyncio.run(Guard(_app(Recorder()))(scope, None, send))
    assert sent[0]["status"] == 415 and b"connection" not in dict(sent[0]["headers"])


def test_conflicting_content_lengths_are_400():
    app, seen = _guarded()
    headers = [("content-type", "application/json"), ("content-length", "2"), ("content-length", "3")]
    _error(_request(app, "POST", "/echo", content=b"{}", headers=headers), 400)
    assert seen.rejects == ["bad_content_length"]


def test_each_rejection_is_counted_once_with_its_reason():
    app, seen = _guarded(api_key=KEY)
    auth = {"authorization": f"Bearer {KEY}"}
    _request(app, "GET", "/metrics")
    _request(app, "POST", "/echo", content=b"{}", headers={**auth, "content-type": "text/plain"})
    _request(app, "POST", "/echo", content=_body(LIMIT + 1), headers={**auth, **JSON})
    _request(app, "POST", "/echo", content=b"{}", headers=[*auth.items(), *JSON.items(), ("content-length", "x")])
    _request(app, "POST", "/echo", content=b"{}", headers={**auth, **JSON})
    assert seen.rejects == list(REASONS) and seen.calls == [2]


def test_lifespan_passes_through():
    from starlette.testclient import TestClient

    app, seen = _guarded(api_key=KEY)
    with TestClient(app) as client:
        assert seen.started
        assert client.get("/health").status_code == 200


@pytest.mark.parametrize("max_body_bytes", [0, -1, 1.5, True, "1024"])
def test_guard_refuses_a_bad_limit(max_body_bytes):
    with pytest.raises(ValueError, match="positive number of bytes"):
        Guard(_app(Recorder()), max_body_bytes=max_body_bytes)


def test_guard_refuses_an_unusable_key():
    with pytest.raises(ValueError, match="is 0 characters|empty"):
        Guard(_app(Recorder()), api_key="")


# --- api_key_from ----------------------------------------------------------------------------------


def test_api_key_from_flag_then_env_then_none():
    assert api_key_from(KEY, {ENV_API_KEY: "other-key-000"}) == KEY
    assert api_key_from(None, {ENV_API_KEY: KEY}) == KEY
    assert api_key_from(None, {}) is None


@pytest.mark.parametrize("flag, env, match", [
    ("short", {}, "from --api-key is 5 characters; use at least 8"),
    (None, {ENV_API_KEY: "abc"}, "from MESHSP_API_KEY is 3 characters; use at least 8"),
    ("", {ENV_API_KEY: KEY}, "from --api-key is empty or blank"),
    (None, {ENV_API_KEY: "   \t    "}, "empty or blank"),
    ("has a space in it", {}, "position 3"),
    (KEY + "\n", {}, "position 19"),
])
def test_api_key_from_refuses_unusable_keys(flag, env, match):
    with pytest.raises(ValueError, match=match) as raised:
        api_key_from(flag, env)
    assert "secrets.token_urlsafe" in str(raised.value)


# --- a real server ---------------------------------------------------------------------------------


@contextmanager
def _serving(app):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_real_server_refuses_100_mb_promptly_and_keeps_serving():
    big = 100 * 2**20
    app, seen = _guarded(max_body_bytes=2**20)

    def chunks():
        for _ in range(big // 2**16):
            yield b"x" * 2**16

    with _serving(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        for content in (b"x" * big, chunks()):
            start = time.monotonic()
            response = client.post("/echo", content=content, headers=JSON)
            assert time.monotonic() - start < 10
            _error(response, 413)
            assert client.post("/echo", content=b'{"a": 1}', headers=JSON).json()["length"] == 8
        assert client.get("/health").json() == {"status": "ok"}
    assert seen.rejects == ["too_large", "too_large"] and seen.calls == [8, 8]


def test_real_server_app_sees_the_client_leave_after_a_chunked_body():
    app, seen = _guarded()
    with _serving(app) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /wait HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"transfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
            time.sleep(0.2)
        deadline = time.monotonic() + 5
        while not seen.disconnects:
            assert time.monotonic() < deadline, "the app never saw http.disconnect"
            time.sleep(0.01)
