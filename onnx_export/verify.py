"""Check exported segments against PyTorch: chained ONNX Runtime segments on a right-padded batch must give,
at every layer, the head logits the HF model gives for each prompt run alone (unpadded, its own forward).

This is the export's acceptance test: it covers padding, positions, masks, the saved tokenizer.json and the
per-task heads, so the runtime (ORT only) can trust the manifest.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from raee_ops.onnx_export.adapters.base import ArchitectureAdapter
from raee_ops.schemas.manifest import Manifest
from tokenizers import Tokenizer

from raee_ops.errors import ArtifactError
from raee_ops.extras import onnxruntime
from raee_ops.runtime import attention_mask, embed_batch, layer_feed, open_session, pad_right, readout_positions
from raee_ops.tasks import Task

ort = onnxruntime()

ATOL = 1e-3
#: Sample inputs of clearly different lengths, so the batch is padded and positions/masks are exercised.
SAMPLE_TEXTS = [
    ("Great.", "It is good."),
    ("Not bad at all, actually quite fun to watch.", "The film was enjoyable."),
    (
        "A dull, plodding film that never finds its footing: long scenes go nowhere, the jokes fall flat and "
        "the cast seems bored by material that gives them nothing to do for two hours.",
        "Critics and audiences alike found the movie tedious, overlong and poorly acted.",
    ),
]


def sample_prompts(tasks: Sequence[Task], suffix: str) -> list[str]:
    return [task.render(text, pair, suffix=suffix) for task in tasks for text, pair in SAMPLE_TEXTS]


class Sessions(dict[str, Any]):
    """An export's ONNX Runtime sessions by file name, each opened on first use and kept: the checks chain the same
    segments more than once."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.directory = directory

    def __missing__(self, file: str) -> ort.InferenceSession:
        self[file] = session = open_session(self.directory / file, 2)
        return session


class Padded(NamedTuple):
    """Encoded prompts right-padded into one batch, with where each row's head reads."""

    ids: np.ndarray
    lengths: np.ndarray
    mask: np.ndarray
    positions: np.ndarray


def pad_prompts(manifest: Manifest, encoded: Sequence[Sequence[int]]) -> Padded:
    ids, lengths = pad_right(encoded, manifest.tokenizer.pad_id)
    try:
        positions = readout_positions(ids, lengths, manifest.readout, manifest.tokenizer.mask_token_id)
    except ValueError as exc:
        raise ArtifactError(f"verification prompt: {exc}") from exc
    return Padded(ids, lengths, attention_mask(lengths, ids.shape[1]), positions)


def check_tokenizer(directory: Path, manifest: Manifest, tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """The saved tokenizer.json must encode exactly as the HF tokenizer (special tokens included)."""
    saved = Tokenizer.from_file(str(directory / manifest.tokenizer.file))
    encoded = []
    for prompt in prompts:
        expected = list(tokenizer(prompt)["input_ids"])
        got = saved.encode(prompt).ids
        if got != expected:
            raise ArtifactError(f"saved tokenizer differs from the HF tokenizer on {prompt!r}: {got} != {expected}")
        encoded.append(expected)
    return encoded


def ort_layer_states(
    sessions: Sessions, manifest: Manifest, batch: Padded, layer_files: Sequence[str] | None = None
) -> list[np.ndarray]:
    """Chained segments on the padded batch (the manifest's layers, or `layer_files` in their place); returns each
    layer's hidden state at the readout positions."""
    rows = np.arange(len(batch.ids))
    hidden, context = embed_batch(sessions[manifest.segments.embed.file], batch.ids, batch.mask)
    states = []
    for index, file in enumerate(layer_files or [ref.file for ref in manifest.segments.layers]):
        session = sessions[file]
        hidden = session.run(None, layer_feed(session, hidden, context))[0]
        if not np.isfinite(hidden).all():
            raise ArtifactError(f"verification failed: layer {index} produced non-finite values")
        states.append(hidden[rows, batch.positions])
    return states


@torch.no_grad()
def torch_layer_states(
    adapter: ArchitectureAdapter, encoded: Sequence[Sequence[int]], positions: np.ndarray
) -> list[np.ndarray]:
    """Each prompt alone through the HF model's own forward; hooks read every layer's raw output."""
    captured: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_hook(hook) for layer in adapter.hf_layers()]
    per_prompt = []
    try:
        for ids, position in zip(encoded, positions, strict=True):
            captured.clear()
            input_ids = torch.tensor([list(ids)], dtype=torch.long)
            adapter.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
            per_prompt.append([state[0, int(position)].numpy() for state in captured])
    finally:
        for handle in handles:
            handle.remove()
    return [np.stack(layer) for layer in zip(*per_prompt, strict=True)]


def verify_export(
    directory: Path, manifest: Manifest, adapter: ArchitectureAdapter, tasks: Sequence[Task]
) -> dict[str, Any]:
    """Compare every layer's head logits (ORT on a padded batch vs torch on each prompt alone; a head-less backbone:
    the readout hidden states themselves, what its probes read); raise naming the first layer that differs."""
    prompts = sample_prompts(tasks, adapter.prompt_suffix)
    encoded = check_tokenizer(directory, manifest, adapter.tokenizer, prompts)
    batch = pad_prompts(manifest, encoded)
    sessions = Sessions(directory)
    onnx_states = ort_layer_states(sessions, manifest, batch)
    torch_states = torch_layer_states(adapter, encoded, batch.positions)
    heads = {
        name: (sessions[entry.head.file], adapter.head_segment(entry.label_token_ids))
        for name, entry in manifest.tasks.items()
        if entry.head is not None
    }
    max_diffs = []
    for layer, (got, want) in enumerate(zip(onnx_states, torch_states, strict=True)):
        diff = 0.0
        if not heads:
            diff = float(np.abs(got - want).max())
            if diff > ATOL:
                raise ArtifactError(
                    f"verification failed at layer {layer}: readout states differ by {diff:.2e} (tolerance {ATOL})"
                )
        for name, (session, head) in heads.items():
            onnx_logits = session.run(None, {"hidden_states": got})[0]
            with torch.no_grad():
                torch_logits = head(torch.from_numpy(want)).numpy()
            diff = max(diff, float(np.abs(onnx_logits - torch_logits).max()))
            same_argmax = (onnx_logits.argmax(1) == torch_logits.argmax(1)).all()
            if diff > ATOL or not same_argmax:
                raise ArtifactError(
                    f"verification failed at layer {layer} (task {name}): max abs diff {diff:.2e} "
                    f"(tolerance {ATOL}), argmax {'same' if same_argmax else 'differs'}"
                )
        max_diffs.append(diff)
    return {
        "passed": True,
        "compared": "head logits" if heads else "readout hidden states (no label-word head)",
        "tolerance": ATOL,
        "prompts": len(prompts),
        "lengths": batch.lengths.tolist(),
        "max_abs_diff": max_diffs,
    }
