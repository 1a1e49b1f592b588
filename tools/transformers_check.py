"""Merge Hugging Face text classifiers, as a new user would (issue 13): BERT, DistilBERT, RoBERTa, GPT-2, Llama
(with 4 key/value heads; `llama_gqa` with grouped-query attention, 2 key/value heads for the 4 query heads;
`llama_mqa` with multi-query attention, one).

Each model is a `<Arch>ForSequenceClassification` from `transformers` with a small configuration (hidden 64,
2 layers, 4 heads, vocabulary 1000, 10 labels) and random weights: seed 0 and seed 1 (two initialisations). Both
are exported (`torchscript`: `torch.onnx.export(dynamo=False, opset_version=17)`; `dynamo`: `dynamo=True`) with
one input, `input_ids` (int64, batch x 16; no attention mask: every token attends), and checked against torch in
onnxruntime. Then, as `tools/torchvision_check.py` does: `onnxzip inspect A B --json` (spaces zipped by default),
`onnxzip merge A A` (twins: max relative error of both heads against A) and `onnxzip merge A B`
(defaults), each outcome `merged`, `refused` (exit 2-9 with an `error:` line), `crash` or `timeout`.

Calibration data: seeded uniform token ids in [0, vocabulary), `--samples` sequences.

Usage (from the repository root; needs torch, transformers, onnxscript for dynamo):

    python3 tools/transformers_check.py
    python3 tools/transformers_check.py --models bert llama --exporters torchscript

Writes `docs/results/transformers.json` (merged with what is there) and prints a table.
"""
import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import warnings

import numpy as np

TOOLS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TOOLS)
sys.path.insert(0, TOOLS)
import torchvision_check as tvc  # noqa: E402  (the merge checks and the table)

RESULTS = os.path.join(ROOT, "docs", "results", "transformers.json")
VOCAB, SEQ, LABELS = 1000, 16, 10
SMALL = dict(vocab_size=VOCAB, num_labels=LABELS)


def configs():
    """name -> (config class, model class, config keyword arguments)."""
    import transformers as t
    return {
        "bert": (t.BertConfig, t.BertForSequenceClassification,
                 dict(SMALL, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                      max_position_embeddings=64)),
        "distilbert": (t.DistilBertConfig, t.DistilBertForSequenceClassification,
                       dict(SMALL, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=64)),
        "roberta": (t.RobertaConfig, t.RobertaForSequenceClassification,
                    dict(SMALL, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                         max_position_embeddings=64 + 2)),
        "gpt2": (t.GPT2Config, t.GPT2ForSequenceClassification,
                 dict(SMALL, n_embd=64, n_layer=2, n_head=4, n_positions=64, pad_token_id=0)),
        "llama": (t.LlamaConfig, t.LlamaForSequenceClassification,
                  dict(SMALL, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                       intermediate_size=128, max_position_embeddings=64, pad_token_id=0)),
        # grouped-query attention: 4 query heads over 2 key/value heads (repeat_kv)
        "llama_gqa": (t.LlamaConfig, t.LlamaForSequenceClassification,
                      dict(SMALL, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=128, max_position_embeddings=64, pad_token_id=0)),
        # multi-query attention: one key/value head for the 4 query heads
        "llama_mqa": (t.LlamaConfig, t.LlamaForSequenceClassification,
                      dict(SMALL, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                           intermediate_size=128, max_position_embeddings=64, pad_token_id=0)),
    }


def logits_only(model):
    """`model` as a module of `input_ids` returning a plain logits tensor (what the exporters want)."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids=input_ids).logits

    return Logits(model).eval()


def build(name, seed):
    import torch
    config_class, model_class, kwargs = configs()[name]
    torch.manual_seed(seed)
    config = config_class(**kwargs)
    config._attn_implementation = "eager"  # the plain MatMul/Softmax/MatMul attention, as most exports carry
    return logits_only(model_class(config).eval())


def export(model, path, exporter, static=False):
    import torch
    ids = torch.randint(1, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            axes = None if static else {"input_ids": {0: "batch"}, "logits": {0: "batch"}}
            torch.onnx.export(model, (ids,), path, dynamo=False, opset_version=17, input_names=["input_ids"],
                              output_names=["logits"], dynamic_axes=axes)
        else:
            torch.onnx.export(model, (ids,), path, dynamo=True, input_names=["input_ids"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False, verbose=False)


def check(name, exporter, args):
    import torch
    row = {"model": name, "exporter": exporter}
    with tempfile.TemporaryDirectory(prefix="hfcheck-") as folder:
        t0 = time.perf_counter()
        error = None
        # TorchScript traces Hugging Face's causal mask with the example's batch size baked in: where the dynamic
        # batch fails in onnxruntime, export with the batch fixed at 2 (onnxzip then calibrates 2 at a time)
        for static in (False, True) if exporter == "torchscript" else (False,):
            try:
                for seed, tag in ((0, "a"), (1, "b")):
                    model = build(name, seed)
                    path = os.path.join(folder, f"{tag}.onnx")
                    export(model, path, exporter, static)
                    ids = torch.randint(1, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(7))
                    with torch.no_grad():
                        ref = model(ids).numpy()
                    got = tvc.run_onnx(path, ids.numpy())["logits"]
                    if not np.allclose(got, ref, rtol=1e-3, atol=1e-4 * max(1.0, float(np.abs(ref).max()))):
                        raise RuntimeError(f"onnxruntime differs from torch by {np.abs(got - ref).max():.3g}")
                error = None
                if static:
                    row["static_batch"] = 2
                break
            except Exception as e:
                error = f"{type(e).__name__}: {str(e).strip()[:300]}"
        if error:
            row.update(outcome="export failed", error=error)
            return row
        row["export_seconds"] = round(time.perf_counter() - t0, 1)
        row["size"] = SEQ
        data = np.random.default_rng(0).integers(0, VOCAB, (args.samples, SEQ), dtype=np.int64)
        tvc.merge_checks(row, folder, data, args)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["bert", "distilbert", "roberta", "gpt2", "llama", "llama_gqa", "llama_mqa"])
    p.add_argument("--exporters", nargs="+", default=["torchscript", "dynamo"], choices=["torchscript", "dynamo"])
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--timeout", type=int, default=900, help="seconds per onnxzip command")
    p.add_argument("--twin-options", nargs="*", default=[])
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    import logging

    import importlib.util

    import torch
    if importlib.util.find_spec("torchvision"):
        tvc.import_torchvision()  # transformers imports it when it is installed
    import transformers
    for logger in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript", "transformers"):
        logging.getLogger(logger).setLevel(logging.ERROR)

    results = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)
    rows = {(r["model"], r["exporter"]): r for r in results.get("rows", [])}
    for name in args.models:
        for exporter in args.exporters:
            log(f"{name} {exporter}")
            t0 = time.perf_counter()
            try:
                row = check(name, exporter, args)
            except Exception as e:  # the tool itself; recorded, never hidden
                row = {"model": name, "exporter": exporter, "outcome": "tool error", "error": repr(e)[:300]}
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows[(name, exporter)] = row
            log("  " + tvc.summary_line(row))
            results = tvc.save_results(args.out, "transformers_check.py", argv, rows, args.samples,
                                       {"torch": torch.__version__, "transformers": transformers.__version__})
    for row in results.get("rows", []):
        print(tvc.summary_line(row))


if __name__ == "__main__":
    main()
