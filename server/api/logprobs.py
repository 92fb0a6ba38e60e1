"""Log-probabilities in OpenAI's two response shapes, from the engine's [token id, logprob, top] entries.

Chat: `choices[].logprobs.content` = [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}].
Completions (legacy): `choices[].logprobs` = {tokens, token_logprobs, top_logprobs, text_offset}, where
`top_logprobs` maps token text -> logprob (the k most likely and the chosen token, as vLLM gives them).
"""
from __future__ import annotations

from functools import lru_cache



def byte_chars() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte -> the printable character that stands for it in tokens."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, shifted = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return chars


_BYTE_OF = {c: b for b, c in byte_chars().items()}


class TokenText:
    """A token id's bytes and text. Byte-level BPE tokens (GPT-2, Llama 3, SmolLM) are mapped back to
    their exact bytes; others are decoded alone. A token that is part of a UTF-8 character has
    bytes that do not decode by themselves; its text is then `bytes:\\xNN...` (as OpenAI writes it),
    so distinct tokens keep distinct texts."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special = set(tokenizer.all_special_ids)  # not part of the returned text
        self.lookup = lru_cache(maxsize=65536)(self._lookup)

    def _lookup(self, token_id: int) -> tuple[str, list[int]]:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and piece and all(c in _BYTE_OF for c in piece) \
                and token_id not in self.special:
            raw = bytes(_BYTE_OF[c] for c in piece)
        else:
            raw = self.tokenizer.decode([token_id]).encode("utf-8")
        try:
            return raw.decode("utf-8"), list(raw)
        except UnicodeDecodeError:  # part of a character: named by its bytes, as OpenAI does
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)


def chat_content(entries: list, text: TokenText) -> list[dict]:
    out = []
    for token, lp, top in entries:
        s, raw = text.lookup(token)
        alts = []
        for alt, alt_lp in top:
            a, a_raw = text.lookup(alt)
            alts.append({"token": a, "logprob": alt_lp, "bytes": a_raw})
        out.append({"token": s, "logprob": lp, "bytes": raw, "top_logprobs": alts})
    return out


class Legacy:
    """The completions shape, grown event by event. `text_offset` is each token's offset in characters
    of the returned text (the prompt's too, with echo): counted on the decoded bytes so far, so a token
    that is part of a character or a special token (not in the text) moves it by what the text shows."""

    def __init__(self, text: TokenText, offset: int = 0, raw: bytes = b""):
        self.text = text
        self.base, self.raw = offset, bytearray(raw)
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []

    @property
    def offset(self) -> int:
        return self.base + len(self.raw.decode("utf-8", errors="ignore"))

    def add(self, entries: list) -> Legacy:
        for token, lp, top in entries:
            s, raw = self.text.lookup(token)
            self.tokens.append(s)
            self.token_logprobs.append(lp)
            if lp is None:  # the prompt's first token: nothing before it to condition on
                self.top_logprobs.append(None)
            else:
                alts = {self.text.lookup(alt)[0]: alt_lp for alt, alt_lp in top}
                alts.setdefault(s, lp)
                self.top_logprobs.append(alts)
            self.text_offset.append(self.offset)
            if token not in self.text.special:
                self.raw += bytes(raw)
        return self

    def body(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset}
