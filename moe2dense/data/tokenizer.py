"""Tokenizers: train a byte-level BPE for the demo, or use a real teacher's own tokenizer.

Byte-level BPE has no unknown token (any UTF-8 byte sequence encodes), so the round trip decode(encode(x)) == x
holds for every text, code included."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int, out_dir: str | Path):
    """Train a byte-level BPE on `texts` and save it as a Hugging Face tokenizer dir (AutoTokenizer loads it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                   model_max_length=1_000_000, clean_up_tokenization_spaces=False)
    fast.save_pretrained(str(out_dir))
    return fast


def load_tokenizer(path_or_id: str | Path):
    """Load a tokenizer offline (local dir, or a hub id already in the HF cache)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path_or_id), local_files_only=True)


def eos_id(tokenizer) -> int:
    """The document separator used for packing: EOS, else BOS, else PAD (some tokenizers define only one)."""
    for tid in (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id):
        if tid is not None:
            return int(tid if not isinstance(tid, list) else tid[0])
    raise ValueError("the tokenizer defines no eos, bos or pad token to separate packed documents")


def batched_encode(tokenizer, texts: list[str]) -> Iterator[list[int]]:
    """Encode without special tokens or truncation: packing adds the separators itself."""
    enc = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
    yield from enc["input_ids"]
