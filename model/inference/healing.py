"""Token healing: prompts that end mid-token continue as they would have in training.

A prompt cut at whitespace usually ends inside a piece the tokenizer would have merged with the
text that follows. palmax's tokenizer (train/tokenizer.py) makes a newline plus its indentation
one symbol that BPE merges with neighbouring text, so in `def fibonacci(n):\\n` the final bare
'\\n' piece was rare in training (there the newline came as '\\n    ' or '\\n    return ...'), and
the model continues on the signature's line. Healing backs off the last prompt token and lets
the first sampled token be any piece whose text starts with the removed text ('\\n', '\\n    ',
'\\n    return', ...), so the model itself chooses how the whitespace continues.

Use: `healed = healer.heal(prompt_ids)`; prefill `healed.ids`; constrain the first sampled token
to `healed.allowed_V` (processors.sample_next's `allowed_BV` row; later tokens unconstrained);
then the first generated token's text starts with `healed.removed_text`, and the ENGINE MUST
STRIP `removed_text` FROM THE FRONT OF THE COMPLETION it returns (`healed.strip`), so that
prompt + completion reads as the original prompt continued exactly.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

WHITESPACE = ' \t\r\n'   # A prompt ending in one of these is healed.
_BYTE_PIECE = re.compile(r'<0x[0-9A-Fa-f]{2}>')


@dataclasses.dataclass(frozen=True)
class Healed:
  """A prompt after healing. ids: the prompt to prefill (the original without its last token
  when healed); allowed_V: bool [V], the ids the first sampled token may be (None = any; shared
  and read-only: copy before changing it); removed_text: the removed token's text ('' when not
  healed), which the first generated token's text starts with."""
  ids: list[int]
  allowed_V: np.ndarray | None
  removed_text: str

  def strip(self, completion: str) -> str:
    """The completion to return to the caller: `completion` (the decoded generated tokens,
    or the first token's text when streaming) without the leading `removed_text`."""
    if not completion.startswith(self.removed_text):
      raise ValueError(f'completion {completion[:40]!r} does not start with the healed text '
                       f'{self.removed_text!r}: was the first token constrained to allowed_V?')
    return completion[len(self.removed_text):]


class TokenHealer:
  """Heals prompts for one tokenizer (palmax's `Tokenizer` or `HFTokenizer`: `decode`,
  `vocab_size`, `id_to_piece`). Each id's text is decoded once here; the allowed mask for a
  removed id is built on first use (a pass over the vocabulary) and cached."""

  def __init__(self, tokenizer, vocab_size: int | None = None):
    """vocab_size: the length of `allowed_V` (the model's logits, which may be padded beyond the
    tokenizer's vocabulary; extra ids are never allowed). Default: tokenizer.vocab_size."""
    n = tokenizer.vocab_size
    if vocab_size is not None and vocab_size < n:
      raise ValueError(f'vocab_size={vocab_size} must be >= the tokenizer vocab_size ({n})')
    self.tokenizer = tokenizer
    self.vocab_size = vocab_size or n
    self.texts = [tokenizer.decode([i]) for i in range(n)]
    piece = getattr(tokenizer, 'id_to_piece', None)
    special = {getattr(tokenizer, name, None) for name in ('unk_id', 'eos_id', 'bos_id')}
    # Candidates: ids with text that are neither special (unk decodes to ' \u2047 ') nor lone
    # byte-fallback pieces (used only for characters outside the vocabulary: '<0x0A>' is never
    # how '\n' was trained).
    self._candidate = [bool(t) and i not in special and
                       not (piece and _BYTE_PIECE.fullmatch(piece(i)))
                       for i, t in enumerate(self.texts)]
    self._masks: dict[int, np.ndarray] = {}

  def allowed(self, token_id: int) -> np.ndarray:
    """bool [vocab_size]: candidate ids whose text starts with `token_id`'s text, plus
    `token_id` itself (read-only, cached)."""
    mask = self._masks.get(token_id)
    if mask is None:
      prefix = self.texts[token_id]
      mask = np.zeros(self.vocab_size, bool)
      mask[:len(self.texts)] = [c and t.startswith(prefix)
                                for c, t in zip(self._candidate, self.texts)]
      mask[token_id] = True
      mask.setflags(write=False)
      self._masks[token_id] = mask
    return mask

  def heal(self, prompt_ids: list[int]) -> Healed:
    """Backs off the last token when the prompt has >= 2 tokens and its text ends with
    whitespace (WHITESPACE); otherwise returns the ids unchanged, allowed_V None and
    removed_text ''. Not healed either when the last token's own text is not what it adds to
    the decoded prompt (a piece of a multi-token character, or a tokenizer whose single-token
    decode differs, e.g. one that drops a leading space), since then no first token could
    restore the text exactly. Invariant: decode(ids) + removed_text == decode(prompt_ids)."""
    ids = [int(i) for i in prompt_ids]
    unchanged = Healed(ids, None, '')
    if len(ids) < 2:
      return unchanged
    text = self.tokenizer.decode(ids)
    if not text or text[-1] not in WHITESPACE:
      return unchanged
    last = ids[-1]
    removed = self.texts[last]
    if not removed or self.tokenizer.decode(ids[:-1]) + removed != text:
      return unchanged
    return Healed(ids[:-1], self.allowed(last), removed)
