"""A byte-level tokenizer for the embedded demo model (no files, no downloads).

Ids 0-255 are UTF-8 bytes; then BOS, EOS, PAD. It mirrors the small part of the
transformers tokenizer API the library uses: encode(text, add_special_tokens) and decode(ids).
"""

from __future__ import annotations


class ByteTokenizer:
    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258
    vocab_size = 259

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")
