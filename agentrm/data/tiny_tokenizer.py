"""A small byte-level BPE tokenizer trained offline on trajectory text.

The tiny default model cannot download a tokenizer from a hub, so the project trains
one with `tokenizers` on its own sample data and ships it in ``agentrm/assets``.
Byte-level BPE encodes any text (no unknown tokens), and the chat template marks
turns with special tokens so step ends are single tokens (``<|end|>``).

Regenerate with::

    python -m agentrm.data.tiny_tokenizer agentrm/assets/babyai_sample.jsonl agentrm/assets/tiny_tokenizer
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from agentrm.data.schema import Trajectory, iter_jsonl

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def trajectory_texts(trajectories: Iterable[Trajectory]) -> Iterable[str]:
    """Every text a trajectory contributes: instruction, actions, observations."""
    for t in trajectories:
        yield t.instruction
        for s in t.steps:
            yield s.action
            yield s.observation


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it as a HF fast tokenizer with a chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.padding_side = "right"
    return hf


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train the tiny byte-level BPE tokenizer on trajectory JSONL files.")
    p.add_argument("data", nargs="+", help="trajectory JSONL file(s)")
    p.add_argument("out", help="output directory (HF tokenizer files)")
    p.add_argument("--vocab-size", type=int, default=1024)
    a = p.parse_args(argv)
    trajs = [t for path in a.data for t in iter_jsonl(path)]
    tok = train_tiny_tokenizer(trajectory_texts(trajs), a.vocab_size)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(a.out)
    print(f"trained on {len(trajs)} trajectories; vocab {len(tok)}; saved to {a.out}")


if __name__ == "__main__":
    main()
