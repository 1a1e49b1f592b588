"""What graph analysis found in a model (and whether two models match), as plain data and as text.

Backs `onnxzip inspect`: nothing runs, nothing is calibrated; this is the declarative result of `graph.analyse`.
"""

from __future__ import annotations

from .errors import MismatchError
from .graph import (Analysis, analyse, averaged_report, descendants, match, stop_points, trunk_nodes,
                    unsupported_report)
from .surgery import merge_points, why_nothing_zipped, zipped_spaces


def describe(analysis: Analysis, path: str | None = None) -> dict:
    """A JSON-able report: feature spaces, task heads, unmerged regions and stop points of one model."""
    a = analysis
    trunk = trunk_nodes(a)
    zipped = set(zipped_spaces(a, trunk))
    points = merge_points(a, trunk)
    names = {n.index: n.name for n in a.nodes}
    after_heads = descendants(a, a.heads)
    spaces = []
    for sid, space in sorted(a.spaces.items()):
        if space.identity:
            continue
        tied_by = sorted({a.nodes[i].op_type for i in space.carriers
                          if a.nodes[i].op_type in ("Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean")
                          and sum(1 for t in a.model.graph.node[i].input if t in a.tensor_spaces) > 1})
        entry = {
            "id": sid,
            "width": space.width,
            "blocks": space.blocks,
            "producers": [names[i] for i in space.producers],
            "consumers": [names[i] for i in space.consumers],
            "carried_by": sorted({a.nodes[i].op_type for i in space.carriers}),
            "tied_by": tied_by,
            "merge_points": points.get(sid, []),
            "zipped_by_default": sid in zipped,
            "head_output": any(i in a.heads for i in space.producers),
        }
        if space.view is not None:
            entry["view_of"] = sorted({sp for sp, _ in space.view})
            if space.queries_of_keys:
                entry["queries_matched_as_keys"] = True
            entry["zipped_by_default"] = any(t in a.producer and a.producer[t][0] in trunk for t in space.tensors)
        elif space.composite:
            entry["concat_of"] = space.parts
            entry["zipped_by_default"] = all(p in zipped or a.spaces[p].identity or a.spaces[p].composite
                                             for p in space.parts) and any(
                t in a.producer and a.producer[t][0] in trunk for t in space.tensors)
        if space.alike:
            entry["matched_alike"] = len(space.alike)
        spaces.append(entry)
    # learned spaces of their own (not views or concatenations of others) outside the task heads' outputs
    # (and the queries of grouped-query attention: written by their own projection, matched as their key heads)
    own = [e for e in spaces if ("view_of" not in e or e.get("queries_matched_as_keys")) and "concat_of" not in e
           and not e["head_output"]]
    heads = []
    for i in a.heads:
        out = a.nodes[i].out_space
        heads.append({"node": names[i], "op": a.nodes[i].op_type,
                      "width": a.spaces[out.space].width if out else None,
                      "after": sorted({a.nodes[j].op_type for j in after_heads if j != i})})
    return {
        "model": path,
        "opset": {op.domain or "ai.onnx": op.version for op in a.model.opset_import},
        "nodes": len(a.nodes),
        "batchnorms_folded": a.folded_batchnorms,
        "weighted_layers": len(a.weighted),
        "inputs": a.input_names,
        "outputs": a.output_names,
        "feature_spaces": spaces,
        "spaces_zipped": {"zipped": sum(e["zipped_by_default"] for e in own), "of": len(own)},
        "task_heads": heads,
        "unmerged": [{"node": names[i], "op": a.nodes[i].op_type, "reason": r} for i, r in unsupported_report(a)],
        "zipped_nothing": not zipped,
        "zipped_nothing_reason": why_nothing_zipped(a, trunk),
        "stop_points": [{"value": v, "meaning": d} for v, d in stop_points(a)],
    }


