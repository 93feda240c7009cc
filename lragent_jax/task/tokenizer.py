"""A byte-level BPE tokenizer for the task, trained with the `tokenizers` library and saved as
an ordinary HF tokenizer folder (tokenizer.json + tokenizer_config.json), so that
`lragent_jax.loading.load_tokenizer(folder)` loads it like any other.

    tok_dir = train_tokenizer(base_corpus(world) + [render(s) for s in gold_episodes(world, "train")],
                              "out/tokenizer", vocab_size=2048)
    tok = load_tokenizer(tok_dir)
    ids, roles = encode_segments(tok, gold_segments(world, question))

Digits are split one per token (numbers are copied, never merged into odd chunks), and
encoding adds BOS like Llama tokenizers do.
"""

from __future__ import annotations

import json
import os

import numpy as np

from .episodes import AGENT_ROLES, ROLES

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (BOS, EOS, PAD)  # ids 0, 1, 2


def train_tokenizer(texts, folder: str, *, vocab_size: int = 2048, model_max_length: int = 4096) -> str:
    """Train BPE on `texts` (an iterable of str), save it under `folder`, return the folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if not 300 <= vocab_size <= 65536:
        raise ValueError(f"vocab_size must be in [300, 65536] (256 bytes + specials + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return folder


def newline_id(tokenizer) -> int:
    """The id of "\\n" (one token by construction of the pre-tokenizer); the loop's turn stop."""
    ids = tokenizer.encode("\n", add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"this tokenizer splits a newline into {len(ids)} tokens ({ids}); the loop needs one")
    return int(ids[0])


def encode_segments(tokenizer, segments, *, add_bos: bool = True, add_eos: bool = True):
    """Token ids of a trajectory and each token's role index (into episodes.ROLES; -1 for BOS / EOS).

    Each segment is encoded on its own, as the loop appends and the agents generate them. A
    trainer masks the loss of agent r to the tokens where roles == ROLES.index(r)."""
    ids, roles = [], []
    if add_bos:
        ids.append(tokenizer.bos_token_id)
        roles.append(-1)
    for role, text in segments:
        if role not in ROLES:
            raise ValueError(f"unknown segment role {role!r}; roles: {ROLES}")
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        roles += [ROLES.index(role)] * len(piece)
    if add_eos:
        ids.append(tokenizer.eos_token_id)
        roles.append(-1)
    return np.asarray(ids, np.int32), np.asarray(roles, np.int8)


def encode_episodes(tokenizer, episodes, *, add_bos: bool = True, add_eos: bool = True) -> list:
    """[(ids, roles), ...] of many trajectories, equal to encode_segments on each, but every
    segment of every episode goes through the tokenizer in one batch (the Rust tokenizer then
    runs on all cores): tens of thousands of episodes in seconds, not minutes."""
    texts, owners = [], []
    for segs in episodes:
        for role, text in segs:
            if role not in ROLES:
                raise ValueError(f"unknown segment role {role!r}; roles: {ROLES}")
            texts.append(text)
            owners.append(ROLES.index(role))
    pieces = _encode_batch(tokenizer, texts)
    lengths = np.fromiter((len(p) for p in pieces), np.int64, len(pieces))
    flat = np.fromiter((t for p in pieces for t in p), np.int32, int(lengths.sum()))
    flat_roles = np.repeat(np.asarray(owners, np.int8), lengths)
    head = np.asarray([tokenizer.bos_token_id] if add_bos else [], np.int32)
    tail = np.asarray([tokenizer.eos_token_id] if add_eos else [], np.int32)
    head_r, tail_r = np.full(len(head), -1, np.int8), np.full(len(tail), -1, np.int8)
    out, k, pos = [], 0, 0
    for segs in episodes:
        n = int(lengths[k:k + len(segs)].sum())
        out.append((np.concatenate([head, flat[pos:pos + n], tail]),
                    np.concatenate([head_r, flat_roles[pos:pos + n], tail_r])))
        k, pos = k + len(segs), pos + n
    return out


def _encode_batch(tokenizer, texts) -> list:
    """Token id lists of texts without special tokens, through the Rust tokenizer's
    encode_batch when the tokenizer has one (a transformers fast tokenizer does)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        out = []
        for lo in range(0, len(texts), 16384):  # chunks: an Encoding weighs far more than its ids
            out += [e.ids for e in backend.encode_batch(texts[lo:lo + 16384], add_special_tokens=False)]
        return out
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def examples_by_role(tokenizer, episodes, roles=AGENT_ROLES) -> dict:
    """{role: [(ids [T] int32, loss_mask [T] bool), ...]}: every episode (a segment list) once per
    role, its mask True on the tokens that role wrote (the targets of that role's adapter)."""
    out = {r: [] for r in roles}
    for ids, token_roles in encode_episodes(tokenizer, episodes):
        for r in roles:
            out[r].append((ids, token_roles == ROLES.index(r)))
    return out
