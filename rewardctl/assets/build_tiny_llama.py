"""Builds the bundled ``tiny-llama`` asset: a model config and a byte-level BPE tokenizer. No weights:
``model=tiny`` initialises them randomly (``model.from_scratch=true``), which is what makes the
embedded default run offline.

    python -m rewardctl.assets.build_tiny_llama    # rewrites rewardctl/assets/tiny-llama/

The tokenizer is byte-level, so it encodes any text (other languages fall back to bytes), with 1,024
BPE merges learned from the sample world's vocabulary so that the sample sentences take few tokens.
Special tokens: <|pad|> (distinct from EOS), <|endoftext|> (EOS) and ChatML's <|im_start|>/<|im_end|>.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

from rewardctl.samples import world

ASSET_DIR = Path(__file__).resolve().parent / "tiny-llama"
SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 1024
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GENERIC = (
    "User: Assistant: system user assistant The a an and or but if then so because of to in on at for with "
    "from by about as is are was were be been it this that these those you your I we they he she my our "
    "what which who how why when where can could should would will do does did not no yes please thank "
    "thanks step answer question first second next finally total equals plus minus times 0 1 2 3 4 5 6 7 8 9 "
    "10 100 . , ! ? : ; ' \" ( ) - + = * /"
)


def corpus() -> list[str]:
    texts = [GENERIC]
    for topic in world.TOPICS:
        texts += [*topic.train_questions, *topic.eval_questions, *topic.advice, topic.subject]
    for country, city in world.CAPITALS:
        texts += [q.format(country=country) for q in (*world.CAPITAL_QUESTIONS_TRAIN, *world.CAPITAL_QUESTIONS_EVAL)]
        texts += [a.format(country=country, city=city) for a in world.CAPITAL_ANSWERS]
    for animal, legs in world.LEGS:
        texts += [q.format(animal=animal) for q in (*world.LEG_QUESTIONS_TRAIN, *world.LEG_QUESTIONS_EVAL)]
        texts += [a.format(animal=animal, n=world.NUMBER_WORDS[legs]) for a in world.LEG_ANSWERS]
    texts += [
        *world.OPENERS,
        *world.CLOSERS,
        *world.RUDE_OPENERS,
        *world.RUDE_ENDINGS,
        *world.RUDE_EVAL_ONLY,
        *world.EVASIVE_PARTS,
        *world.EVASIVE_EVAL_ONLY,
    ]
    return [t for t in texts if t]


def build_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus() * 4, trainer)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        model_max_length=512,
        padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        architectures=["LlamaForCausalLM"],
    )


def main() -> None:
    ASSET_DIR.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(str(ASSET_DIR))
    build_config(tokenizer).save_pretrained(str(ASSET_DIR))
    print(f"wrote {ASSET_DIR}: vocabulary {len(tokenizer)}")


if __name__ == "__main__":
    main()
