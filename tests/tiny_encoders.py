"""Tiny random-weight BERT/RoBERTa encoders (MLM, sequence classification, and bare: no head), built offline.

Each builder writes an HF model directory (config, weights, tokenizer) that loads with the Auto classes, so
tests run the exporter on the same path as a real checkpoint. Tokenizers are made with the `tokenizers`
library (WordPiece for BERT, byte-level BPE for RoBERTa) over a vocabulary that covers the preset tasks.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
    RobertaModel,
)

from raee_ops.tasks import PRESETS

SIZES = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=512,
)
NUM_LABELS = 2


def _task_words() -> list[str]:
    """Every word of the preset templates and verbalizers, lower-cased: prompts tokenize into real words."""
    text = " ".join(t.template + " " + " ".join(t.verbalizer) for t in PRESETS.values())
    pre = pre_tokenizers.BertPreTokenizer()
    return sorted({w.lower() for w, _ in pre.pre_tokenize_str(text) if "{" not in w and "}" not in w})


def _bert_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    words = specials + chars + ["##" + c for c in string.ascii_lowercase + string.digits]
    words += [w for w in _task_words() if w not in words]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def _roberta_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    words = _task_words()
    corpus = [" ".join(words)] * 50 + [" " + w for w in words] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        cls_token="<s>",
        sep_token="</s>",
        mask_token=AddedToken("<mask>", lstrip=True, special=True),
    )


def _bert(model_class: type[PreTrainedModel]) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    tokenizer = _bert_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), pad_token_id=0, num_labels=NUM_LABELS, **SIZES)
    return model_class(config), tokenizer


def _roberta(model_class: type[PreTrainedModel]) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    tokenizer = _roberta_tokenizer()
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        type_vocab_size=1,
        num_labels=NUM_LABELS,
        **SIZES,
    )
    return model_class(config), tokenizer


BUILDERS: dict[str, Callable[[], tuple[PreTrainedModel, PreTrainedTokenizerFast]]] = {
    "bert-mlm": lambda: _bert(BertForMaskedLM),
    "bert-cls": lambda: _bert(BertForSequenceClassification),
    "roberta-mlm": lambda: _roberta(RobertaForMaskedLM),
    "roberta-cls": lambda: _roberta(RobertaForSequenceClassification),
    "bert-bare": lambda: _bert(BertModel),
    "roberta-bare": lambda: _roberta(RobertaModel),
}


def build_tiny_encoder(kind: str, out_dir: Path, seed: int = 0) -> Path:
    """Write the tiny `kind` model (a key of BUILDERS) with its tokenizer to `out_dir` and return it."""
    torch.manual_seed(seed)
    model, tokenizer = BUILDERS[kind]()
    model.eval().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
