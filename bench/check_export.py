"""Independent check of an export: chain the ONNX files with bare ONNX Runtime and compare with transformers.

Shares no code with `onnx_export/verify.py` or the runtime: it reads `manifest.json` itself, pads a batch itself,
chains `embed.onnx` and `layer_*.onnx` with plain sessions, and compares every layer with the hidden states that
transformers returns for each prompt run alone (`output_hidden_states`; the last one is after the final norm, so
the final norm is applied to the ONNX output for that comparison). Label logits are the model's own `lm_head`
after its final norm. Causal LMs (the presets). Usage: python bench/check_export.py --artifacts DIR --model SPEC
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from raee_ops.onnx_export.model_source import resolve
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from raee_ops.runtime import open_session

PROMPTS = [
    "Review: fine.\nSentiment (negative or positive):",
    "Review: a tender, funny and quietly devastating film about two brothers.\nSentiment (negative or positive):",
    "Review: I walked out after forty minutes; the plot makes no sense, the dialogue is wooden and the jokes "
    "land with a thud every single time.\nSentiment (negative or positive):",
]
TOLERANCE = 1e-3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", required=True, type=Path)
    parser.add_argument("--model", required=True)
    parser.add_argument("--task", default="sst2")
    args = parser.parse_args()
    manifest = json.loads((args.artifacts / "manifest.json").read_text())
    label_ids = manifest["tasks"][args.task]["label_token_ids"]

    tokenizer = Tokenizer.from_file(str(args.artifacts / manifest["tokenizer"]["file"]))
    encoded = [e.ids for e in tokenizer.encode_batch(PROMPTS)]
    width = max(map(len, encoded))
    ids = np.full((len(encoded), width), manifest["tokenizer"]["pad_id"], np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(encoded):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1

    def session(name: str):  # an onnxruntime InferenceSession
        return open_session(args.artifacts / name)

    hidden = session(manifest["segments"]["embed"]["file"]).run(None, {"input_ids": ids, "attention_mask": mask})[0]
    onnx_layers = []
    for ref in manifest["segments"]["layers"]:
        hidden = session(ref["file"]).run(None, {"hidden_states": hidden, "attention_mask": mask})[0]
        onnx_layers.append(hidden)

    source = resolve(args.model)
    model = AutoModelForCausalLM.from_pretrained(
        source.directory, gguf_file=source.gguf_file, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    norm, lm_head = model.model.norm, model.lm_head
    worst_hidden, worst_logits, argmax_ok = 0.0, 0.0, True
    with torch.no_grad():
        for row, tokens in enumerate(encoded):
            out = model(torch.tensor([tokens]), output_hidden_states=True)
            states = out.hidden_states[1:]  # output of each layer; the last one is after the final norm
            n = len(tokens)
            for layer, onnx_out in enumerate(onnx_layers):
                mine = torch.from_numpy(onnx_out[row, :n])
                last = layer == len(onnx_layers) - 1
                ours_state = norm(mine) if last else mine
                scale = float(states[layer][0].abs().max())
                worst_hidden = max(worst_hidden, float((ours_state - states[layer][0]).abs().max()) / scale)
                theirs_state = states[layer][0, -1] if last else norm(states[layer][0, -1])
                theirs = lm_head(theirs_state)[label_ids]
                ours = lm_head(norm(mine[-1]))[label_ids]
                worst_logits = max(worst_logits, float((ours - theirs).abs().max()))
                argmax_ok &= int(ours.argmax()) == int(theirs.argmax())
            worst_logits = max(worst_logits, float((out.logits[0, -1, label_ids] - ours).abs().max()))
    passed = worst_logits <= TOLERANCE and argmax_ok
    print(
        f"{args.model}: {len(onnx_layers)} layers, {len(PROMPTS)} prompts padded to {width} tokens; "
        f"max |hidden diff| / max |hidden| {worst_hidden:.2e}, max |label logit diff| {worst_logits:.2e}, "
        f"same argmax at every layer: {argmax_ok} -> {'PASS' if passed else 'FAIL'} (tolerance {TOLERANCE})"
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
