"""A small byte-level BPE tokenizer trained on captions, for tests and the CPU demo (no Gemma tokenizer offline).

Not part of the remote code: a trained model ships the tokenizer files it was trained with.
"""

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Fixed ids: the processor and configuration/tiny.json rely on them.
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"]


def build_caption_tokenizer(
    captions: Iterable[str], vocab_size: int = 1024, prompts: Iterable[str] = ("caption en",)
) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE on `captions` (and the prompts) with `<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3,
    `<image>`=4. It adds no BOS/EOS by itself (the processor inserts them) and `len(tokenizer) <= vocab_size`."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    minimum = len(SPECIAL_TOKENS) + len(alphabet)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least {minimum} tokens.")
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet, show_progress=False
    )
    texts = [*prompts, *captions]
    tokenizer.train_from_iterator([t + "\n" for t in texts], trainer=trainer, length=len(texts))
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == expected_id, f"{token} got id {tokenizer.token_to_id(token)}"
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        extra_special_tokens=["<image>"],
        add_bos_token=False,
        add_eos_token=False,
        padding_side="left",
    )
