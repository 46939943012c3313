"""offload-serve: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one engine.

Requests are queued: one generation runs at a time, in arrival order, since the engine streams its
weights for one sequence of forward passes (see README, "Server"). A client that disconnects while its
reply streams stops that generation at the next token; a queued one that leaves is never run.
"""
import argparse
import asyncio
import hmac
import os
import socket
import sys
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

from .cli import _positive_int, _run_guarded, add_engine_args, open_engine
from .errors import OffloadError


# ---- requests ----
def _models():
    """The request bodies (pydantic): unknown fields are ignored, invalid ones refused with a 400."""
    from pydantic import BaseModel, ConfigDict, Field, field_validator

    class Body(BaseModel):
        model_config = ConfigDict(extra="ignore")

    class TextPart(Body):
        type: Literal["text"]
        text: str

    class Message(Body):
        role: str = Field(min_length=1)
        content: str | list[TextPart] | None = None

        def as_dict(self) -> dict:
            content = self.content
            if isinstance(content, list):
                content = "".join(part.text for part in content)
            return {"role": self.role, "content": content or ""}

    class StreamOptions(Body):
        include_usage: bool = False

    class Sampling(Body):
        model: str | None = None
        max_tokens: int | None = Field(None, ge=1)
        min_tokens: int = Field(0, ge=0)  # vLLM's extension: no end of sequence before this many tokens
        temperature: float | None = Field(None, ge=0, le=2)
        top_p: float | None = Field(None, gt=0, le=1)
        seed: int | None = None
        stop: str | list[str] | None = None
        n: int = 1
        stream: bool = False
        stream_options: StreamOptions | None = None

        @field_validator("n")
        @classmethod
        def _one_choice(cls, n):
            if n != 1:
                raise ValueError("only n=1 is supported")
            return n

        @field_validator("stop")
        @classmethod
        def _stops(cls, stop):
            stops = [stop] if isinstance(stop, str) else stop or []
            if any(not s for s in stops):
                raise ValueError("stop sequences must not be empty")
            return stops

        def limit(self):
            return self.max_tokens

    class ChatRequest(Sampling):
        messages: list[Message] = Field(min_length=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        logprobs: Literal[False] | None = None

        def limit(self):
            return self.max_completion_tokens or self.max_tokens

    class CompletionRequest(Sampling):
        prompt: str | list[str]
        logprobs: None = None
        echo: Literal[False] = False
        best_of: Literal[1] | None = None

        @field_validator("prompt")
        @classmethod
        def _one_prompt(cls, prompt):
            if isinstance(prompt, list):
                if len(prompt) != 1:
                    raise ValueError("one prompt per request")
                prompt = prompt[0]
            return prompt

    return ChatRequest, CompletionRequest


class ApiError(Exception):
    """Answered as OpenAI's error JSON with `status`."""

    def __init__(self, status: int, message: str, type_="invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- generation ----
class StopText:
    """Cuts streamed text at the first stop sequence, holding back a tail that may be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops, self.held, self.hit = stops, "", False

    def feed(self, piece: str) -> str:
        if self.hit:
            return ""
        text = self.held + piece
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit, self.held = True, ""
            return text[:min(found)]
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        text, self.held = ("" if self.hit else self.held), ""
        return text


class Job:
    """One validated request: the prompt (a string or a chat), its token count and the generate options."""

    def __init__(self, prompt, n_prompt: int, max_new: int, stops: list[str], kwargs: dict, seed):
        self.prompt, self.n_prompt, self.max_new, self.stops, self.kwargs, self.seed = (
            prompt, n_prompt, max_new, stops, kwargs, seed)
        self.completion_tokens = 0
        self.finish_reason = None
        self.stream = None  # the TextStream once it runs
        self.gone = False  # the client left: do not start, or stop


async def _watch(request, job: Job) -> None:
    """For a non-streamed reply: notice the client leaving (streamed ones are cancelled by starlette)."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.2)
    job.gone = True
    if job.stream is not None:
        job.stream.stop()


class Queue:
    """Runs one generation at a time, in arrival order; counts what it served."""

    def __init__(self, engine):
        self.engine = engine
        self.lock = asyncio.Lock()  # FIFO: waiters are woken in arrival order
        self.active = None  # the TextStream now generating
        self.closing = False
        self.waiting = self.requests = self.completion_tokens = 0
        eos = engine.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.eos.add(engine.tokenizer.eos_token_id)

    def shutdown(self) -> None:
        """Refuse what is queued and stop the running generation at its next token (any thread)."""
        self.closing = True
        if self.active is not None:
            self.active.stop()

    async def pieces(self, job: Job):
        """The reply's text pieces, cut at a stop sequence; sets job.finish_reason and completion_tokens."""
        import anyio
        import torch
        self.waiting += 1
        try:
            await self.lock.acquire()
        finally:
            self.waiting -= 1
        try:
            if self.closing:
                raise ApiError(503, "the server is shutting down", "server_error")
            if job.gone:
                return
            if job.seed is not None:
                torch.manual_seed(job.seed)  # one generation at a time: the global generator is ours
            stream = self.engine.generate(job.prompt, max_new_tokens=job.max_new, stream=True, **job.kwargs)
            self.active, job.stream, self.requests = stream, stream, self.requests + 1
            cut = StopText(job.stops)
            try:
                while True:
                    # abandon_on_cancel: a disconnect cancels the wait at once; stop() below ends the thread
                    piece = await anyio.to_thread.run_sync(next, stream, None, abandon_on_cancel=True)
                    if piece is None:
                        break
                    text = cut.feed(piece)
                    if text:
                        yield text
                    if cut.hit:
                        stream.stop()
                tail = cut.flush()
                if tail:
                    yield tail
            finally:
                stream.stop()
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(stream.close)
                self.active = None
                new = stream.output_ids or []
                job.completion_tokens = len(new)
                self.completion_tokens += len(new)
            ended = cut.hit or (new and new[-1] in self.eos) or len(new) < job.max_new
            job.finish_reason = "stop" if ended else "length"
        except OffloadError as e:
            raise ApiError(400, str(e)) from None
        finally:
            self.lock.release()


def _sse(obj) -> str:
    import json
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(job: Job) -> dict:
    return {"prompt_tokens": job.n_prompt, "completion_tokens": job.completion_tokens,
            "total_tokens": job.n_prompt + job.completion_tokens}


# ---- the app ----
def make_app(engine, model_name: str, api_key: str | None = None):
    """The FastAPI app serving `engine` as `model_name`; `api_key`: required as a Bearer token on every
    route but /health."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    ChatRequest, CompletionRequest = _models()
    queue = Queue(engine)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        yield
        queue.shutdown()
        async with queue.lock:  # the running generation has ended
            engine.close()
        print("offload-serve: engine closed", file=sys.stderr)

    app = FastAPI(title="offload", lifespan=lifespan)
    app.state.queue = queue

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        err = e.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = err.get("msg", "invalid request")
        return JSONResponse(ApiError(400, f"{param}: {msg}" if param else msg, param=param).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(e.status_code, str(e.detail), kind).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        print(f"offload-serve: error: {type(e).__name__}: {e}", file=sys.stderr)
        return JSONResponse(ApiError(500, f"internal error ({type(e).__name__})", "server_error").body(),
                            status_code=500)

    def authorized(request: Request):
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key")

    auth = [Depends(authorized)]

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "offload"}]}

    @app.get("/stats", dependencies=auth)
    async def stats():
        """The engine's counters and the queue's."""
        return {"requests": queue.requests, "completion_tokens": queue.completion_tokens,
                "running": queue.active is not None, "queued": queue.waiting, "engine": engine.stats}

    async def prepare(req, prompt) -> Job:
        try:
            enc = await run_in_threadpool(engine.encode, prompt)
        except OffloadError as e:
            raise ApiError(400, str(e), param="messages" if isinstance(prompt, list) else "prompt") from None
        n_prompt, ctx = enc["input_ids"].shape[1], engine.ctx_size
        if n_prompt >= ctx:
            raise ApiError(400, f"the prompt is {n_prompt} tokens, the context {ctx} tokens: no room for a reply",
                           code="context_length_exceeded")
        limit = req.limit()
        if limit is not None and n_prompt + limit > ctx:
            raise ApiError(400, f"the prompt ({n_prompt} tokens) + max_tokens ({limit}) is longer than the "
                           f"context ({ctx} tokens)", code="context_length_exceeded")
        max_new = limit or ctx - n_prompt
        kwargs = {"min_new_tokens": min(req.min_tokens, max_new)} if req.min_tokens else {}
        if req.stop:
            kwargs["stop_strings"] = req.stop
        if req.temperature is None or req.temperature > 0:  # OpenAI's default temperature is 1
            kwargs.update(do_sample=True, temperature=req.temperature or 1.0, top_p=req.top_p or 1.0, top_k=0)
        return Job(prompt, n_prompt, max_new, req.stop or [], kwargs, req.seed)

    def head(kind: str) -> dict:
        return {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": int(time.time()), "model": model_name}

    def choice(kind: str, text: str, finish, chunk: bool) -> dict:
        if kind == "completion":
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        body = {"content": text} if chunk else {"role": "assistant", "content": text}
        return {"index": 0, "delta" if chunk else "message": body, "logprobs": None, "finish_reason": finish}

    async def respond(kind: str, req, prompt, request: Request):
        job = await prepare(req, prompt)
        top = head(kind)
        if not req.stream:
            watcher = asyncio.create_task(_watch(request, job))
            try:
                text = "".join([piece async for piece in queue.pieces(job)])
            finally:
                watcher.cancel()
            if job.gone:
                return None  # nobody to answer
            return {**top, "choices": [choice(kind, text, job.finish_reason, False)], "usage": _usage(job)}
        top["object"] += ".chunk" if kind == "chat" else ""
        usage = req.stream_options is not None and req.stream_options.include_usage

        async def events():
            try:
                if kind == "chat":
                    yield _sse({**top, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]})
                async for piece in queue.pieces(job):
                    yield _sse({**top, "choices": [choice(kind, piece, None, True)]})
                yield _sse({**top, "choices": [choice(kind, "", job.finish_reason, True)]})
                if usage:
                    yield _sse({**top, "choices": [], "usage": _usage(job)})
            except ApiError as e:  # the status line is sent already: the error goes in the stream
                yield _sse(e.body())
            except Exception as e:  # any other failure: reported in the stream, one line in the log
                print(f"offload-serve: error: {type(e).__name__}: {e}", file=sys.stderr)
                yield _sse(ApiError(500, f"internal error ({type(e).__name__})", "server_error").body())
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(req: ChatRequest, request: Request):
        return await respond("chat", req, [m.as_dict() for m in req.messages], request)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(req: CompletionRequest, request: Request):
        return await respond("completion", req, req.prompt, request)

    return app


# ---- the command ----
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="offload-serve", description="Serve an offloaded model over an "
                                "OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models). "
                                "Requests are queued: one generation at a time.")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("OFFLOAD_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: $OFFLOAD_API_KEY; "
                        "none: no auth)")
    p.add_argument("--model-name", metavar="NAME", help="the model id clients see (default: the model dir's name)")
    args = p.parse_args(argv)
    if not args.demo and not args.model_dir:
        p.error("give model_dir and weights_dir, or --demo")
    if args.api_key is not None and not args.api_key.strip():
        p.error("--api-key is empty")
    return _run_guarded("offload-serve", _serve, args)


def _port(text: str) -> int:
    port = _positive_int(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {port}")
    return port


def _check_port(host: str, port: int) -> None:
    """Fail before the (long) load if the address cannot be bound."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise OffloadError(f"cannot resolve --host {host}: {e.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise OffloadError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def _serve(args) -> int:
    import uvicorn

    _check_port(args.host, args.port)
    if args.demo:
        from .demo import GGUF_FILE
        name = args.model_name or GGUF_FILE.split(".")[0]
        args.cache = "25%" if args.cache == "auto" else args.cache
    else:
        name = args.model_name or Path(args.model_dir).resolve().name
    engine = open_engine(args)
    try:
        if engine.tokenizer is None:
            raise OffloadError(f"{engine.weights.path} has no tokenizer: offload-serve needs one to read prompts")
        print(engine.memory_plan(), file=sys.stderr)
        app = make_app(engine, name, args.api_key)
        server = _server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info"), app.state.queue)
        auth = "with an API key" if args.api_key else "without auth"
        print(f"offload-serve: {name} at http://{args.host}:{args.port}/v1 {auth}; Ctrl-C stops", file=sys.stderr)
        server.run()
    finally:
        engine.close()
    return 0


def _server(config, queue):
    """uvicorn's server; a shutdown signal also stops the running generation, so that it ends now
    instead of when its reply is complete."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            queue.shutdown()
            super().handle_exit(sig, frame)

    return Server(config)
