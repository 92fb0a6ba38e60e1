"""Token ids to text deltas, with stop strings that never leak into the output."""
from __future__ import annotations


class IncrementalText:
    """Feeds generated ids in, hands text out as soon as it is final.

    Text is held back while it ends in an incomplete UTF-8 sequence or in a prefix of a stop
    string, so a streamed response never shows text that the non-streamed one would not.
    """

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        # Decode only a short window of recent ids per token (as vLLM and TextStreamer do):
        # ids[prefix:read] were already turned into text; decoding from `prefix` keeps the
        # tokenizer's context for spaces and multi-byte characters.
        self._prefix = 0
        self._read = 0
        self.text = ""
        self.emitted = 0  # characters of self.text already handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became final. Sets `stopped` on a stop string."""
        self.ids.append(token_id)
        if not self._advance(final=False):
            return ""  # an incomplete multi-byte character: wait for the next token
        start = max(0, self.emitted - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._emit_to(min(hits))
        return self._emit_to(len(self.text) - self._held_back())

    def finish(self) -> str:
        """At the end (EOS or length): whatever is still held back."""
        if self.stopped:
            return ""
        self._advance(final=True)
        return self._emit_to(len(self.text))

    def _advance(self, final: bool) -> bool:
        """Turn ids not yet read into text; unless final, not while they end mid-character."""
        if self._read == len(self.ids):
            return True
        seen = self.tokenizer.decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        window = self.tokenizer.decode(self.ids[self._prefix:], skip_special_tokens=True)
        if window.endswith("\ufffd") and not final:
            return False
        self.text += window[len(seen):]
        self._prefix, self._read = self._read, len(self.ids)
        return True

    def _held_back(self) -> int:
        for n in range(min(max((len(s) for s in self.stop), default=0), len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def _emit_to(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted:end]
        self.emitted = end
        return out

    @property
    def output(self) -> str:
        return self.text[: self.emitted]
