"""Encoder adapters in torch: chained segments reproduce the HF model layer by layer, padded or not, and the
heads reproduce its logits."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from raee_ops.onnx_export.adapters.base import ArchitectureAdapter
from raee_ops.onnx_export.adapters.bert import BertMaskedLMAdapter, BertSequenceClassificationAdapter
from raee_ops.onnx_export.adapters.roberta import RobertaMaskedLMAdapter, RobertaSequenceClassificationAdapter
from tiny_encoders import build_tiny_encoder
from transformers import AutoTokenizer

from raee_ops.errors import RaeeConfigError
from raee_ops.tasks import PRESETS

ADAPTERS: dict[str, type[ArchitectureAdapter]] = {
    "bert-mlm": BertMaskedLMAdapter,
    "bert-cls": BertSequenceClassificationAdapter,
    "roberta-mlm": RobertaMaskedLMAdapter,
    "roberta-cls": RobertaSequenceClassificationAdapter,
}
TEXTS = ["a great movie", "the plot was dull and the acting was worse than i expected"]
ATOL = 1e-5


def load_adapter(kind: str, directory: Path) -> ArchitectureAdapter:
    adapter_class = ADAPTERS[kind]
    model = adapter_class.auto_class.from_pretrained(directory, attn_implementation="eager")
    return adapter_class(model, AutoTokenizer.from_pretrained(directory))


@pytest.fixture(scope="module", params=list(ADAPTERS))
def adapter(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ArchitectureAdapter:
    return load_adapter(request.param, build_tiny_encoder(request.param, tmp_path_factory.mktemp(request.param)))


def encode(adapter: ArchitectureAdapter, texts: list[str]) -> dict[str, torch.Tensor]:
    prompts = [PRESETS["sst2"].render(t, suffix=adapter.prompt_suffix) for t in texts]
    return dict(adapter.tokenizer(prompts, padding=True, return_tensors="pt"))


def chained(adapter: ArchitectureAdapter, input_ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Embedding output then every layer's output, computed segment by segment."""
    states = [adapter.embed_segment()(input_ids, mask)]
    for index in range(adapter.num_layers):
        states.append(adapter.layer_segment(index)(states[-1], mask))
    return states


def readout_positions(adapter: ArchitectureAdapter, input_ids: torch.Tensor) -> torch.Tensor:
    if adapter.readout == "mask":
        return (input_ids == adapter.tokenizer.mask_token_id).int().argmax(dim=1)
    return torch.zeros(input_ids.shape[0], dtype=torch.long)


def label_ids(adapter: ArchitectureAdapter) -> list[int]:
    words = PRESETS["sst2"].verbalizer
    return [adapter.tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in words]


def test_adapter_matches_its_config(adapter: ArchitectureAdapter) -> None:
    assert type(adapter).matches(adapter.model.config)
    others = [a for a in ADAPTERS.values() if a is not type(adapter)]
    assert not any(a.matches(adapter.model.config) for a in others)


@torch.no_grad()
def test_segments_equal_hf_hidden_states_with_padding(adapter: ArchitectureAdapter) -> None:
    batch = encode(adapter, TEXTS)
    mask = batch["attention_mask"]
    assert (mask == 0).any(), "the batch should contain a right-padded row"
    reference = adapter.model(**batch, output_hidden_states=True).hidden_states
    ours = chained(adapter, batch["input_ids"], mask)
    assert len(ours) == len(reference) == adapter.num_layers + 1
    for index, (got, want) in enumerate(zip(ours, reference, strict=True)):
        real = mask.bool()
        torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0, msg=f"hidden state {index}")


@torch.no_grad()
def test_padded_row_equals_row_alone(adapter: ArchitectureAdapter) -> None:
    padded = encode(adapter, TEXTS)
    alone = encode(adapter, TEXTS[:1])
    length = alone["input_ids"].shape[1]
    got = chained(adapter, padded["input_ids"], padded["attention_mask"])[-1][0, :length]
    want = chained(adapter, alone["input_ids"], alone["attention_mask"])[-1][0]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@torch.no_grad()
def test_head_equals_hf_logits(adapter: ArchitectureAdapter) -> None:
    batch = encode(adapter, TEXTS)
    output = adapter.model(**batch, output_hidden_states=True)
    rows, positions = torch.arange(len(TEXTS)), readout_positions(adapter, batch["input_ids"])
    ids = label_ids(adapter)
    logits = adapter.head_segment(ids)(output.hidden_states[-1][rows, positions])
    if adapter.head_kind == "masked-lm":
        want = output.logits[rows, positions][:, ids]
    else:
        want = output.logits
    assert logits.shape == (len(TEXTS), len(ids))
    torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)


def test_classifier_refuses_other_label_counts(adapter: ArchitectureAdapter) -> None:
    if adapter.head_kind != "sequence-classification":
        pytest.skip("only fine-tuned classifiers have a fixed label count")
    with pytest.raises(RaeeConfigError, match="3 labels"):
        adapter.head_segment([5, 6, 7])


def test_masked_lm_prompt_ends_in_mask(adapter: ArchitectureAdapter) -> None:
    if adapter.head_kind != "masked-lm":
        assert adapter.prompt_suffix == ""
        return
    ids = encode(adapter, TEXTS[:1])["input_ids"][0].tolist()
    assert ids.count(adapter.tokenizer.mask_token_id) == 1


def test_exporting_segments_leaves_the_model_in_eval_mode(adapter: ArchitectureAdapter) -> None:
    """torch.onnx.export restores each wrapper's mode; a train-mode wrapper would re-enable dropout."""
    hidden = torch.zeros(1, 3, adapter.hidden_size)
    ids = torch.ones(1, 3, dtype=torch.long)
    segments = [
        (adapter.embed_segment(), (ids, ids)),
        (adapter.layer_segment(0), (hidden, ids)),
        (adapter.head_segment(label_ids(adapter)), (hidden[:, 0],)),
    ]
    for segment, args in segments:
        torch.onnx.export(segment, args, io.BytesIO(), dynamo=False)
    assert not any(module.training for module in adapter.model.modules())
