"""An OpenAI-compatible HTTP API over a Completer (Starlette on uvicorn: a well-kept ASGI stack
instead of hand-written HTTP, server-sent events included).

Routes: POST /v1/completions, POST /v1/chat/completions (both stream with `stream: true`),
GET /v1/models, GET /health, GET /metrics (Prometheus text). Errors are OpenAI-shaped,
{"error": {"message", "type", "param", "code"}}, with status 400 (bad value), 401 (API key),
404 (unknown model or route), 413 (prompt longer than the context), 429 (queue full). A client
that disconnects cancels its sequences at once (slots and pages freed on the next step).
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from model.inference import serve_metrics
from model.inference.completion import BadRequest, Completer, CompletionParams, Delta
from model.inference.engine import QueueFull

MAX_BODY_BYTES = 4 << 20


def error(status: int, message: str, param: str | None = None, code: str | None = None):
  kind = {401: 'authentication_error', 404: 'not_found_error', 429: 'rate_limit_error'}.get(
      status, 'invalid_request_error')
  return JSONResponse({'error': {'message': message, 'type': kind, 'param': param,
                                 'code': code}}, status_code=status)


def _logprobs_completion(tokens, offset0: int):
  out = {'tokens': [], 'token_logprobs': [], 'top_logprobs': [], 'text_offset': []}
  offset = offset0
  for t in tokens:
    out['tokens'].append(t.text)
    out['token_logprobs'].append(t.logprob)
    top: dict[str, float] = {}
    for _, text, lp in t.top:  # Ids sharing a text (byte pieces): keep the likeliest's value.
      top.setdefault(text, lp)
    out['top_logprobs'].append(top)
    out['text_offset'].append(offset)
    offset += len(t.text)
  return out


def _logprobs_chat(tokens):
  entry = lambda text, lp: {'token': text, 'logprob': lp, 'bytes': list(text.encode())}
  return {'content': [dict(entry(t.text, t.logprob),
                           top_logprobs=[entry(text, lp) for _, text, lp in t.top])
                      for t in tokens]}


class OpenAIServer:
  """`OpenAIServer(completer, model_name, api_key=None).app` is the ASGI app."""

  def __init__(self, completer: Completer, model_name: str, api_key: str | None = None,
               metrics: serve_metrics.ServeMetrics | None = None):
    self.completer, self.model_name, self.api_key = completer, model_name, api_key
    self.engine = completer.engine
    self.metrics = metrics or serve_metrics.ServeMetrics(self.engine)
    self.created = int(time.time())
    self.app = Starlette(routes=[
        Route('/health', self.health),
        Route('/metrics', self.prometheus),
        Route('/v1/models', self.models),
        Route('/v1/completions', self.completions, methods=['POST']),
        Route('/v1/chat/completions', self.chat, methods=['POST']),
    ], exception_handlers={404: lambda r, e: error(404, f'no route {r.url.path}'),
                           405: lambda r, e: error(405, f'{r.method} not allowed on {r.url.path}')})

  # -- plain routes -----------------------------------------------------------------------------

  async def health(self, request: Request):
    return JSONResponse({'status': 'ok', **self.engine.stats()})

  async def prometheus(self, request: Request):
    return PlainTextResponse(self.metrics.render(), media_type=serve_metrics.CONTENT_TYPE)

  async def models(self, request: Request):
    if (denied := self._auth(request)) is not None:
      return denied
    return JSONResponse({'object': 'list', 'data': [
        {'id': self.model_name, 'object': 'model', 'created': self.created, 'owned_by': 'palmax'}]})

  # -- generation -------------------------------------------------------------------------------

  async def completions(self, request: Request):
    return await self._generate(request, chat=False)

  async def chat(self, request: Request):
    return await self._generate(request, chat=True)

  def _auth(self, request: Request):
    if self.api_key and request.headers.get('authorization') != f'Bearer {self.api_key}':
      return error(401, 'missing or wrong API key (Authorization: Bearer ...)', code='invalid_api_key')
    return None

  async def _body(self, request: Request) -> dict:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
      raise BadRequest(f'request body of {len(raw)} bytes exceeds {MAX_BODY_BYTES}', None, 413)
    try:
      body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise BadRequest(f'request body is not valid JSON: {e}') from None
    if not isinstance(body, dict):
      raise BadRequest('request body must be a JSON object')
    model = body.get('model')
    if not isinstance(model, str):
      raise BadRequest('model must be a string', 'model')
    if model != self.model_name:
      raise BadRequest(f'model {model!r} does not exist; this server has {self.model_name!r}',
                       'model', 404)
    return body

  async def _generate(self, request: Request, chat: bool):
    if (denied := self._auth(request)) is not None:
      return denied
    try:
      body = await self._body(request)
      if chat:
        prompts = [self.completer.render_chat(body.get('messages'))]
      else:
        p = body.get('prompt')
        prompts = p if isinstance(p, list) and p and all(isinstance(x, str) for x in p) else [p]
      if 'max_completion_tokens' in body and 'max_tokens' not in body:
        body['max_tokens'] = body['max_completion_tokens']
      cfg = self.engine.cfg
      params = CompletionParams.from_dict(body, max_n=cfg.max_n, max_logprobs=cfg.max_top_logprobs)
      stream = body.get('stream', False)
      if not isinstance(stream, bool):
        raise BadRequest(f'stream must be true or false, got {stream!r}', 'stream')
      if not isinstance(body.get('stream_options') or {}, dict):
        raise BadRequest('stream_options must be an object', 'stream_options')
      if stream and params.best_of not in (None, params.n):
        raise BadRequest('stream cannot be used with best_of > n', 'best_of')
      if chat and params.logprobs is not None and not body.get('logprobs'):
        params.logprobs = None
      loop = asyncio.get_running_loop()
      queue: asyncio.Queue = asyncio.Queue()
      sink = lambda d, k=None: loop.call_soon_threadsafe(queue.put_nowait, (k, d))
      runs = []
      try:
        for k, prompt in enumerate(prompts):
          runs.append(self.completer.start(prompt, params, lambda d, k=k: sink(d, k)))
      except BaseException:
        for r in runs:
          r.cancel()
        raise
    except BadRequest as e:
      self.metrics.requests.labels(str(e.status)).inc()
      return error(e.status, str(e), e.param)
    except QueueFull as e:
      self.metrics.requests.labels('429').inc()
      return error(429, str(e), code='queue_full')
    rid = ('chatcmpl-' if chat else 'cmpl-') + uuid.uuid4().hex[:24]
    prompt_tokens = sum(len(r.prompt_ids) for r in runs)
    if stream:
      include_usage = bool((body.get('stream_options') or {}).get('include_usage'))
      return StreamingResponse(self._sse(rid, runs, queue, params, chat, prompt_tokens,
                                         include_usage), media_type='text/event-stream')
    return await self._whole(request, rid, runs, params, chat, prompt_tokens)

  async def _whole(self, request, rid, runs, params, chat, prompt_tokens):
    try:
      while not all(r.done.is_set() for r in runs):
        await asyncio.sleep(0.01)
        if await _disconnected(request):
          for r in runs:
            r.cancel()
          self.metrics.requests.labels('499').inc()
          return PlainTextResponse('', status_code=499)
    except asyncio.CancelledError:
      for r in runs:
        r.cancel()
      raise
    choices, used = [], 0
    for k, r in enumerate(runs):
      for c in r.choices(0):
        used += len(c.token_ids)
        index = k * params.n + c.index
        finish = 'stop' if c.finish == 'stop' else 'length' if c.finish == 'length' else c.finish
        if chat:
          choices.append({'index': index, 'message': {'role': 'assistant', 'content': c.text},
                          'logprobs': _logprobs_chat(c.tokens) if params.logprobs is not None
                          else None, 'finish_reason': finish})
        else:
          choices.append({'index': index, 'text': c.text, 'finish_reason': finish,
                          'logprobs': _logprobs_completion(c.tokens, 0)
                          if params.logprobs is not None else None})
    self.metrics.requests.labels('200').inc()
    return JSONResponse({
        'id': rid, 'object': 'chat.completion' if chat else 'text_completion',
        'created': int(time.time()), 'model': self.model_name, 'choices': choices,
        'usage': {'prompt_tokens': prompt_tokens, 'completion_tokens': used,
                  'total_tokens': prompt_tokens + used}})

  async def _sse(self, rid, runs, queue, params, chat, prompt_tokens, include_usage):
    created, left, used = int(time.time()), sum(len(r.streams) for r in runs), 0
    offsets: dict[int, int] = {}
    obj = 'chat.completion.chunk' if chat else 'text_completion'
    chunk = lambda choice: 'data: ' + json.dumps({'id': rid, 'object': obj, 'created': created,
                                                  'model': self.model_name,
                                                  'choices': [choice]}) + '\n\n'
    try:
      if chat:
        for i in range(len(runs) * params.n):
          yield chunk({'index': i, 'delta': {'role': 'assistant', 'content': ''},
                       'logprobs': None, 'finish_reason': None})
      while left:
        k, d = await queue.get()
        d: Delta
        index = k * params.n + d.index
        used += len(d.tokens) if params.logprobs is not None else 0
        if d.finish is not None:
          left -= 1
        if not d.text and not d.tokens and d.finish is None:
          continue
        if chat:
          yield chunk({'index': index, 'delta': {'content': d.text} if d.text else {},
                       'logprobs': _logprobs_chat(d.tokens) if params.logprobs is not None
                       else None, 'finish_reason': d.finish})
        else:
          lp = None
          if params.logprobs is not None:
            lp = _logprobs_completion(d.tokens, offsets.get(index, 0))
            offsets[index] = offsets.get(index, 0) + sum(len(t.text) for t in d.tokens)
          yield chunk({'index': index, 'text': d.text, 'logprobs': lp,
                       'finish_reason': d.finish})
      if include_usage:
        used = sum(len(s.ids) for r in runs for s in r.streams)
        yield 'data: ' + json.dumps({'id': rid, 'object': obj, 'created': created,
                                     'model': self.model_name, 'choices': [],
                                     'usage': {'prompt_tokens': prompt_tokens,
                                               'completion_tokens': used,
                                               'total_tokens': prompt_tokens + used}}) + '\n\n'
      yield 'data: [DONE]\n\n'
      self.metrics.requests.labels('200').inc()
    finally:  # Disconnect (the task is cancelled) or done: free anything still running.
      for r in runs:
        if not r.done.is_set():
          r.cancel()
          self.metrics.requests.labels('499').inc()


async def _disconnected(request: Request) -> bool:
  try:
    return await asyncio.wait_for(request.is_disconnected(), 0.001)
  except asyncio.TimeoutError:
    return False
