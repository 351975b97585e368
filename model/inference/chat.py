"""Chat formats: messages -> token ids, and which of them are the assistant's.

Serving renders a conversation's prompt with `prompt_ids`; supervised fine-tuning renders whole
conversations with `segments` and trains only on the assistant's tokens. Both go through the
same format, so a model is served exactly the way it was tuned.

  PalmaxChat  tokenizers without a template (palmax's own): every message is '<|role|>\\n' +
              content; user, system and tool messages end in '\\n', an assistant message ends in
              the end-of-sequence token (a special token: what generation stops at). The reply
              prompt is '<|assistant|>\\n'. The conversation opens on the document start.
  JinjaChat   a checkpoint's own `chat_template` (HF tokenizer_config.json), rendered in jinja2's
              sandbox as `transformers` does; the ids are the tokenizer's encoding of the whole
              rendered text, which is what `apply_chat_template(..., tokenize=True)` returns. An
              assistant message's tokens are those between the render of the conversation before
              it (with the generation prompt) and the render up to its end (its end-of-turn
              token included).
"""
from __future__ import annotations

from typing import Sequence

ROLES = ('system', 'user', 'assistant', 'tool')
Segments = list[tuple[list[int], bool]]   # (token ids, trained?) in order


def check_messages(messages, where: str = 'messages') -> None:
  """One line naming the message and what was expected."""
  if not isinstance(messages, list) or not messages:
    raise ValueError(f'{where}: expected a non-empty list of {{"role", "content"}} messages')
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or m.get('role') not in ROLES:
      raise ValueError(f'{where}[{i}]: role must be one of {ROLES}, got '
                       f'{m.get("role") if isinstance(m, dict) else m!r}')
    if not isinstance(m.get('content'), str) or not m['content'].strip():
      raise ValueError(f'{where}[{i}] ({m["role"]}): content must be a non-empty string')


class PalmaxChat:
  """The documented palmax format (module docstring)."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def segments(self, messages: Sequence[dict]) -> Segments:
    tok = self.tokenizer
    out: Segments = [([tok.doc_start_id], False)]
    for m in messages:
      if m['role'] == 'assistant':
        out.append((tok.encode('<|assistant|>\n'), False))
        out.append((tok.encode(m['content']) + [tok.eos_id], True))
      else:
        out.append((tok.encode(f'<|{m["role"]}|>\n{m["content"]}\n'), False))
    return out

  def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
    """The conversation so far, then the reply header."""
    ids = [t for seg, _ in self.segments(messages) for t in seg]
    return ids + self.tokenizer.encode('<|assistant|>\n')


class JinjaChat:
  """A checkpoint's jinja chat template (module docstring)."""

  def __init__(self, source: str, tokenizer, bos_token: str = '', eos_token: str = ''):
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    self._template = env.from_string(source)
    self.tokenizer, self.bos_token, self.eos_token = tokenizer, bos_token, eos_token

  def render(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    return self._template.render(messages=list(messages),
                                 add_generation_prompt=add_generation_prompt,
                                 bos_token=self.bos_token, eos_token=self.eos_token)

  def segments(self, messages: Sequence[dict]) -> Segments:
    full = self.render(messages, False)
    ids = self.tokenizer.encode(full)
    cuts = [0]
    for i, m in enumerate(messages):
      if m['role'] != 'assistant':
        continue
      before = self.render(messages[:i], True) if i else ''
      upto = self.render(messages[:i + 1], False)
      if not (full.startswith(before) and full.startswith(upto)):
        raise ValueError(f'messages[{i}]: the chat template does not render the conversation '
                         'so far as a prefix of the whole; assistant tokens cannot be located')
      cuts += [self._token_boundary(full, ids, len(before), i),
               self._token_boundary(full, ids, len(upto), i)]
    cuts.append(len(ids))
    return [(ids[a:b], k % 2 == 1) for k, (a, b) in enumerate(zip(cuts, cuts[1:])) if b > a]

  def _token_boundary(self, full: str, ids: list[int], char: int, i: int) -> int:
    """The token index where the text's first `char` characters end (they must end on a token
    boundary of the whole encoding)."""
    head = self.tokenizer.encode(full[:char]) if char else []
    if ids[:len(head)] != head:
      raise ValueError(f'messages[{i}]: the template puts an assistant turn boundary inside a '
                       'token of the rendered text; its tokens cannot be separated')
    return len(head)

  def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
    return self.tokenizer.encode(self.render(messages, True))