def inspect_models(model_a, model_b=None, path_a=None, path_b=None, fold_batchnorm: bool = True) -> dict:
    """Report on model A; with other models (model_b: one ModelProto or a list of them, path_b likewise), also
    whether each matches A (and where the first that does not first differs). The models are seen as `merge` sees
    them: with `fold_batchnorm`, BatchNorms folded into the layers before them."""
    a = analyse(model_a, fold_batchnorm)
    report = {"a": None, "match": None}
    others = [] if model_b is None else (list(model_b) if isinstance(model_b, (list, tuple)) else [model_b])
    paths = list(path_b) if isinstance(path_b, (list, tuple)) else [path_b] * len(others)
    if others:
        report["match"] = {"ok": True, "message": "the models match node for node (task heads aside)"
                           if len(others) == 1 else f"all {len(others) + 1} models match node for node "
                                                    "(task heads aside)"}
        correspondences = []
        for k, (model, path) in enumerate(zip(others, paths)):
            label = path or ("B" if len(others) == 1 else f"model {k + 2}")
            try:
                correspondences.append(match(a, analyse(model, fold_batchnorm), (path_a or "A", label)))
            except MismatchError as exc:
                report["match"] = {"ok": False, "message": str(exc), "model": path or k + 1}
                break
        # constants that differ between the models and that merge takes as their average (attention-score biases)
        report["match"]["averaged_constants"] = averaged_report(a, correspondences)
    report["a"] = describe(a, path_a)
    return report


def format_report(report: dict) -> str:
    """The report as text for a terminal."""
    r = report["a"]
    lines = [f"model: {r['model'] or '(in memory)'}",
             f"  opset {', '.join(f'{d} {v}' for d, v in r['opset'].items())}; {r['nodes']} nodes, "
             f"{r['weighted_layers']} weighted layers; inputs {', '.join(r['inputs'])}; "
             f"outputs {', '.join(r['outputs'])}"]
    if r["batchnorms_folded"]:
        lines.append(f"  {r['batchnorms_folded']} BatchNormalization node(s) folded into the Conv/Gemm before them "
                     f"(as merge does; --keep-batchnorm to keep them)")
    z = r["spaces_zipped"]
    lines.append(f"feature spaces ({len(r['feature_spaces'])}): {z['zipped']} of {z['of']} learned space(s) outside "
                 "the task heads zipped by default")
    for s in r["feature_spaces"]:
        flag = "zipped" if s["zipped_by_default"] else ("head" if s["head_output"] else "unmerged")
        extra = f" concat of spaces {s['concat_of']}" if "concat_of" in s else ""
        if "view_of" in s:
            extra = f" slice/shuffle of space(s) {s['view_of']}"
        if s.get("queries_matched_as_keys"):
            extra = f" queries matched as their key heads in space(s) {s['view_of']} (grouped-query attention)"
        tied = f" tied by {', '.join(s['tied_by'])}" if s["tied_by"] else ""
        if s.get("blocks", 1) > 1:
            extra += f" in {s['blocks']} blocks (grouped, sliced, attention heads: matched block by block)"
        if s.get("matched_alike"):
            extra += " queries and keys matched alike"
        lines.append(f"  space {s['id']:>3}: width {s['width']:>5}  [{flag}]{extra}{tied}")
        if s["producers"]:
            lines.append(f"      written by {', '.join(s['producers'])}")
        if s["consumers"]:
            lines.append(f"      read by    {', '.join(s['consumers'])}")
        if s["merge_points"]:
            lines.append(f"      merge point(s) {', '.join(s['merge_points'])}")
    lines.append("task heads:")
    for h in r["task_heads"]:
        after = f", then {', '.join(h['after'])}" if h["after"] else ""
        lines.append(f"  {h['node']} ({h['op']}, {h['width']} outputs{after})")
    if r["unmerged"]:
        lines.append("left unmerged (both copies kept; --strict makes this an error):")
        for u in r["unmerged"]:
            lines.append(f"  {u['node']} ({u['op']}): {u['reason']}")
    elif not r["zipped_nothing"]:
        lines.append("left unmerged: nothing")
    if r["zipped_nothing"]:
        lines.append(f"NOTHING IS ZIPPED: {r['zipped_nothing_reason']}. merge would write both models side by side "
                     "(an ensemble, at twice the cost of one); with --strict it fails")
    lines.append("--stop-at accepts:")
    for p in r["stop_points"]:
        lines.append(f"  {p['value']:>6}  {p['meaning']}")
    if report.get("match") is not None:
        m = report["match"]
        lines.append(("models match: " if m["ok"] else "models DO NOT match: ") + m["message"])
        if m.get("averaged_constants"):
            first = m["averaged_constants"][0]
            lines.append(f"  {len(m['averaged_constants'])} constant(s) differ between the models where merge takes "
                         f"their average (first: input {first['input']} of {first['node']}, {first['why']})")
    return "\n".join(lines)
