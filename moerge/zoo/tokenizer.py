"""A word-level tokenizer for the synthetic suite, built with ``tokenizers`` and wrapped as a
``PreTrainedTokenizerFast`` so it saves, loads and pads like any Hugging Face tokenizer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenizers import Tokenizer, models, pre_tokenizers, processors

from moerge.zoo.tasks import vocabulary

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"


def build_tokenizer(segments: bool = False) -> PreTrainedTokenizerFast:
    """One token per word of the suite (plus specials); a BOS is prepended to every input.
    ``segments``: with the segment separator ``|`` (zoos trained on two-segment prompts)."""
    vocab = {tok: i for i, tok in enumerate([PAD, UNK, BOS, EOS, *vocabulary(segments)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS)
    tok.padding_side = "left"  # decoder-only generation pads on the left
    return tok
